"""Helpers shared by the tests that run the real workflow through Snakemake as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cutana.paths import snakefile


def snakemake_command(work_dir: Path, *extra: str) -> list[str]:
    """``python -m snakemake`` on the repository's workflow with ``work_dir/config.yaml``."""
    return [
        sys.executable, "-m", "snakemake", "--snakefile", str(snakefile()),
        "--directory", str(work_dir), "--configfile", str(work_dir / "config.yaml"),
        "--cores", "2", *extra,
    ]  # fmt: skip


def snakemake(work_dir: Path, *extra: str) -> str:
    """Run the workflow to completion; fail the test with Snakemake's output if it fails."""
    completed = subprocess.run(
        snakemake_command(work_dir, *extra), capture_output=True, text=True, timeout=600
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    return output


def tiny_demo_config(demo_dir: Path) -> dict:
    """Settings of a small, fast run over a demo survey made with ``make_demo_survey``."""
    from cutana.demo import demo_config

    return {
        **demo_config(demo_dir),
        "output_dir": "out",
        "target_resolution": 16,
        "N_batch_cutout_process": 10,
        "gallery": {"n_samples": 4},
        "memory": {"profile_sources": 5},
    }
