"""Snakemake adapter of rule gallery: PNG grid + HTML page of sample cutouts."""

import json
import os

from job_setup import exit_without_teardown, logged_step

from cutana.gallery import make_gallery
from cutana.index import merge_status_arrow

smk = snakemake  # noqa: F821 (injected by Snakemake)

with logged_step(smk.log[0], smk.config["log_level"], "gallery") as log:
    with open(os.path.join(smk.input.batches, "manifest.json"), encoding="utf-8") as handle:
        total_rows = int(json.load(handle)["total_rows"])
    config = dict(smk.config)
    # The same rows merge_index writes, merged here so both rules run at once.
    index = merge_status_arrow(list(smk.input.status), total_rows, config)
    make_gallery(smk.params.output_dir, index, config, smk.params.n_samples)
    log.info("gallery of up to %d sources written", smk.params.n_samples)

# Every output is closed (written to a temporary name and renamed into place).
exit_without_teardown()
