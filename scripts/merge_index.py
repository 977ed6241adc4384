"""Snakemake adapter of rule merge_index: the merged index, run summary and saved config."""

import json
import os

from job_setup import exit_without_teardown, logged_step

from cutana.index import merge_index

smk = snakemake  # noqa: F821 (injected by Snakemake)

with logged_step(smk.log[0], smk.config["log_level"], "merge_index") as log:
    with open(os.path.join(smk.input.batches, "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    # Timings of the stages and of every batch's cutout job (absent files are skipped). Listed
    # here, not as rule params: a params function resolving a checkpoint confuses Snakemake's
    # rerun detection of deleted batch outputs.
    benchmarks_dir = smk.params.benchmarks_dir
    benchmark_paths = [
        os.path.join(benchmarks_dir, f"{stage}.tsv")
        for stage in ("make_demo_survey", "split_catalogue", "profile_memory")
    ] + [
        os.path.join(benchmarks_dir, "cutout_batch", f"{batch['name']}.tsv")
        for batch in manifest["batches"]
    ]
    written = merge_index(
        list(smk.input.status),
        manifest,
        dict(smk.config),
        smk.params.output_dir,
        benchmark_paths=benchmark_paths,
    )
    log.info("written: %s", written)

# Every output is closed (written to a temporary name and renamed into place).
exit_without_teardown()
