"""Snakemake adapter of rule cutout_batch: process one batch (SPEC §3.3)."""

import shutil
from pathlib import Path

from job_setup import exit_without_teardown, logged_step

from cutana.engine import run_batch
from cutana.memory_model import peak_rss_mb

smk = snakemake  # noqa: F821 (injected by Snakemake)

with logged_step(smk.log[0], smk.config["log_level"], "cutout_batch") as log:
    # A killed earlier attempt of this batch may have left its temporary folder/file behind
    # (writes are tmp + rename); only this batch's leftovers are removed, other jobs run on.
    for output in (smk.output.batch_dir, smk.output.status):
        for leftover in Path(output).parent.glob(f"{Path(output).name}.tmp-*"):
            log.info("removing the leftover of an interrupted attempt: %s", leftover)
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    # Recorded so the declared memory can be checked against the measured peak (benchmark).
    log.info("declared resources: mem_mb=%s", smk.resources.mem_mb)
    # The Snakefile validated and completed the config before any job was created.
    run_batch(
        smk.input.batch,
        smk.output.batch_dir,
        smk.output.status,
        dict(smk.config),
        config_validated=True,
    )
    # Snakemake's benchmark samples memory every few tenths of a second and misses the peak
    # of a short job; the kernel's high-water mark does not.
    log.info("peak RSS %.1f MB", peak_rss_mb())

# The batch folder and the status file are written, fsynced and renamed into place.
exit_without_teardown()
