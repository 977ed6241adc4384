"""Progress of a cutana run as shown by the UI and the CLI (upstream ``ProgressReport``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field


@dataclass
class ProgressReport:
    """A snapshot of a run's progress and of the machine's resources.

    Attributes
    ----------
    progress_percent : float
        Completed sources as a percentage of all catalogue sources (0 while the catalogue is
        still being split, 100 when the run is complete).
    completed_sources : int
        Catalogue rows whose batch has finished (any status: ok, partial, no_overlap, failed).
    total_sources : int
        Catalogue rows (0 until the catalogue has been split into batches).
    throughput : float
        Sources per second processed by this run (batches finished by an earlier, interrupted
        run are not counted, so a resumed run reports its own speed).
    eta_seconds : float or None
        Estimated seconds until completion; None while the throughput is unknown.
    memory_used_gb, memory_total_gb : float
        Memory in use on the machine and its total (psutil), in GiB.
    cpu_percent : float
        Machine-wide CPU usage since the previous report, in percent.
    status : str
        ``idle``, ``running``, ``completed``, ``failed`` or ``stopped``.
    completed_batches, total_batches : int
        Finished and planned batches.
    runtime_seconds : float
        Seconds since this run started.
    errors : list of str
        Error messages of the run (empty unless it failed).
    """

    progress_percent: float = 0.0
    completed_sources: int = 0
    total_sources: int = 0
    throughput: float = 0.0
    eta_seconds: float | None = None
    memory_used_gb: float = 0.0
    memory_total_gb: float = 0.0
    cpu_percent: float = 0.0
    status: str = "idle"
    completed_batches: int = 0
    total_batches: int = 0
    runtime_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def is_finished(self) -> bool:
        """True once the run has ended (completed, failed or stopped)."""
        return self.status in ("completed", "failed", "stopped")

    def to_dict(self) -> dict:
        """The report as a plain dict (for JSON or widgets)."""
        return asdict(self)

    @classmethod
    def empty(cls) -> ProgressReport:
        """A report for a run that has not started."""
        return cls()


def counts_text(counts: Mapping[str, int]) -> str:
    """Rows per status as ``ok 414, partial 86, no_overlap 0, failed 0``."""
    return ", ".join(f"{name} {value}" for name, value in counts.items())


def finished_run_line(summary: Mapping, index_path: str) -> tuple[str, bool]:
    """What a finished run says about its sources, and whether any failed.

    Parameters
    ----------
    summary : mapping
        The run's ``run_summary.json``.
    index_path : str
        Path of ``source_to_zarr_mapping.parquet``, which holds every row's status and reason.
    """
    counts = {name: int(value) for name, value in summary.get("counts", {}).items()}
    line = (
        f"cutana: {summary.get('total_sources', sum(counts.values()))} catalogue rows: "
        f"{counts_text(counts)}; every row's status and reason: {index_path}"
    )
    return line, counts.get("failed", 0) > 0
