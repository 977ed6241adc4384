# Stage 0: the built-in synthetic demo survey (only needed when source_catalogue points at it).


rule make_demo_survey:
    output:
        catalogue=demo_catalogue_path(config),
    log:
        f"{PATHS.logs}/make_demo_survey.log",
    benchmark:
        f"{PATHS.benchmarks}/make_demo_survey.tsv"
    conda:
        "../../envs/cutana.yaml"
    resources:
        mem_mb=1000,
    shell:
        f"{JOB} make_demo_survey {settings_option(settings_hash(config['demo']))} "
        "--log {log:q} --catalogue {output.catalogue:q}"
