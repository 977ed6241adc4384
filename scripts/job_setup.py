"""Set-up shared by the Snakemake ``script:`` adapters: native thread pools, logging, exit.

Snakemake puts the directory of the running script on ``sys.path``, so the adapters import this
module by name, before they import cutana.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Every job is one single-threaded process (the rules declare threads: 1; a run's parallelism is
# its jobs side by side), so native thread pools only compete with the other jobs for the cores.
# OpenBLAS starts a busy thread per core when NumPy is imported (0.19 s of CPU per job process,
# measured on 10 imports: 4.6 -> 2.7 s), and OpenCV splits a 256 px resize across threads,
# which is slower than one thread (57 -> 46 us per area enlargement). Read by both libraries
# when they load, so set before cutana is imported; a value the user exported is kept.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
os.environ.setdefault("OPENCV_FOR_THREADS_NUM", "1")


@contextlib.contextmanager
def logged_step(log_path: str, level_name: str, step: str) -> Iterator[logging.Logger]:
    """Send Python logging and warnings to the job's log file while one step runs.

    An exception is written to the log with its traceback and then re-raised, so the job fails
    (non-zero exit) and Snakemake prints the message on the console too.

    Parameters
    ----------
    log_path : str
        The rule's ``log:`` file.
    level_name : str
        The config's ``log_level`` (``TRACE`` is mapped to ``DEBUG``).
    step : str
        A short name for the log lines.

    Yields
    ------
    logging.Logger
        The logger of the step.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    level = getattr(logging, level_name, logging.DEBUG)
    handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    logger = logging.getLogger(f"cutana.workflow.{step}")
    started = time.perf_counter()
    try:
        yield logger
    except BaseException:
        logger.exception("%s failed", step)
        raise
    else:
        logger.info("%s finished in %.2f s", step, time.perf_counter() - started)
    finally:
        handler.flush()
        root.removeHandler(handler)
        handler.close()


def exit_without_teardown() -> None:
    """End the job's process at once, after its outputs are complete on disk.

    Python's shutdown frees every module and object one by one, ~0.2 s for a job that imported
    numpy, astropy, pyarrow and OpenCV: a fifth of a 1000-source 64 px job. Call this only
    when every output file is closed (their data is then in the kernel, which a process exit
    cannot lose); the cutout outputs are also fsynced and renamed into place before.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
