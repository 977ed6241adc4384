"""Snakemake adapter of checkpoint profile_memory: measure a sample batch, write the model."""

from job_setup import exit_without_teardown, logged_step

from cutana.memory_model import build_memory_model

smk = snakemake  # noqa: F821 (injected by Snakemake)

with logged_step(smk.log[0], smk.config["log_level"], "profile_memory") as log:
    model = build_memory_model(
        smk.input.batches, dict(smk.config), smk.output.model, smk.params.scratch
    )
    log.info(
        "memory model: base %.1f MB + %.3g MB per unit (sample of %d sources, peak %.1f MB)",
        model["base_mb"],
        model["mb_per_unit"],
        model["sample"]["n_sources"],
        model["sample"]["peak_mb"],
    )

# Every output is closed (written to a temporary name and renamed into place).
exit_without_teardown()
