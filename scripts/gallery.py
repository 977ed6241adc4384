"""Snakemake adapter of rule gallery: PNG grid + HTML page of sample cutouts."""

import pandas as pd
from script_logging import logged_step

from cutana.gallery import make_gallery

smk = snakemake  # noqa: F821 (injected by Snakemake)

with logged_step(smk.log[0], smk.config["log_level"], "gallery") as log:
    index_df = pd.read_parquet(smk.input.index)
    make_gallery(smk.params.output_dir, index_df, dict(smk.config), smk.params.n_samples)
    log.info("gallery of up to %d sources written", smk.params.n_samples)
