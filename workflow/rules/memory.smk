# Stage 2 (SPEC §3.2): profile a sample batch and write the memory model of the cutout jobs.


checkpoint profile_memory:
    input:
        batches=rules.split_catalogue.output.batches,
    output:
        model=PATHS.memory_model,
    log:
        f"{PATHS.logs}/profile_memory.log",
    benchmark:
        f"{PATHS.benchmarks}/profile_memory.tsv"
    # When the cutout jobs do not wait for the model (common.smk, memory_limits_jobs), start it
    # first among them rather than last, where it would lengthen the end of the run.
    priority: 1
    conda:
        "../../envs/cutana.yaml"
    resources:
        mem_mb=2000,
    shell:
        f"{WARM_JOB} profile_memory {PIXEL_SETTINGS} --log {{log:q}} "
        "--batches {input.batches:q} --model {output.model:q} "
        f"--scratch {shell_arg(PATHS.profile_scratch)}"
