"""Snakemake adapter of rule make_demo_survey: write the synthetic demo survey."""

from pathlib import Path

from job_setup import logged_step

from cutana.demo import make_demo_survey

smk = snakemake  # noqa: F821 (injected by Snakemake)

with logged_step(smk.log[0], smk.config["log_level"], "make_demo_survey") as log:
    demo = dict(smk.params.demo)
    out_dir = Path(smk.output.catalogue).parent
    demo.pop("dir", None)
    log.info("demo survey in %s with %s", out_dir, demo)
    written = make_demo_survey(out_dir, **demo)
    log.info("catalogue written: %s", written)
