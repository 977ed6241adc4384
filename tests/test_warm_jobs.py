"""cutana.warm_jobs: the warm server runs jobs exactly as the command would (outputs, exit
status, standard streams), stops their workers when the command is cancelled, serves only its
user and exits when idle; the job commands fall back to running in-process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cutana import job_client, warm_jobs

pytestmark = pytest.mark.skipif(
    not warm_jobs.enabled({warm_jobs.RUN_VARIABLE: "1"}), reason="Linux pidfd needed"
)


def job(argv: list[str]) -> None:
    """A job for the test server: ``write PATH TEXT``, ``fail CODE``, ``raise``, ``sleep PATH``,
    ``pid PATH`` (writes the worker's PID, directory and ``JOB_TAG``)."""
    if argv[0] == "write":
        Path(argv[1]).write_text(f"{argv[2]} {os.getcwd()} {os.environ.get('JOB_TAG')}")
        print("written", flush=True)
    elif argv[0] == "fail":
        print("failing on purpose", file=sys.stderr, flush=True)
        raise SystemExit(int(argv[1]))
    elif argv[0] == "raise":
        raise ValueError("the job broke")
    elif argv[0] == "sleep":
        Path(argv[1]).write_text(str(os.getpid()))
        time.sleep(60)
    elif argv[0] == "pid":
        Path(argv[1]).write_text(f"{os.getpid()} {os.getcwd()} {os.environ.get('JOB_TAG')}")
        print("pid written", flush=True)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(warm_jobs, "IDLE_EXIT_S", 1.0)
    address = b"\0cutana-test-" + uuid.uuid4().hex.encode()
    warm_jobs.start_server(job, address, owner=os.getpid())
    assert wait_for(lambda: accepts(address))  # the server binds just after start_server returns
    return address


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def accepts(address: bytes) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
        return True


def test_a_job_runs_in_a_worker_with_the_callers_directory_and_environment(
    server, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JOB_TAG", "tag-1")
    status = warm_jobs.run_via_server(["write", str(tmp_path / "out.txt"), "hello"], server)
    assert status == 0
    assert (tmp_path / "out.txt").read_text() == f"hello {tmp_path} tag-1"


def test_exit_status_and_errors_reach_the_caller(server):
    assert warm_jobs.run_via_server(["fail", "3"], server) == 3
    assert warm_jobs.run_via_server(["raise"], server) == 1
    # The worker writes to the command's own standard streams.
    client = subprocess.run(
        [sys.executable, "-c",
         "import sys; from cutana import warm_jobs; "
         f"sys.exit(warm_jobs.run_via_server(['raise'], {server!r}))"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert client.returncode == 1
    assert "ValueError: the job broke" in client.stderr


def test_a_reusable_job_leaves_its_worker_for_the_next_one(monkeypatch, tmp_path):
    monkeypatch.setattr(warm_jobs, "IDLE_EXIT_S", 1.0)
    address = b"\0cutana-test-" + uuid.uuid4().hex.encode()
    warm_jobs.start_server(job, address, owner=os.getpid(), reusable={"pid", "fail"})
    assert wait_for(lambda: accepts(address))

    def worker_of(name, tag=None):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        if tag is None:
            monkeypatch.delenv("JOB_TAG", raising=False)
        else:
            monkeypatch.setenv("JOB_TAG", tag)
        assert warm_jobs.run_via_server(["pid", str(folder / "out")], address) == 0
        pid, cwd, seen_tag = (folder / "out").read_text().split()
        assert (cwd, seen_tag) == (str(folder), str(tag))  # each job's own directory and env
        return pid

    first = worker_of("a", tag="tag-a")
    assert worker_of("b") == first  # the same worker, without the first job's JOB_TAG
    assert warm_jobs.run_via_server(["fail", "2"], address) == 2
    # A failed job ends its worker (after the job of "b", the worker was idle and took it).
    assert worker_of("c") != first


def test_other_jobs_get_a_fresh_worker_each(server, tmp_path):
    pids = set()
    for name in ("a", "b"):
        assert warm_jobs.run_via_server(["pid", str(tmp_path / name)], server) == 0
        pids.add((tmp_path / name).read_text().split()[0])
    assert len(pids) == 2


def test_a_reused_worker_does_not_keep_the_commands_output_open(tmp_path):
    # Snakemake reads a job's output until its end: a worker that waits for its next job
    # must hold no copy of the finished command's streams (nor of those it was forked with).
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    address = b"\0cutana-test-" + uuid.uuid4().hex.encode()
    warm_jobs.start_server(job, address, owner=run.pid, reusable={"pid"})
    assert wait_for(lambda: accepts(address))
    try:
        for name in ("a", "b"):
            client = subprocess.run(
                [sys.executable, "-c",
                 "import sys; from cutana import warm_jobs; sys.exit(warm_jobs.run_via_server("
                 f"['pid', {str(tmp_path / name)!r}], {address!r}))"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            assert client.returncode == 0 and client.stdout == "pid written\n"
        assert (tmp_path / "a").read_text().split()[0] == (tmp_path / "b").read_text().split()[0]
    finally:
        run.kill()
        run.wait()


def test_without_a_server_the_caller_is_told_to_run_the_job_itself():
    address = b"\0cutana-test-none-" + uuid.uuid4().hex.encode()
    assert warm_jobs.run_via_server(["fail", "3"], address) is None


def test_the_server_exits_when_idle(server):
    assert accepts(server)
    assert wait_for(lambda: not accepts(server), seconds=5.0)


def test_a_cancelled_command_stops_its_worker(server, tmp_path):
    # The command is a separate process (as a Snakemake job is); killing it kills the worker.
    pid_file = tmp_path / "worker.pid"
    client = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from cutana import warm_jobs; "
         f"sys.exit(warm_jobs.run_via_server(['sleep', {str(pid_file)!r}], {server!r}))"],
    )  # fmt: skip
    assert wait_for(pid_file.exists)
    assert wait_for(lambda: pid_file.read_text() != "")
    worker = int(pid_file.read_text())
    client.send_signal(signal.SIGKILL)
    client.wait()

    def worker_gone():
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return True
        # A zombie until the server reaps it.
        return Path(f"/proc/{worker}/stat").read_text().split()[2] == "Z"

    assert wait_for(worker_gone)


def test_the_server_ends_with_its_run(tmp_path):
    # The owner stands for the run's Snakemake process: once it has ended, new commands are
    # refused (they run their jobs themselves) and the server exits.
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    address = b"\0cutana-test-" + uuid.uuid4().hex.encode()
    warm_jobs.start_server(job, address, owner=run.pid)
    assert wait_for(lambda: accepts(address))
    assert warm_jobs.run_via_server(["write", str(tmp_path / "a"), "x"], address) == 0
    run.kill()
    run.wait()
    assert wait_for(lambda: not accepts(address), seconds=2.0)
    assert warm_jobs.run_via_server(["write", str(tmp_path / "b"), "x"], address) is None


def test_a_spawned_server_takes_its_address_before_its_imports(tmp_path):
    # `serve` (the server the onstart hook spawns) binds, then prepares: a command arriving
    # while it imports waits for it instead of running its job elsewhere.
    address = b"\0cutana-test-" + uuid.uuid4().hex.encode()
    ready = tmp_path / "prepared"

    def prepare():
        time.sleep(1.0)
        ready.write_text("imports done")

    def job_after_prepare(argv):
        Path(argv[0]).write_text(ready.read_text())

    pid = os.fork()
    if pid == 0:  # the spawned server's process, ended with this test's process
        try:
            warm_jobs.serve(job_after_prepare, prepare, address, owner=os.getppid())
        finally:
            os._exit(0)
    try:
        assert wait_for(lambda: accepts(address))
        assert not ready.exists()
        assert warm_jobs.run_via_server([str(tmp_path / "out")], address) == 0
        assert (tmp_path / "out").read_text() == "imports done"
        # A second server for the same address gives way at once, without preparing.
        warm_jobs.serve(job, lambda: pytest.fail("a second server prepared"), address, os.getpid())
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_the_job_command_hands_its_job_to_the_runs_server(monkeypatch, tmp_path):
    # The rules' command: `python -I -S job_client.py ARGS` (no site-packages, so no cutana
    # import) finds the server of its run by the address both compute.
    monkeypatch.setattr(warm_jobs, "IDLE_EXIT_S", 1.0)
    monkeypatch.setenv(warm_jobs.RUN_VARIABLE, str(os.getpid()))
    warm_jobs.start_server(job, warm_jobs.server_address(), owner=os.getpid())
    assert wait_for(lambda: accepts(warm_jobs.server_address()))
    command = [sys.executable, "-I", "-S", job_client.__file__]
    done = subprocess.run([*command, "write", str(tmp_path / "out"), "hi"], cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "out").read_text().startswith(f"hi {tmp_path}")
    failed = subprocess.run([*command, "fail", "4"], capture_output=True, text=True)
    assert failed.returncode == 4 and "failing on purpose" in failed.stderr


def test_without_a_server_the_job_command_runs_the_job_itself(monkeypatch):
    # It becomes `python -m cutana.workflow_jobs ARGS` (exec): here, that command's help.
    monkeypatch.setenv(warm_jobs.SWITCH_VARIABLE, "0")
    done = subprocess.run(
        [sys.executable, "-I", "-S", job_client.__file__, "gallery", "--help"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0
    assert "usage: python -m cutana.workflow_jobs gallery" in done.stdout


def test_cluster_jobs_jobs_run_by_hand_and_the_switch_turn_it_off():
    run = {warm_jobs.RUN_VARIABLE: "1234"}
    assert warm_jobs.enabled(run)
    assert not warm_jobs.enabled({})  # not started by the workflow
    assert not warm_jobs.enabled({**run, "SLURM_JOB_ID": "42"})
    assert not warm_jobs.enabled({**run, warm_jobs.SWITCH_VARIABLE: "0"})


def test_the_address_is_per_run_user_and_code(monkeypatch):
    monkeypatch.setenv(warm_jobs.RUN_VARIABLE, "1234")
    address = warm_jobs.server_address()
    assert address.startswith(b"\0cutana-warm-jobs-") and address == warm_jobs.server_address()
    monkeypatch.setenv(warm_jobs.RUN_VARIABLE, "1235")
    assert warm_jobs.server_address() != address


def test_requests_round_trip_and_anything_else_is_refused():
    request = job_client.encode_request(["cutout_batch", "--log", "x.log"], "/tmp", {"A": "1"})
    assert job_client.decode_request(request) == {
        "argv": ["cutout_batch", "--log", "x.log"], "cwd": "/tmp", "env": {"A": "1"},
    }  # fmt: skip
    for bad in (b"", b"not marshal", job_client.marshal.dumps([1, 2])):
        with pytest.raises(ValueError, match="not a job request"):
            job_client.decode_request(bad)
    for bad in ({"argv": "a", "cwd": "/", "env": {}}, {"argv": [], "cwd": "/", "env": {1: "x"}}):
        with pytest.raises(ValueError, match="wrong type"):
            job_client.decode_request(job_client.marshal.dumps(bad))


def test_the_job_command_imports_no_pure_python_library_modules():
    # Its start-up is paid once per job: socket, json, hashlib or functools would import enum,
    # re and more (22 ms instead of 9 ms to start, on the benchmark machine).
    probe = "import sys; import job_client; print(' '.join(sorted(sys.modules)))"
    folder = os.path.dirname(job_client.__file__)
    modules = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {folder!r}); {probe}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "job_client" in modules
    assert not {"socket", "json", "hashlib", "functools", "enum", "re"} & set(modules), modules
