"""A warm process that forks the workflow's jobs on this machine (Linux, local runs).

A cutout job is a new Python process: ~0.1 s to start the interpreter and ~0.2 s to import
NumPy, pyarrow, OpenCV and numcodecs, against ~0.3 s of work for a 1000-source 64 px batch. The
Snakefile's ``onstart`` hook spawns a server (:func:`spawn_server`, :func:`serve`) while the
catalogue is split, whose job needs other imports; a job that finds none (hooks off, server
gone) and is one that starts it forks one after its imports (:func:`start_server`). The server
is a detached process listening on an abstract Unix socket. Every later job's command
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
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Sequence

# The client half (what a job's command runs), re-exported: the address and protocol live there.
from .job_client import (  # noqa: F401
    HEADER,
    RUN_VARIABLE,
    STATUS,
    SWITCH_VARIABLE,
    decode_request,
    enabled,
    recv_exactly,
    run_pid,
    run_via_server,
    server_address,
)

#: Seconds a server waits for a job before it exits.
IDLE_EXIT_S = 10.0

#: True in a worker forked by a server (the job logs it).
IN_WORKER = False

_PR_SET_PDEATHSIG = 1


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
        listener = _bind(address)
        if listener is not None:
            _serve(run_job, listener, owner)
    finally:
        os._exit(0)


def spawn_server(command: Sequence[str]) -> None:
    """Start ``command`` (which calls :func:`serve`) as a detached process; return at once.

    Snakemake's ``onstart`` hook calls it, so the server imports the jobs' modules on a core
    that is idle while the first, serial stages run. Its output is discarded: a server that
    fails to start only leaves the jobs to run in their own processes.
    """
    import subprocess  # here: a job's command imports this module, Snakemake's process spawns

    subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        close_fds=True,
        start_new_session=True,
    )


def serve(
    run_job: Callable[[list[str]], None],
    prepare: Callable[[], None] = lambda: None,
    address: bytes | None = None,
    owner: int | None = None,
) -> None:
    """Serve jobs in this process until the run ends (the body of a spawned server).

    The address is taken before ``prepare()`` (the imports) runs: a command that connects
    meanwhile waits for the server to be ready instead of starting a second one.

    Parameters
    ----------
    run_job : callable
        Runs one job from its argv in the worker (and exits it).
    prepare : callable, optional
        Loads what the jobs need (their imports), once, before the first job.
    address, owner
        As for :func:`start_server`.
    """
    address = address or server_address()
    owner = run_pid() if owner is None else owner
    listener = _bind(address)
    if listener is None:
        return
    prepare()
    _serve(run_job, listener, owner)


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


def _bind(address: bytes) -> socket.socket | None:
    """A listening socket on ``address``; None if another server is already there."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
    except OSError:
        listener.close()
        return None
    listener.listen(64)
    return listener


def _serve(run_job: Callable[[list[str]], None], listener: socket.socket, owner: int) -> None:
    try:
        owner_fd = os.pidfd_open(owner)
    except OSError:  # the run has already ended
        listener.close()
        return
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
                    conn.sendall(STATUS.pack(os.waitstatus_to_exitcode(status)))
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
        header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
        (size,) = HEADER.unpack(header)
        request = decode_request(recv_exactly(conn, size))
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
