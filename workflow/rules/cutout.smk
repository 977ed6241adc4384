# Stage 3 (SPEC §3.3): one job per batch; the engine writes the batch folder atomically.


rule cutout_batch:
    input:
        batch=PATHS.batch_table,
    output:
        batch_dir=directory(PATHS.batch_dir),
        status=PATHS.status,
    log:
        f"{PATHS.logs}/cutout_batch/{{batch}}.log",
    benchmark:
        PATHS.cutout_benchmark
    conda:
        "../../envs/cutana.yaml"
    threads: 1
    resources:
        mem_mb=cutout_mem_mb,
    shell:
        f"{WARM_JOB} cutout_batch {PIXEL_SETTINGS} --log {{log:q}} --batch {{input.batch:q}} "
        "--batch-dir {output.batch_dir:q} --status {output.status:q} "
        "--mem-mb {resources.mem_mb}"
