"""Snakemake adapter of checkpoint split_catalogue: check every input (SPEC §5), then split the
catalogue into batches of at most N_batch_cutout_process sources per tile."""

from cutana.inputs_check import check_inputs
from script_logging import logged_step

from cutana.catalogue import split_catalogue

smk = snakemake  # noqa: F821 (injected by Snakemake)

with logged_step(smk.log[0], smk.config["log_level"], "split_catalogue") as log:
    cfg = dict(smk.config)
    check_inputs(cfg)
    manifest = split_catalogue(smk.input.catalogue, cfg, smk.output.batches)
    log.info(
        "%d rows in %d batches over %d tiles",
        manifest["total_rows"],
        len(manifest["batches"]),
        len(manifest["tiles"]),
    )
