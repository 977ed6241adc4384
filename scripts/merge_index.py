"""Snakemake adapter of rule merge_index: the merged index, run summary and saved config."""

import json
import os

from script_logging import logged_step

from cutana.index import merge_index

smk = snakemake  # noqa: F821 (injected by Snakemake)

with logged_step(smk.log[0], smk.config["log_level"], "merge_index") as log:
    with open(os.path.join(smk.input.batches, "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    written = merge_index(
        list(smk.input.status),
        manifest,
        dict(smk.config),
        smk.params.output_dir,
        benchmark_paths=list(smk.params.benchmarks),
    )
    log.info("written: %s", written)
