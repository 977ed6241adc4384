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
    params:
        benchmarks_dir=PATHS.benchmarks,
        logs_dir=PATHS.logs,
        # A function: Snakemake would fill in the {batch} of a plain string as a wildcard.
        status_pattern=lambda wildcards: PATHS.status,
        output_dir=lambda wildcards, output: os.path.dirname(output.index),
    shell:
        f"{WARM_JOB} merge_index --log {{log:q}} --batches {{input.batches:q}} "
        "--status-pattern {params.status_pattern:q} "
        "--benchmarks-dir {params.benchmarks_dir:q} --logs-dir {params.logs_dir:q} "
        "--output-dir {params.output_dir:q}"


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
    params:
        output_dir=lambda wildcards, output: os.path.dirname(output.png),
        status_pattern=lambda wildcards: PATHS.status,
        n_samples=config["gallery"]["n_samples"],
    shell:
        f"{WARM_JOB} gallery --log {{log:q}} --batches {{input.batches:q}} "
        "--status-pattern {params.status_pattern:q} --output-dir {params.output_dir:q}"
