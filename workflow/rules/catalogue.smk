# Stage 1 (SPEC §3.1): validate the inputs, then split the catalogue into batches per tile.


checkpoint split_catalogue:
    input:
        catalogue=config["source_catalogue"],
    output:
        batches=directory(PATHS.batches),
    log:
        f"{PATHS.logs}/split_catalogue.log",
    benchmark:
        f"{PATHS.benchmarks}/split_catalogue.tsv"
    # Bad input fails the same way on every attempt: no resubmission (a profile's retries).
    retries: 0
    conda:
        "../../envs/cutana.yaml"
    resources:
        mem_mb=2000,
    shell:
        f"{JOB} split_catalogue {PIXEL_SETTINGS} --log {{log:q}} "
        "--catalogue {input.catalogue:q} --batches {output.batches:q}"
