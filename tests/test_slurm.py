"""The SLURM profile against a real single-node SLURM cluster (SPEC §9, issue 7).

The session fixture brings the cluster up with ``tools/local_slurm.sh up`` (it installs
slurm-wlm and munge with apt-get if needed). The module is skipped, with the reason, only when
SLURM cannot be installed or started for lack of root/apt-get; any other failure is a failure.

What is checked:
- the profile is accepted by Snakemake and the plugin (dry run of the real workflow);
- SLURM enforces ``--mem`` and the profile's ``retries`` resubmit a killed job with the memory
  of the next attempt (a tiny throwaway workflow: isolates the cluster mechanics);
- the demo workflow through ``--profile profiles/slurm`` gives the same outputs as a local run,
  even though its submitting process was killed mid-run and recovered as docs/cluster.md says
  (scancel by run ID, --unlock, rerun), and every cutout job's first attempt was killed for
  exceeding its memory; the sbatch lines carry per-job ``--mem`` values that grow with the
  attempt.

Run: ``pytest -m slurm tests/test_slurm.py -s`` (as root; ~6 minutes on 2 shared cores; -s
prints the sbatch lines).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "tools" / "local_slurm.sh"
PROFILE = REPO / "profiles" / "slurm"
SNAKEFILE = REPO / "Snakefile"

# The plugin's first status check waits 40 s by default (sensible on a busy cluster); on the
# test cluster jobs finish in seconds, so poll early. MinJobAge=600 of the test cluster keeps
# the plugin's `squeue` status check valid (it needs MinJobAge >= 3 x this value).
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "2"]

# Timeout of one Snakemake run; generous because 2 cores are shared by the whole team.
RUN_TIMEOUT = 600


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def _snakemake(args: list[str], cwd: Path, timeout: int = RUN_TIMEOUT):
    """Run the snakemake CLI of this interpreter; return the CompletedProcess (text, merged)."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def _cannot_install_reason() -> str | None:
    """Why SLURM cannot be brought up here at all, or None if it can be tried."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None if os.geteuid() == 0 else "SLURM daemons need root to be started"
    if os.geteuid() != 0:
        return "slurm-wlm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm is not installed and apt-get is not available"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node cluster; torn down at the end only if this fixture started it."""
    reason = _cannot_install_reason()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.fail(
            "snakemake-executor-plugin-slurm is not installed: pip install -e '.[slurm]'",
            pytrace=False,
        )
    # (ps -C matches the command name; zombies of forked daemons do not count as running)
    ps = subprocess.run(["ps", "-C", "slurmctld", "-o", "stat="], capture_output=True, text=True)
    was_running = any(not stat.startswith("Z") for stat in ps.stdout.split())
    up = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "up"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    if up.returncode != 0:
        if not shutil.which("slurmctld"):
            # apt-get itself failed (no mirror reachable, no network): an environment limit.
            pytest.skip(f"slurm-wlm could not be installed:\n{_tail(up.stdout, 15)}")
        pytest.fail(f"local SLURM cluster did not come up:\n{up.stdout}", pytrace=False)
    print(up.stdout)
    yield up.stdout
    if not was_running:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], timeout=120)


def _slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """SLURM job id -> (state, requested memory) via squeue, which sees finished jobs for
    MinJobAge seconds (the test cluster has no accounting database for sacct)."""
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "-o", "%i|%T|%m", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    states = {}
    for line in out.split():
        job_id, state, mem = line.split("|")
        states[job_id] = (state, mem)
    return states


# The plugin logs (at --verbose) one line per submission ...
SBATCH_RE = re.compile(r"^sbatch call: (sbatch .*)$", re.M)
# ... and the SLURM job id it got, with the job's log file.
SUBMITTED_RE = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
MEM_RE = re.compile(r"--mem (\d+)\b")


def _sbatch_lines(log: str, rule: str) -> list[str]:
    return [line for line in SBATCH_RE.findall(log) if f"--comment rule_{rule}" in line]


def _target(sbatch_line: str) -> str:
    """The job a submission runs, e.g. ``cutout_batch:batch=00000_1f3a...``."""
    match = re.search(r"--target-jobs '([^']+)'", sbatch_line)
    assert match, sbatch_line
    return match.group(1)


