# Stages 4-5 (SPEC §3.4-3.5, §7.3): merged index, run summary, saved config and gallery.


rule merge_index:
    input:
        status=all_status_files,
        batch_dirs=all_batch_dirs,
        batches=rules.split_catalogue.output.batches,
        memory_model=rules.profile_memory.output.model,
    output:
        index=PATHS.index,
        summary=PATHS.summary,
        config_toml=PATHS.config_toml,
    log:
        f"{PATHS.logs}/merge_index.log",
    benchmark:
        f"{PATHS.benchmarks}/merge_index.tsv"
    conda:
        "../../envs/cutana.yaml"
    resources:
        mem_mb=2000,
    shell:
        f"{WARM_JOB} merge_index --log {{log:q}} --batches {{input.batches:q}} "
        f"--status-pattern {shell_arg(PATHS.status)} "
        f"--benchmarks-dir {shell_arg(PATHS.benchmarks)} --logs-dir {shell_arg(PATHS.logs)} "
        f"--output-dir {shell_arg(PATHS.out)}"


# The gallery reads the batches' status tables itself (not the merged index), so it runs
# alongside merge_index instead of after it.
rule gallery:
    input:
        status=all_status_files,
        batch_dirs=all_batch_dirs,
        batches=rules.split_catalogue.output.batches,
    output:
        png=PATHS.gallery_png,
        html=PATHS.gallery_html,
    log:
        f"{PATHS.logs}/gallery.log",
    benchmark:
        f"{PATHS.benchmarks}/gallery.tsv"
    conda:
        "../../envs/cutana.yaml"
    resources:
        mem_mb=1000,
    shell:
        f"{WARM_JOB} gallery {settings_option(settings_hash(config['gallery']))} "
        "--log {log:q} --batches {input.batches:q} "
        f"--status-pattern {shell_arg(PATHS.status)} --output-dir {shell_arg(PATHS.out)}"
