"""A warm process that forks the workflow's jobs on this machine (Linux, local runs).

A cutout job is a new Python process: ~0.1 s to start the interpreter and ~0.2 s to import
NumPy, pyarrow, OpenCV and numcodecs, against ~0.3 s of work for a 1000-source 64 px batch. The
Snakefile's ``onstart`` hook spawns a server (:func:`spawn_server`, :func:`serve`) while the
catalogue is split, whose job needs other imports; a job that finds none (hooks off, server
gone) and is one that starts it forks one after its imports (:func:`start_server`). The server
is a detached process listening on an abstract Unix socket. Every later job's command
connects to it and hands over its arguments, environment, working directory and standard
streams; the server gives the job to a worker (a copy of itself forked with the imports done)
that runs it exactly as the command would, and sends back its exit status, which the command
exits with. A worker whose job is of a reusable kind (the cutout jobs) and succeeded waits for
the next job instead of exiting: a freshly forked worker first copies the server's pages it
writes to and faults in new memory for its arrays, ~0.05 s of a 1000-source 64 px job
(0.14 s in a reused worker against 0.19 s in a new one, 1 channel; 0.37 against 0.43 s with
3). Each job still gets its own streams, directory, environment and warnings, and its log
reports its own peak memory.

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
* a failed job ends its worker, and a reused worker is replaced after
  :data:`MAX_JOBS_PER_WORKER` jobs;
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
import dataclasses
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Collection, Sequence

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

#: Jobs a reused worker runs before it exits (the server then forks a fresh one): bounds what
#: a slow leak or a growing cache could gather over a long run.
MAX_JOBS_PER_WORKER = 64

#: True in a worker forked by a server (the job logs it).
IN_WORKER = False

_PR_SET_PDEATHSIG = 1

#: A worker's report to its server after a job: the exit status, and whether it waits for
#: another job (else it exits).
_JOB_DONE = struct.Struct("!i?")


def start_server(
    run_job: Callable[[list[str]], None],
    address: bytes | None = None,
    owner: int | None = None,
    reusable: Collection[str] = (),
) -> None:
    """Fork a detached server that runs jobs with ``run_job(argv)``; return at once.

    Call it after the imports the jobs need and before any job work, so that the server (and
    every worker it forks) holds the modules but no data. If another server already listens
    on the address, the new one exits.

    Parameters
    ----------
    run_job : callable
        Runs one job from its argv in the worker and returns (or raises ``SystemExit``).
    address : bytes, optional
        Socket name (default: :func:`server_address`).
    owner : int, optional
        PID whose end ends the server (default: :func:`run_pid`).
    reusable : collection of str, optional
        Steps (``argv[0]``) whose worker, once the job has succeeded, stays for the next job.
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
            _serve(run_job, listener, owner, reusable)
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
    reusable: Collection[str] = (),
) -> None:
    """Serve jobs in this process until the run ends (the body of a spawned server).

    The address is taken before ``prepare()`` (the imports) runs: a command that connects
    meanwhile waits for the server to be ready instead of starting a second one.

    Parameters
    ----------
    run_job : callable
        Runs one job from its argv in the worker and returns (or raises ``SystemExit``).
    prepare : callable, optional
        Loads what the jobs need (their imports), once, before the first job.
    address, owner, reusable
        As for :func:`start_server`.
    """
    address = address or server_address()
    owner = run_pid() if owner is None else owner
    listener = _bind(address)
    if listener is None:
        return
    prepare()
    _serve(run_job, listener, owner, reusable)


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


@dataclasses.dataclass(eq=False)  # compared by identity (membership, removal)
class _Worker:
    """A worker process as the server sees it."""

    pid: int
    pidfd: int  # readable once the process has ended
    control: socket.socket  # the server's end of the worker's socket pair
    client: socket.socket | None = None  # the command whose job it runs; None while idle
    stays: bool = True  # False once it has said it exits after its job


def _serve(
    run_job: Callable[[list[str]], None],
    listener: socket.socket,
    owner: int,
    reusable: Collection[str] = (),
) -> None:
    try:
        owner_fd = os.pidfd_open(owner)
    except OSError:  # the run has already ended
        listener.close()
        return
    workers: list[_Worker] = []
    idle_since = time.monotonic()
    run_over = False
    while True:
        busy = [worker for worker in workers if worker.client is not None]
        if run_over and not busy:
            break
        timeout = None if busy else IDLE_EXIT_S - (time.monotonic() - idle_since)
        if timeout is not None and timeout <= 0:
            break
        watched: dict = {worker.pidfd: worker for worker in workers}
        watched.update({worker.control.fileno(): worker for worker in busy})
        watched.update({worker.client.fileno(): worker for worker in busy})
        if not run_over:
            watched.update({listener.fileno(): listener, owner_fd: owner_fd})
        ready, _, _ = select.select(list(watched), [], [], timeout)
        for fd in ready:
            item = watched[fd]
            if item is listener:
                _accept(listener, run_job, workers, reusable)
            elif item is owner_fd:
                # The run ended: new commands are refused (they run their jobs themselves),
                # the running workers finish.
                run_over = True
                listener.close()
            elif item not in workers:  # already reaped in this round
                continue
            elif fd == item.pidfd:
                _reap(item, workers)
            elif fd == item.control.fileno():
                _job_done(item, workers)
            elif item.client is not None and _closed(item.client):
                # The command ended before its job: it was cancelled.
                os.kill(item.pid, signal.SIGKILL)
        if busy:  # idle time counts from the end of the last job
            idle_since = time.monotonic()
    listener.close()
    os.close(owner_fd)
    for worker in workers:  # idle workers read the end of their socket and exit
        worker.control.close()


