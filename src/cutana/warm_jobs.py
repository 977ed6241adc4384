"""A warm process that forks the workflow's jobs on this machine (Linux, local runs).

A cutout job is a new Python process: ~0.1 s to start the interpreter and ~0.2 s to import
NumPy, pyarrow, OpenCV and numcodecs, against ~0.3 s of work for a 1000-source 64 px batch. The
first job of a run that finds no server (the memory profiling job, normally) forks one after
its imports: a detached process listening on an abstract Unix socket. Every later job's command
connects to it and hands over its arguments, environment, working directory and standard
streams; the server forks a worker (a copy of itself, imports done) that runs the job exactly
as the command would, and sends back its exit status, which the command exits with.

Each run has its own server: the Snakefile puts the Snakemake process's PID in
:data:`RUN_VARIABLE`, which every job inherits and which names the socket. The server exits
once that process has ended (and its last worker with it), or after :data:`IDLE_EXIT_S`
seconds without a job.

Safety:

* the job's outputs are written as before (temporary name, fsync, rename): a worker killed at
  any point leaves nothing half-written;
* a command whose server is gone or refuses runs the job itself: a server only saves time;
* when a command dies (Snakemake cancels the job), the server kills its worker; when the
  server dies, its workers die with it (``PR_SET_PDEATHSIG``) and their commands fail;
* only processes of the same user are served (``SO_PEERCRED``), and the socket's name carries
  a hash of the interpreter, the user and cutana's source files: a server never runs other
  code than the command would;
* nothing outlives the run: the server exits when its Snakemake process does.

Not used where ``SLURM_JOB_ID`` is set (a cluster job has one job per allocation and SLURM
ends its processes with it), without :data:`RUN_VARIABLE` (a job run by hand) or with
``CUTANA_WARM_JOBS=0``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: Seconds a server waits for a job before it exits.
IDLE_EXIT_S = 10.0

#: Environment variable that turns the warm server off when set to ``0``.
SWITCH_VARIABLE = "CUTANA_WARM_JOBS"

#: Environment variable holding the PID of the run's Snakemake process (set by the Snakefile).
RUN_VARIABLE = "CUTANA_RUN_PID"

#: True in a worker forked by a server (the job logs it).
IN_WORKER = False

_HEADER = struct.Struct("!I")
_STATUS = struct.Struct("!i")
_PR_SET_PDEATHSIG = 1


@functools.lru_cache(maxsize=1)
def _pidfds_work() -> bool:
    """Whether this kernel gives process file descriptors (Linux >= 5.3; not every sandbox)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether jobs should use (and start) a warm server here."""
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
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    digest.update(f"{os.getuid()}\0{sys.executable}\0{package}\0{run_pid()}\0".encode())
    for path in sorted(package.glob("*.py")):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_mtime_ns}\0{stat.st_size}\0".encode())
    return b"\0cutana-warm-jobs-" + digest.hexdigest()[:24].encode()


def _recv_exactly(conn: socket.socket, n_bytes: int) -> bytes:
    data = b""
    while len(data) < n_bytes:
        chunk = conn.recv(n_bytes - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def run_via_server(argv: Sequence[str], address: bytes | None = None) -> int | None:
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
        socket.send_fds(conn, [_HEADER.pack(len(request)) + request], [0, 1, 2])
        accepted = conn.recv(1)
    except OSError:
        conn.close()
        return None
    if accepted != b"+":  # refused (or the server is exiting): run the job here
        conn.close()
        return None
    try:
        (status,) = _STATUS.unpack(_recv_exactly(conn, _STATUS.size))
    except (OSError, ConnectionError):
        status = 1  # the server died with the worker (PR_SET_PDEATHSIG)
    conn.close()
    return 128 - status if status < 0 else status


def start_server(
    run_job: Callable[[list[str]], None], address: bytes | None = None, owner: int | None = None
) -> None:
    """Fork a detached server that runs jobs with ``run_job(argv)``; return at once.

    Call it after the imports the jobs need and before any job work, so that the server (and
    every worker it forks) holds the modules but no data. If another server already listens
    on the address, the new one exits.

    Parameters
    ----------
    run_job : callable
        Runs one job from its argv in the worker (and exits it).
    address : bytes, optional
        Socket name (default: :func:`server_address`).
    owner : int, optional
        PID whose end ends the server (default: :func:`run_pid`).
    """
    address = address or server_address()
    owner = run_pid() if owner is None else owner
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)  # the intermediate child exits at once
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        _detach()
        _serve(run_job, address, owner)
    finally:
        os._exit(0)


def _detach() -> None:
    """No inherited streams or files: Snakemake must see the starting job's output end."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.closerange(3, 1024)
    os.chdir("/")


def _peer_uid(conn: socket.socket) -> int:
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


def _serve(run_job: Callable[[list[str]], None], address: bytes, owner: int) -> None:
    try:
        owner_fd = os.pidfd_open(owner)
    except OSError:  # the run has already ended
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
    except OSError:  # another server is already there
        return
    listener.listen(64)
    workers: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, client connection)
    idle_since = time.monotonic()
    run_over = False
    while not (run_over and not workers):
        timeout = None if workers else IDLE_EXIT_S - (time.monotonic() - idle_since)
        if timeout is not None and timeout <= 0:
            break
        watched = [*workers, *(conn for _, conn in workers.values())]
        if not run_over:
            watched += [listener, owner_fd]
        ready, _, _ = select.select(watched, [], [], timeout)
        for item in ready:
            if item is listener:
                _accept(listener, run_job, workers)
            elif isinstance(item, int) and item == owner_fd:
                # The run ended: new commands are refused (they run their jobs themselves),
                # the running workers finish.
                run_over = True
                listener.close()
            elif isinstance(item, int):  # a worker ended: report its status
                pid, conn = workers.pop(item)
                _, status = os.waitpid(pid, 0)
                os.close(item)
                try:
                    conn.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass
                conn.close()
            else:  # a client's connection is readable: it ended, its job was cancelled
                for pid, conn in list(workers.values()):
                    if conn is item and _closed(conn):
                        os.kill(pid, signal.SIGKILL)
        if workers:  # idle time counts from the end of the last job
            idle_since = time.monotonic()
    listener.close()
    os.close(owner_fd)


def _closed(conn: socket.socket) -> bool:
    try:
        return not conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True


def _accept(listener, run_job, workers) -> None:
    conn, _ = listener.accept()
    try:
        if _peer_uid(conn) != os.getuid():
            conn.close()
            return
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        (size,) = _HEADER.unpack(header)
        request = json.loads(_recv_exactly(conn, size))
    except (OSError, ValueError, struct.error, ConnectionError):
        conn.close()
        return
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    conn.sendall(b"+")
    pid = os.fork()
    if pid == 0:
        listener.close()
        _run_worker(run_job, request, fds)
    for fd in fds:
        os.close(fd)
    workers[os.pidfd_open(pid)] = (pid, conn)


def _run_worker(run_job: Callable[[list[str]], None], request: dict, fds: list[int]) -> None:
    """In the forked worker: become the job's process, run it, exit with its status."""
    global IN_WORKER
    IN_WORKER = True
    status = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the server died between fork and prctl
            os._exit(1)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        # Python's stream objects on the new descriptors 0-2 (the server's own are detached).
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        run_job(list(request["argv"]))
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the job's stderr, as Python would
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
