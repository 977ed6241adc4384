"""Let the Snakemake process end as soon as the workflow is done (called from its hooks).

Two costs come after Snakemake has finished a run, both independent of the run's size and
paid by every ``snakemake`` call (measured on a 10-source run, docs/benchmarks.md):

* Snakemake's scheduler starts a ``threading.Timer`` after each scheduling round (the job rate
  limiter, ``--max-jobs-per-timespan``, default 100 per second) to wake itself up again. The
  timer thread is not a daemon, so the interpreter waits for the last one to fire: up to 1 s
  after the workflow has ended. The finished scheduler has nothing left to wake.
* The interpreter's final garbage collection walks every object of the Snakemake process
  (the DAG, the imported modules): ~0.3 s. The process exits right after it, and the
  operating system frees its memory anyway.

:func:`finish_promptly` is called from the Snakefile's ``onsuccess`` and ``onerror`` hooks, once
every job has ended. Snakemake still releases its lock and writes its log afterwards, as usual.
"""

from __future__ import annotations

import atexit
import gc
import threading

#: Name of the Snakemake scheduler method whose timers are cancelled (Snakemake's spelling; the
#: corrected spelling is accepted too). tests/test_snakemake_exit.py checks that the installed
#: Snakemake still schedules its re-evaluations this way.
RESCHEDULING_METHODS = ("_schedule_reevalutation", "_schedule_reevaluation")

_final_collection_skipped = False


def cancel_rescheduling_timers() -> int:
    """Cancel the pending timers of Snakemake's job scheduler; return how many were cancelled.

    Only timers whose function was made by the scheduler's re-evaluation method are touched:
    other timers (of plugins, of user code) run as they would.
    """
    cancelled = 0
    for thread in threading.enumerate():
        function = getattr(thread, "function", None)
        if not isinstance(thread, threading.Timer) or function is None:
            continue
        qualname = getattr(function, "__qualname__", "")
        if any(f".{method}.<locals>." in qualname for method in RESCHEDULING_METHODS):
            thread.cancel()
            cancelled += 1
    return cancelled


def _skip_final_collection() -> None:
    """At exit: move every object out of the garbage collector's reach (``gc.freeze``).

    Objects are still released by reference counting as modules are torn down; only the
    interpreter's last full collection, which finds nothing worth the walk, is skipped.
    """
    gc.disable()
    gc.freeze()


def finish_promptly() -> None:
    """Cancel the scheduler's timers and skip the final garbage collection at exit.

    Safe to call more than once (the exit hook is registered once per process).
    """
    global _final_collection_skipped
    cancel_rescheduling_timers()
    if not _final_collection_skipped:
        # Registered now, after Snakemake's own exit hooks (logging's among them), so it runs
        # before them: atexit calls the hooks last-registered first.
        atexit.register(_skip_final_collection)
        _final_collection_skipped = True
