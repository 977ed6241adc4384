"""The command of a job a warm server may run: hand it over, or run it in a new process.

The rules of the jobs after the catalogue split run ``python -I -S <this file> STEP ARGS...``:
Python without its ``site`` initialisation (no ``.pth`` files, no site-packages) and isolated
(this file's folder, cutana's, is not on the module path), importing only the standard
library's built-in modules. If the run's warm server (:mod:`cutana.warm_jobs`) takes the job,
this process waits for its worker and exits with its status; otherwise it becomes ``python -m
cutana.workflow_jobs STEP ARGS...`` (``exec``, same PID, environment and streams). It avoids
``socket``, ``json``, ``hashlib`` and ``functools`` (each imports pure-Python modules such as
``enum`` and ``re``): measured on the benchmark machine, 9 ms to start this command against
22 ms with them and 55 ms for ``python -m cutana.workflow_jobs``, paid once per job (a
1000-source 64 px job does 0.17 s of work).

This module is also the client half of :mod:`cutana.warm_jobs` (which imports it): the socket
address of a run's server and the request it expects are defined here only.
"""

from __future__ import annotations

import _socket
import binascii
import marshal
import os
import struct
import sys

#: Environment variable that turns the warm server off when set to ``0``.
SWITCH_VARIABLE = "CUTANA_WARM_JOBS"

#: Environment variable holding the PID of the run's Snakemake process (set by the Snakefile).
RUN_VARIABLE = "CUTANA_RUN_PID"

#: Length prefix of a request; exit status of a worker.
HEADER = struct.Struct("!I")
STATUS = struct.Struct("!i")


#: File descriptors a command hands to the worker: its stdin, stdout and stderr.
_STREAMS = (0, 1, 2)

_pidfds: list[bool] = []  # the cached answer of _pidfds_work


def _pidfds_work() -> bool:
    """Whether this kernel gives process file descriptors (Linux >= 5.3; not every sandbox)."""
    if not _pidfds:
        try:
            os.close(os.pidfd_open(os.getpid()))
        except (AttributeError, OSError):
            _pidfds.append(False)
        else:
            _pidfds.append(True)
    return _pidfds[0]


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
    """The abstract Unix socket name of the server of this run, user, interpreter and code.

    The user and the run's PID are spelled out; the interpreter, cutana's folder and its
    sources' sizes and times go through CRC-32, so a server of other code is not used.
    """
    package = os.path.dirname(os.path.realpath(__file__))
    with os.scandir(package) as entries:
        sources = sorted(
            (entry.name, entry.stat()) for entry in entries if entry.name.endswith(".py")
        )
    code = [sys.executable, package]
    code += [f"{name}\0{stat.st_mtime_ns}\0{stat.st_size}" for name, stat in sources]
    checksum = binascii.crc32("\0".join(code).encode())
    return f"\0cutana-warm-jobs-{os.getuid()}-{run_pid()}-{checksum:08x}".encode()


def encode_request(argv, cwd: str, env) -> bytes:
    """A job's request to the server: its arguments, working directory and environment."""
    return marshal.dumps({"argv": [str(a) for a in argv], "cwd": str(cwd), "env": dict(env)})


def decode_request(data: bytes) -> dict:
    """The request :func:`encode_request` made; ValueError if ``data`` is not one.

    The server reads requests only from its own user's processes (it checks the peer's
    credentials first), so ``marshal`` is safe here and, unlike ``json``, free to import.
    """
    try:
        request = marshal.loads(data)
    except (EOFError, TypeError, ValueError) as error:
        raise ValueError(f"not a job request: {error}") from None
    if not (
        isinstance(request, dict)
        and isinstance(request.get("argv"), list)
        and all(isinstance(a, str) for a in request["argv"])
        and isinstance(request.get("cwd"), str)
        and isinstance(request.get("env"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())
    ):
        raise ValueError("not a job request: argv, cwd or env missing or of the wrong type")
    return request


def recv_exactly(conn, n_bytes: int) -> bytes:
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
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.connect(address or server_address())
        request = encode_request(argv, os.getcwd(), os.environ)
        sys.stdout.flush()
        sys.stderr.flush()
        # What socket.send_fds does (SCM_RIGHTS), without importing socket.
        streams = struct.pack(f"{len(_STREAMS)}i", *_STREAMS)
        conn.sendmsg(
            [HEADER.pack(len(request)) + request],
            [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, streams)],
        )
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
