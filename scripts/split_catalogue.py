"""Snakemake adapter of checkpoint split_catalogue: check every input (SPEC §5), then split the
catalogue into batches of at most N_batch_cutout_process sources per tile.

cutana.catalogue.split_catalogue runs the checks of cutana.inputs_check.check_inputs (catalogue
rows and every FITS file) in its single streaming pass and writes nothing unless they pass, so
the catalogue is read once, not twice.
"""

from pathlib import Path

from job_setup import exit_without_teardown, logged_step

from cutana.catalogue import split_catalogue

smk = snakemake  # noqa: F821 (injected by Snakemake)

with logged_step(smk.log[0], smk.config["log_level"], "split_catalogue") as log:
    work_dir = Path(smk.output.batches).parent
    manifest = split_catalogue(smk.input.catalogue, dict(smk.config), work_dir, check_files=True)
    log.info(
        "%d rows in %d batches over %d tiles",
        manifest["total_rows"],
        len(manifest["batches"]),
        len(manifest["tiles"]),
    )

# Every output is closed (written to a temporary name and renamed into place).
exit_without_teardown()
