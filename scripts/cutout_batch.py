"""Snakemake adapter of rule cutout_batch: process one batch (SPEC §3.3)."""

from cutana.engine import run_batch
from script_logging import logged_step

smk = snakemake  # noqa: F821 (injected by Snakemake)

with logged_step(smk.log[0], smk.config["log_level"], "cutout_batch") as log:
    # Recorded so the declared memory can be checked against the measured peak (benchmark).
    log.info("declared resources: mem_mb=%s attempt=%s", smk.resources.mem_mb, smk.attempt)
    run_batch(smk.input.batch, smk.output.batch_dir, smk.output.status, dict(smk.config))
