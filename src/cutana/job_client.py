"""The command of a job a warm server may run: hand it over, or run it in a new process.

The rules of the jobs after the catalogue split run ``python -I -S <this file> STEP ARGS...``:
Python without its ``site`` initialisation (no ``.pth`` files, no site-packages) and isolated
(this file's folder, cutana's, is not on the module path), importing only the standard
library. If the run's warm server (:mod:`cutana.warm_jobs`) takes the job, this process waits
for its worker and exits with its status; otherwise it becomes ``python -m
cutana.workflow_jobs STEP ARGS...`` (``exec``, same PID, environment and streams). Measured on
the benchmark machine: 22 ms to start this command and connect against 55 ms for ``python -m
cutana.workflow_jobs``, which a 1000-source 64 px job (0.17 s of work) pays once per job.

This module is also the client half of :mod:`cutana.warm_jobs` (which imports it): the socket
address of a run's server and the request it expects are defined here only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import struct
import sys

#: Environment variable that turns the warm server off when set to ``0``.
SWITCH_VARIABLE = "CUTANA_WARM_JOBS"

#: Environment variable holding the PID of the run's Snakemake process (set by the Snakefile).
RUN_VARIABLE = "CUTANA_RUN_PID"

#: Length prefix of a request; exit status of a worker.
HEADER = struct.Struct("!I")
STATUS = struct.Struct("!i")


@functools.lru_cache(maxsize=1)
def _pidfds_work() -> bool:
    """Whether this kernel gives process file descriptors (Linux >= 5.3; not every sandbox)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def enabled(env=None) -> bool:
    """Whether jobs should use (and start) a warm server here.

    Not where ``SLURM_JOB_ID`` is set (a cluster job has one job per allocation and SLURM
    ends its processes with it), without :data:`RUN_VARIABLE` (a job run by hand), with
    ``CUTANA_WARM_JOBS=0``, nor where Linux process file descriptors do not work.
    """
    env = os.environ if env is None else env
    return (
        sys.platform.startswith("linux")
        and _pidfds_work()
        and env.get(SWITCH_VARIABLE, "1") != "0"
        and "SLURM_JOB_ID" not in env
        and env.get(RUN_VARIABLE, "").isdigit()
    )


def run_pid() -> int:
    """The PID of the run's Snakemake process (:data:`RUN_VARIABLE`)."""
    return int(os.environ[RUN_VARIABLE])


def server_address() -> bytes:
    """The abstract Unix socket name of the server of this run, user, interpreter and code."""
    package = os.path.dirname(os.path.realpath(__file__))
    digest = hashlib.sha256()
    digest.update(f"{os.getuid()}\0{sys.executable}\0{package}\0{run_pid()}\0".encode())
    with os.scandir(package) as entries:
        sources = sorted(
            (entry.name, entry.stat()) for entry in entries if entry.name.endswith(".py")
        )
    for name, stat in sources:
        digest.update(f"{name}\0{stat.st_mtime_ns}\0{stat.st_size}\0".encode())
    return b"\0cutana-warm-jobs-" + digest.hexdigest()[:24].encode()


def recv_exactly(conn: socket.socket, n_bytes: int) -> bytes:
    """``n_bytes`` bytes from ``conn``; ConnectionError if it closes first."""
    data = b""
    while len(data) < n_bytes:
        chunk = conn.recv(n_bytes - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def run_via_server(argv, address: bytes | None = None) -> int | None:
    """Run a job in a worker of the server; its exit status, or None if no server took it.

    Parameters
    ----------
    argv : sequence of str
        The job's arguments (``python -m cutana.workflow_jobs`` ``argv``).
    address : bytes, optional
        The server's socket name (default: :func:`server_address`).

    Returns
    -------
    int or None
        The worker's exit status (128 + N for a worker ended by signal N); None when no
        server answered (the caller runs the job itself). A server that dies while its worker
        runs gives status 1.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(address or server_address())
        request = json.dumps(
            {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}
        ).encode("utf-8")
        sys.stdout.flush()
        sys.stderr.flush()
        socket.send_fds(conn, [HEADER.pack(len(request)) + request], [0, 1, 2])
        accepted = conn.recv(1)
    except OSError:
        conn.close()
        return None
    if accepted != b"+":  # refused (or the server is exiting): run the job here
        conn.close()
        return None
    try:
        (status,) = STATUS.unpack(recv_exactly(conn, STATUS.size))
    except (OSError, ConnectionError):
        status = 1  # the server died with the worker (PR_SET_PDEATHSIG)
    conn.close()
    return 128 - status if status < 0 else status


def main(argv: list[str] | None = None) -> None:
    """Hand the job to the run's warm server, else ``exec`` ``python -m cutana.workflow_jobs``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if enabled():
        status = run_via_server(argv)
        if status is not None:
            os._exit(status)
    # The job's own process (with site-packages): it may start a server (workflow_jobs).
    os.execv(sys.executable, [sys.executable, "-m", "cutana.workflow_jobs", *argv])


if __name__ == "__main__":
    main()
