"""Memory as a resource (SPEC §3.2, §9): with ``--resources mem_mb=X`` the cutout jobs that run
at the same time never declare more than X together, and no job's measured peak RSS exceeds
what it declared. Real workflow, 2 cores, a limit that admits one cutout job at a time.
"""

import json
import re
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
import yaml
from workflow_helpers import snakemake, tiny_demo_config

from cutana import memory_model

pytestmark = pytest.mark.slow

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.MULTILINE)


def job_window(log_text: str) -> tuple[float, float]:
    """First and last timestamp of a job's log: a sub-interval of the job's lifetime."""
    stamps = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in LOG_TIME.findall(log_text)]
    return stamps[0].timestamp(), stamps[-1].timestamp()


@pytest.fixture(scope="module")
def limited_run(tmp_path_factory):
    from cutana.demo import make_demo_survey

    root = tmp_path_factory.mktemp("resources")
    make_demo_survey(
        root / "demo", n_tiles=1, tile_size=300, n_sources=40, seed=2,
        min_diameter_pixel=16, max_diameter_pixel=32,
    )  # fmt: skip
    config = tiny_demo_config(root / "demo")
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(root, "--until", "profile_memory")
    work = root / "out" / ".cutana"
    model = memory_model.load_model(work / "memory_model.json")
    manifest = json.loads((work / "batches" / "manifest.json").read_text())
    declared = {
        b["name"]: memory_model.mem_mb_for_batch(b["name"], model, 1) for b in manifest["batches"]
    }
    # Every job fits alone, no two fit together: the limit lies below the two smallest jobs
    # together and at or above the largest one.
    smallest, second = sorted(declared.values())[:2]
    limit = smallest + second - 1
    assert limit >= max(declared.values()), declared
    snakemake(root, "--resources", f"mem_mb={limit}")
    return work, declared, limit


def test_concurrent_jobs_never_declare_more_than_the_limit(limited_run):
    work, expected, limit = limited_run
    windows, declared = {}, {}
    for log in sorted((work / "logs" / "cutout_batch").glob("*.log")):
        text = log.read_text()
        declared[log.stem] = int(re.search(r"declared resources: mem_mb=(\d+)", text)[1])
        windows[log.stem] = job_window(text)
    assert declared == expected  # the jobs declare what the memory model says
    assert len(windows) >= 4
    for name, (start, _) in windows.items():
        running = [other for other, (s, e) in windows.items() if s <= start <= e]
        assert sum(declared[job] for job in running) <= limit, (name, running)
        assert running == [name], f"{running} ran together under mem_mb={limit}"


def test_no_job_uses_more_memory_than_it_declared(limited_run):
    work, declared, _ = limited_run
    sampled = 0
    for name, mem_mb in declared.items():
        benchmark = pd.read_csv(
            work / "benchmarks" / "cutout_batch" / f"{name}.tsv", sep="\t", na_values=["-"]
        )
        peak = benchmark["max_rss"].iloc[0]
        if np.isfinite(peak):  # NA when the job ended before Snakemake's first sample
            assert peak <= mem_mb, f"{name}: peak {peak} MB > declared {mem_mb} MB"
            sampled += 1
    assert sampled >= 1