def _report(worker: _Worker, status: int) -> None:
    """Send the exit status of the worker's job to its command; the worker is idle again."""
    if worker.client is None:
        return
    try:
        worker.client.sendall(STATUS.pack(status))
    except OSError:
        pass
    worker.client.close()
    worker.client = None


def _reap(worker: _Worker, workers: list[_Worker]) -> None:
    """The worker process ended: wait for it and, if it was busy, report its job's status.

    That is the status the worker sent before it exited (its end may be seen before its
    report is read), else its exit status (killed or crashed: 128 + signal for the command).
    """
    _, exit_status = os.waitpid(worker.pid, 0)
    status = os.waitstatus_to_exitcode(exit_status)
    if worker.client is not None:
        try:
            report = worker.control.recv(_JOB_DONE.size, socket.MSG_DONTWAIT)
        except OSError:
            report = b""
        if len(report) == _JOB_DONE.size:
            status = _JOB_DONE.unpack(report)[0]
    os.close(worker.pidfd)
    worker.control.close()
    workers.remove(worker)
    _report(worker, status)


def _job_done(worker: _Worker, workers: list[_Worker]) -> None:
    """The worker reports its job's status, or its socket ended (the process is exiting)."""
    try:
        status, worker.stays = _JOB_DONE.unpack(recv_exactly(worker.control, _JOB_DONE.size))
    except (OSError, ConnectionError):
        _reap(worker, workers)
    else:
        _report(worker, status)


def _closed(conn: socket.socket) -> bool:
    try:
        return not conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True


def _accept(listener, run_job, workers: list[_Worker], reusable: Collection[str]) -> None:
    conn, _ = listener.accept()
    try:
        if _peer_uid(conn) != os.getuid():
            conn.close()
            return
        header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
        (size,) = HEADER.unpack(header)
        request = recv_exactly(conn, size)
        decode_request(request)
    except (OSError, ValueError, struct.error, ConnectionError):
        conn.close()
        return
    try:
        worker = _hand_over(request, fds, run_job, listener, workers, reusable)
    finally:
        for fd in fds:
            os.close(fd)
    if worker is None:
        conn.close()
        return
    try:
        conn.sendall(b"+")
    except OSError:  # the command is gone already
        conn.close()
        os.kill(worker.pid, signal.SIGKILL)
        return
    worker.client = conn


def _hand_over(request: bytes, fds, run_job, listener, workers, reusable) -> _Worker | None:
    """Send a job (request and the command's streams) to an idle worker, else to a new one."""
    if len(fds) != 3:
        return None
    message = [HEADER.pack(len(request)) + request]
    for worker in [worker for worker in workers if worker.client is None and worker.stays]:
        try:
            socket.send_fds(worker.control, message, fds)
        except OSError:  # it has just ended: reaped when its pidfd is seen
            continue
        return worker
    worker = _fork_worker(run_job, listener, workers, reusable, fds)
    try:
        socket.send_fds(worker.control, message, fds)
    except OSError:
        os.kill(worker.pid, signal.SIGKILL)
        return None
    return worker


def _fork_worker(run_job, listener, workers: list[_Worker], reusable, fds) -> _Worker:
    """Fork a worker (a copy of the server: imports done, no data) and add it to ``workers``.

    ``fds`` are the streams of the command being served, open in the server while it forks:
    the worker closes its copies (it receives its jobs' streams from its socket), or a
    command's output would stay open after its job.
    """
    server_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            listener.close()
            server_end.close()
            for fd in fds:
                os.close(fd)
            for other in workers:  # the other workers' sockets and commands are not its own
                os.close(other.pidfd)
                other.control.close()
                if other.client is not None:
                    other.client.close()
            _worker_loop(run_job, worker_end, reusable)
        finally:
            os._exit(1)
    worker_end.close()
    worker = _Worker(pid, os.pidfd_open(pid), server_end)
    workers.append(worker)
    return worker


def _worker_loop(run_job: Callable[[list[str]], None], control: socket.socket, reusable) -> None:
    """In a forked worker: run the jobs the server sends, one at a time, and report each.

    A job whose step is in ``reusable`` leaves the worker for the next job when it succeeds
    (up to :data:`MAX_JOBS_PER_WORKER`): its heap and the pages it has written are then
    reused instead of being copied from the server or zeroed anew. Any other job, and a
    failed one, ends the worker.
    """
    global IN_WORKER
    IN_WORKER = True
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the server died between fork and prctl
        os._exit(1)
    own_streams = [os.dup(fd) for fd in (0, 1, 2)]
    own_filters = list(warnings.filters)
    last = MAX_JOBS_PER_WORKER - 1
    for served in range(MAX_JOBS_PER_WORKER):
        try:
            header, fds, _, _ = socket.recv_fds(control, HEADER.size, 3)
            if not header:  # the server has no more jobs for it
                os._exit(0)
            (size,) = HEADER.unpack(header)
            request = decode_request(recv_exactly(control, size))
        except (OSError, ValueError, struct.error, ConnectionError):
            os._exit(1)
        status = _run_job(run_job, request, fds, own_filters)
        for target, own in zip((0, 1, 2), own_streams, strict=True):
            os.dup2(own, target)
        argv = request["argv"]
        stays = status == 0 and bool(argv) and argv[0] in reusable and served < last
        control.sendall(_JOB_DONE.pack(status, stays))
        if not stays:
            break
    os._exit(0)


def _run_job(run_job, request: dict, fds: list[int], filters: list) -> int:
    """Run one job as its command would: its streams, directory, environment; its status."""
    status = 1
    try:
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        # Python's stream objects on the job's descriptors 0-2.
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # As in a new process: the worker's own filters, and every warning shown again once.
        warnings.resetwarnings()
        warnings.filters[:] = filters
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
        except OSError:
            pass
    return status
