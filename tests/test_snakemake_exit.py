"""The Snakemake process ends once the workflow is done (cutana.snakemake_exit)."""

from __future__ import annotations

import inspect
import threading

from cutana import snakemake_exit


class JobScheduler:
    """Stands in for Snakemake's scheduler: the same method name and timer."""

    def _schedule_reevalutation(self, delay: float) -> threading.Timer:
        timer = threading.Timer(delay, lambda: None)
        timer.start()
        return timer


def test_only_the_schedulers_timers_are_cancelled():
    scheduler_timer = JobScheduler()._schedule_reevalutation(60)
    other_timer = threading.Timer(60, lambda: None)
    other_timer.start()
    try:
        assert snakemake_exit.cancel_rescheduling_timers() == 1
        scheduler_timer.join(5)
        assert not scheduler_timer.is_alive()
        assert other_timer.is_alive()
    finally:
        scheduler_timer.cancel()
        other_timer.cancel()


def test_installed_snakemake_still_reschedules_with_a_timer():
    # If Snakemake renames or rewrites this method, the hook no longer finds its timers: the
    # run is then slower at exit (up to 1 s), not wrong. This test says so.
    from snakemake.scheduling.job_scheduler import JobScheduler as SnakemakeScheduler

    methods = [m for m in snakemake_exit.RESCHEDULING_METHODS if hasattr(SnakemakeScheduler, m)]
    assert methods, "Snakemake's scheduler has no re-evaluation method of a known name"
    source = inspect.getsource(getattr(SnakemakeScheduler, methods[0]))
    assert "threading.Timer(" in source and "lambda" in source


def test_exit_hook_is_registered_once(monkeypatch):
    registered = []
    monkeypatch.setattr(snakemake_exit, "_final_collection_skipped", False)
    monkeypatch.setattr(snakemake_exit.atexit, "register", registered.append)
    snakemake_exit.finish_promptly()
    snakemake_exit.finish_promptly()
    assert registered == [snakemake_exit._skip_final_collection]