def _short(sbatch_line: str) -> str:
    """An sbatch line without the long --wrap payload, for reports and docs."""
    return sbatch_line.split(" --wrap=")[0]


# ---------------------------------------------------------------------------------------------
# (a) the profile is valid for the real workflow


def test_dry_run_with_slurm_profile(slurm_cluster, tmp_path):
    demo = tmp_path / "demo"
    res = _snakemake(
        [
            "-n",
            "--profile",
            str(PROFILE),
            "-s",
            str(SNAKEFILE),
            "--config",
            f"output_dir={tmp_path / 'out'}",
            f"source_catalogue={demo / 'catalogue.csv'}",
            f"demo={{dir: {demo}, n_sources: 30, tile_size: 400}}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, _tail(res.stdout)
    # the profile was really used (not silently ignored) and the plan contains the workflow
    assert f"Using profile {PROFILE}" in res.stdout or f"Using profiles {PROFILE}" in res.stdout
    assert "split_catalogue" in res.stdout
    assert "This was a dry-run" in res.stdout


def _dry_run_resources(tmp_path: Path, profile_args: list[str]) -> list[str]:
    """The `resources:` lines of a dry run of the real workflow with these profile options."""
    demo = tmp_path / "demo"
    res = _snakemake(
        [
            "-n",
            *profile_args,
            "-s",
            str(SNAKEFILE),
            "--config",
            f"output_dir={tmp_path / 'out'}",
            f"source_catalogue={demo / 'catalogue.csv'}",
            f"demo={{dir: {demo}}}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, _tail(res.stdout)
    lines = [line.strip() for line in res.stdout.splitlines()]
    resources = [line for line in lines if line.startswith("resources:")]
    assert resources, _tail(res.stdout)
    return resources


def test_site_settings_reach_the_jobs(slurm_cluster, tmp_path):
    # docs/cluster.md: partition/account/runtime in the user's own profile, combined with ours.
    site = tmp_path / "mysite"
    site.mkdir()
    (site / "config.yaml").write_text(
        "default-resources:\n  slurm_partition: debug\n  runtime: 33\n  cpus_per_task: 1\n"
    )
    args = ["--profile", str(PROFILE), "--profile", str(site), "--workflow-profile", "none"]
    for line in _dry_run_resources(tmp_path, args):
        assert "slurm_partition=debug" in line and "runtime=33" in line, line


def test_profile_resources_survive_the_workflow_profile(slurm_cluster, tmp_path):
    # The plain entry point (SPEC §1): `snakemake --profile profiles/slurm`. Snakemake also
    # applies profiles/default, last, and a `default-resources` there replaces ours whole: then
    # the jobs silently lose their runtime (sbatch -t). profiles/default must not set it.
    for line in _dry_run_resources(tmp_path, ["--profile", str(PROFILE)]):
        assert "runtime=60" in line and "cpus_per_task=1" in line, line


# ---------------------------------------------------------------------------------------------
# (c, mechanics) --mem is enforced and a retry asks for more memory


def test_memory_kill_and_retry_on_tiny_workflow(slurm_cluster, tmp_path):
    # Allocates and touches 300 MB: more than attempt 1's 150 MB, less than attempt 2's 600 MB.
    (tmp_path / "Snakefile").write_text(
        textwrap.dedent(
            """
            rule all:
                input: "hog.txt"

            rule hog:
                output: "hog.txt"
                resources: mem_mb=lambda wc, attempt: 150 * attempt * attempt
                shell:
                    "python -c 'import time; b = bytearray(300 * 2**20); "
                    "b[::4096] = bytes(len(b[::4096])); time.sleep(3)' "
                    "&& echo {resources.mem_mb} > {output}"
            """
        )
    )
    res = _snakemake(["--profile", str(PROFILE), "--verbose", *FAST_POLL], cwd=tmp_path)
    assert res.returncode == 0, _tail(res.stdout)

    lines = _sbatch_lines(res.stdout, "hog")
    assert [int(MEM_RE.search(line).group(1)) for line in lines] == [150, 600], lines
    # the output was written by attempt 2, with its memory
    assert (tmp_path / "hog.txt").read_text().strip() == "600"

    submitted = SUBMITTED_RE.findall(res.stdout)
    states = _slurm_states([job_id for job_id, _ in submitted])
    expected = [("FAILED", "150M"), ("COMPLETED", "600M")]
    assert [states[job_id] for job_id, _ in submitted] == expected
    # SLURM (jobacct_gather OverMemoryKill) killed attempt 1 for its memory, not something else;
    # the plugin keeps the log of a failed job.
    first_log = Path(submitted[0][1]).read_text()
    assert "exceeded memory limit" in first_log, first_log


# ---------------------------------------------------------------------------------------------
# (b) + (c) + recovery: the demo workflow on the cluster, as one scenario
#
# Each SLURM job costs ~20-30 s here (two Snakemake start-ups per job on 2 shared cores), so the
# checks share one scenario instead of running the workflow once per check:
#   1. a local run (the reference);
#   2. a SLURM run whose submitting process is SIGKILLed as soon as cutout jobs are submitted;
#   3. the recovery of docs/cluster.md: a plain rerun is refused (lock), the run's jobs are
#      cancelled by its run ID, the directory is unlocked, and the same command is rerun;
#   4. in the rerun every cutout job's first attempt exceeds its --mem and is killed by SLURM,
#      the retry asks for more memory and succeeds;
# and the final outputs must equal the local run's.


def _demo_args(work: Path, out: Path) -> list[str]:
    demo = work / "demo_survey"
    return [
        "-s",
        str(SNAKEFILE),
        "--config",
        f"output_dir={out}",
        f"source_catalogue={demo / 'catalogue.csv'}",
        f"demo={{dir: {demo}, n_tiles: 1, n_sources: 40, tile_size: 600}}",
        "N_batch_cutout_process=20",
    ]


N_SOURCES = 40
SUBMITTED_CUTOUT_RE = re.compile(r"has been submitted with SLURM jobid \d+ \(log: \S+cutout_batch")

# Attempt 1 of every cutout job gets a --mem far below what a Python process with numpy needs
# (as if the memory model had underestimated), attempt 2 gets plenty. The workflow's own
# estimate cannot be forced below the real need (memory.safety_factor >= 1), so the rule's
# mem_mb is replaced here; `attempt` is what Snakemake passes on a retry.
STARVE_FIRST_ATTEMPT = "cutout_batch:mem_mb=60 if attempt == 1 else 1500 * attempt"


def _wait_for(path: Path, pattern: re.Pattern, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if pattern.search(text):
            return text
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before {pattern.pattern!r}:\n{text}")
        time.sleep(0.5)
    pytest.fail(f"no {pattern.pattern!r} within {timeout} s:\n{_tail(path.read_text())}")


def _active_jobs(run_id: str) -> str:
    return subprocess.run(
        ["squeue", "--noheader", "--name", run_id, "--states=PENDING,RUNNING,COMPLETING"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def demo_runs(slurm_cluster, tmp_path_factory):
    """The scenario above; returns what each step saw."""
    work = tmp_path_factory.mktemp("slurm_demo")
    local_out, slurm_out = work / "out_local", work / "out_slurm"
    seen: dict = {"work": work, "local": local_out, "slurm": slurm_out}

    # 1. reference. Same working directory as the SLURM runs, hence the same demo survey
    # files (batch ids hash the file paths).
    local = _snakemake(["--cores", "2", *_demo_args(work, local_out)], cwd=work)
    assert local.returncode == 0, "local run failed:\n" + _tail(local.stdout)

    # 2. the submitting process dies while cutout jobs are in SLURM's hands
    # (The workflow's own memory estimates here, so that the cutout jobs live long enough to be
    # left behind; the starved first attempts of step 4 die within a second.)
    run1_args = ["--profile", str(PROFILE), "--verbose", *FAST_POLL, *_demo_args(work, slurm_out)]
    args = [*run1_args, "--set-resources", STARVE_FIRST_ATTEMPT]
    log1 = work / "slurm_run1_killed.log"
    with open(log1, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", *run1_args],
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        text = _wait_for(log1, SUBMITTED_CUTOUT_RE, proc, timeout=RUN_TIMEOUT)
    finally:
        proc.kill()  # SIGKILL: no chance to cancel its jobs or to release its lock
        proc.wait()
    run_id = re.search(r"SLURM run ID: (\S+)", text).group(1)
    seen["log1"] = text
    seen["jobs_left_behind"] = _active_jobs(run_id)

    # 3. recovery: the lock of the dead process refuses a plain rerun ...
    seen["refused"] = _snakemake(args, cwd=work, timeout=300)
    # ... cancel the run's jobs by the run ID (their common job name) ...
    subprocess.run(["scancel", "--name", run_id], check=True)
    deadline = time.monotonic() + 60
    while _active_jobs(run_id) and time.monotonic() < deadline:
        time.sleep(1)
    seen["jobs_after_scancel"] = _active_jobs(run_id)
    # ... unlock, and rerun the same command.
    seen["unlock"] = _snakemake([*args, "--unlock"], cwd=work, timeout=300)
    assert seen["unlock"].returncode == 0, _tail(seen["unlock"].stdout)
    rerun = _snakemake(args, cwd=work)
    (work / "slurm_run2.log").write_text(rerun.stdout)
    assert rerun.returncode == 0, "SLURM rerun failed:\n" + _tail(rerun.stdout, 120)
    seen["log"] = rerun.stdout
    return seen


def _rel(df: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Paths inside the output directory made relative, so two output dirs compare equal."""
    df = df.copy()
    for col in df.columns:
        if df[col].dtype == object and df[col].map(lambda v: isinstance(v, str)).any():
            df[col] = df[col].map(
                lambda v: v.replace(str(out) + os.sep, "") if isinstance(v, str) else v
            )
    return df


def _batch_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("batch_cutout_process_"))


def _assert_same_outputs(local: Path, other: Path) -> None:
    """Index parquet, every batch's Zarr images and metadata, and summary counts are equal."""
    import zarr

    index_local = pd.read_parquet(local / "source_to_zarr_mapping.parquet")
    index_other = pd.read_parquet(other / "source_to_zarr_mapping.parquet")
    assert len(index_local) == N_SOURCES
    pd.testing.assert_frame_equal(_rel(index_local, local), _rel(index_other, other))

    # equal names also prove that no temporary folder of a killed job was left behind
    batches = _batch_names(local)
    assert batches == _batch_names(other)
    assert len(batches) >= N_SOURCES // 20  # N_batch_cutout_process=20
    n_images = 0
    for name in batches:
        img_local = zarr.open_group(local / name / "images.zarr", mode="r")["images"][:]
        img_other = zarr.open_group(other / name / "images.zarr", mode="r")["images"][:]
        np.testing.assert_array_equal(img_local, img_other)
        n_images += len(img_local)
        meta_local = pd.read_parquet(local / name / "images_metadata.parquet")
        meta_other = pd.read_parquet(other / name / "images_metadata.parquet")
        drop = ["processing_timestamp"]  # wall-clock time of processing, differs by design
        pd.testing.assert_frame_equal(meta_local.drop(columns=drop), meta_other.drop(columns=drop))
    assert n_images > 0

    summary_local = json.loads((local / "run_summary.json").read_text())
    summary_other = json.loads((other / "run_summary.json").read_text())
    for key in ("counts", "config_hash"):
        if key in summary_local:
            assert summary_local[key] == summary_other[key], key


def test_slurm_outputs_equal_local_run(demo_runs):
    _assert_same_outputs(demo_runs["local"], demo_runs["slurm"])


def test_recovery_after_submitting_process_died(demo_runs):
    # the dead submitter left its jobs in SLURM (that is why they must be cancelled) ...
    assert demo_runs["jobs_left_behind"], "no job of the killed run was left in the queue"
    # ... and its lock: a plain rerun is refused until --unlock
    refused = demo_runs["refused"]
    assert refused.returncode != 0
    assert "lock" in refused.stdout.lower(), _tail(refused.stdout)
    # scancel --name <run ID> removed all of them
    assert demo_runs["jobs_after_scancel"] == ""
    assert demo_runs["unlock"].returncode == 0


def test_cutout_jobs_killed_for_memory_then_retried_with_more(demo_runs):
    log = demo_runs["log"]
    n_batches = len(_batch_names(demo_runs["local"]))
    lines = _sbatch_lines(log, "cutout_batch")
    by_batch: dict[str, list[int]] = {}
    for line in lines:
        by_batch.setdefault(_target(line), []).append(int(MEM_RE.search(line).group(1)))
    # every batch: attempt 1 with the starved 60 MB, attempt 2 with 2 x 1500 MB, nothing more
    assert len(by_batch) == n_batches, lines
    assert all(mems == [60, 3000] for mems in by_batch.values()), by_batch

    # SLURM's view: each 60 MB job FAILED (killed), each 3000 MB job COMPLETED; the kill was
    # the memory limit (slurmstepd writes it into the job's log, which the plugin keeps).
    submitted = dict(SUBMITTED_RE.findall(log))
    states = _slurm_states(list(submitted))
    cutout_jobs = {j: s for j, s in states.items() if "cutout_batch" in submitted[j]}
    expected = [("COMPLETED", "3000M")] * n_batches + [("FAILED", "60M")] * n_batches
    assert sorted(cutout_jobs.values()) == expected, cutout_jobs
    for job_id, (state, _) in cutout_jobs.items():
        if state == "FAILED":
            assert "exceeded memory limit" in Path(submitted[job_id]).read_text()

    # the other rules ran as SLURM jobs too, each with a --mem
    for line in SBATCH_RE.findall(log):
        assert MEM_RE.search(line), line
    rules = {m.group(1) for m in re.finditer(r"--comment rule_(\w+?)(?:_wildcards\S*)?\s", log)}
    assert {"cutout_batch", "merge_index", "gallery"} <= rules, rules

    # Keep the real sbatch lines for docs/cluster.md and for the CI log.
    both_runs = demo_runs["log1"] + log
    excerpt = "\n".join(_short(line) for line in SBATCH_RE.findall(both_runs))
    (demo_runs["work"] / "sbatch_lines.txt").write_text(excerpt + "\n")
    print(excerpt)


def test_cutout_memory_comes_from_the_memory_model(demo_runs):
    # Run 1 used the workflow's own estimates: every cutout job's --mem must be the profiled
    # model's value for its batch (SPEC §3.2), so profiling must have run before any cutout
    # job was created (not the model's fallback for an unprofiled run).
    from cutana import memory_model

    log1 = demo_runs["log1"]
    calls = SBATCH_RE.findall(log1)
    first_cutout = next(i for i, c in enumerate(calls) if "--comment rule_cutout_batch" in c)
    assert any("--comment rule_profile_memory" in c for c in calls[:first_cutout]), calls

    model = memory_model.load_model(demo_runs["slurm"] / ".cutana" / "memory_model.json")
    for line in _sbatch_lines(log1, "cutout_batch"):
        batch = _target(line).split("batch=", 1)[1]
        mem = int(MEM_RE.search(line).group(1))
        assert mem == memory_model.mem_mb_for_batch(batch, model, 1), line


def test_stopping_a_slurm_run_cancels_its_queued_jobs(slurm_cluster, tmp_path, monkeypatch):
    """Ctrl-C of `cutana run --profile slurm` (Orchestrator.stop_processing): Snakemake waits
    for its cluster jobs on SIGTERM, so queued ones used to stay in SLURM and race the rerun."""
    from cutana import Orchestrator
    from cutana.demo import demo_config, make_demo_survey

    monkeypatch.chdir(tmp_path)  # the run's working directory (.snakemake, SLURM logs)
    make_demo_survey(tmp_path / "demo", n_tiles=1, tile_size=300, n_sources=10)
    config = {
        **demo_config(tmp_path / "demo"),
        "output_dir": str(tmp_path / "out"),
        "target_resolution": 16,
    }
    # A job holding every CPU of the one node keeps the run's first job pending.
    blocker = subprocess.run(
        ["sbatch", "--parsable", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 300"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        orchestrator = Orchestrator(
            config, profile=str(PROFILE), snakemake_args=FAST_POLL, poll_interval=0.5
        )
        assert orchestrator.start_processing(wait=False)["status"] == "running"
        _wait_for(orchestrator.log_path, re.compile(r"submitted with SLURM jobid"),
                  orchestrator._process, timeout=RUN_TIMEOUT)  # fmt: skip
        run_id = re.search(r"SLURM run ID: (\S+)", orchestrator.log_path.read_text()).group(1)
        assert _active_jobs(run_id)
        stopped = orchestrator.stop_processing(timeout=120)
        assert stopped["status"] == "stopped" and not stopped["killed"]
        assert _active_jobs(run_id) == ""
    finally:
        subprocess.run(["scancel", blocker], check=False)
