"""The upstream-compatible Python API: run cutana's Snakemake workflow and follow its progress.

:class:`Orchestrator` runs the *packaged* workflow (:func:`cutana.paths.snakefile`) as a
``python -m snakemake`` subprocess in its own process group, so the API, the CLI, the UI and a
plain ``snakemake`` call in the repository all execute the same rules. Progress is read from the
files the workflow writes (``.cutana/batches/manifest.json`` and one status table per finished
batch), which keeps polling cheap and makes it work for a resumed run too.

Example
-------
>>> from cutana import Orchestrator, get_default_config  # doctest: +SKIP
>>> config = get_default_config()  # doctest: +SKIP
>>> config.source_catalogue = "sources.csv"  # doctest: +SKIP
>>> result = Orchestrator(config).run()  # doctest: +SKIP
>>> result["status"], result["mapping_csv"]  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pyarrow.parquet as pq

from .config import read_yaml, to_plain, validate_config
from .paths import snakefile, workflow_root
from .preflight import OutputDirError, check_output_dir_for
from .progress_report import ProgressReport

logger = logging.getLogger(__name__)

#: Statuses a catalogue row can end with (SPEC §7.3).
SOURCE_STATUSES = ("ok", "partial", "no_overlap", "failed")
#: Run statuses after which nothing runs any more.
FINISHED_STATUSES = ("completed", "failed", "stopped")
#: Console levels at which Snakemake's own progress lines are hidden.
_QUIET_LEVELS = ("WARNING", "ERROR", "CRITICAL")
_GIB = 1024**3


class Orchestrator:
    """Run cutana on a catalogue and report progress (API of upstream Cutana).

    Parameters
    ----------
    config : DotMap or mapping
        A configuration from :func:`cutana.get_default_config` (or any partial mapping); it is
        validated with :func:`cutana.config.validate_config`, the schema the workflow uses.
    status_panel : object, optional
        Receives a :class:`~cutana.progress_report.ProgressReport` at every poll: either a
        callable, or an object with an ``update_progress(report)`` method (the UI's panel).
    snakemake_args : sequence of str, optional
        Extra Snakemake command-line arguments, appended last so they override ours.
    cores : int, optional
        ``--cores`` for Snakemake; default ``min(max_workers, CPU count)``.
    profile : str, optional
        A Snakemake ``--profile`` (e.g. a SLURM profile). With a profile, the local memory limit
        (``--resources mem_mb``) and ``--cores`` are left to the profile unless ``cores`` is given.
    poll_interval : float
        Seconds between progress polls while the workflow runs.

    Raises
    ------
    cutana.exceptions.ConfigValidationError
        If the configuration is invalid (the message names the key, the value and the range).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        status_panel: Any = None,
        *,
        snakemake_args: Sequence[str] = (),
        cores: int | None = None,
        profile: str | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self.config: dict = validate_config(config)
        self.status_panel = status_panel
        self.snakemake_args = [str(arg) for arg in snakemake_args]
        self.cores = cores
        self.profile = profile
        self.poll_interval = float(poll_interval)
        # Relative paths in the config are relative to the directory the Orchestrator was made
        # in; Snakemake runs there too (--directory), so its .snakemake/ state lives there.
        self.working_directory = Path.cwd()
        self.output_dir = self._absolute(self.config["output_dir"])
        self.work_dir = self.output_dir / ".cutana"

        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._watcher: threading.Thread | None = None
        self._log_handle = None
        self._status = "idle"
        self._result: dict | None = None
        self._stop_requested = False
        self._timed_out = False
        self._start_time: float | None = None
        self._end_time: float | None = None
        self._sources_before_start = 0
        # Status tables are written atomically and never change afterwards, so their row
        # counts and per-status counts are read once (keyed by name and mtime).
        self._status_table_cache: dict[str, tuple[int, int, dict[str, int]]] = {}

    # ------------------------------------------------------------------ paths
    def _absolute(self, path: str | os.PathLike) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.working_directory / path

    @property
    def manifest_path(self) -> Path:
        """``.cutana/batches/manifest.json``, written when the catalogue has been split."""
        return self.work_dir / "batches" / "manifest.json"

    @property
    def status_dir(self) -> Path:
        """Directory of the per-batch status tables."""
        return self.work_dir / "status"

    @property
    def mapping_path(self) -> Path:
        """The merged index ``source_to_zarr_mapping.parquet`` (one row per catalogue row)."""
        return self.output_dir / "source_to_zarr_mapping.parquet"

    @property
    def summary_path(self) -> Path:
        """``run_summary.json`` (counts per status, timings, config hash)."""
        return self.output_dir / "run_summary.json"

    @property
    def log_path(self) -> Path:
        """Snakemake's console output of the latest run."""
        return self.work_dir / "logs" / "snakemake.log"

    @property
    def run_config_path(self) -> Path:
        """The effective configuration handed to Snakemake with ``--configfile``."""
        return self.work_dir / "run_config.yaml"

    @property
    def input_catalogue_path(self) -> Path:
        """Where a DataFrame catalogue is written before the run."""
        return self.work_dir / "input_catalogue.parquet"

    # ------------------------------------------------------------------ running
    def run(self) -> dict:
        """Process the catalogue named by ``config.source_catalogue`` and wait for the end.

        Returns
        -------
        dict
            The results dict of :meth:`start_processing`.
        """
        catalogue = self.config.get("source_catalogue")
        if not catalogue and self.input_catalogue_path.exists():
            # The DataFrame of an earlier start_processing() in this output_dir: run()
            # continues that run (after stop_processing(), as can_resume() says).
            catalogue = self.input_catalogue_path
        if not catalogue:
            return self._failed_before_start(
                "config key 'source_catalogue' is not set: give the path of a CSV or Parquet "
                "catalogue, or call start_processing(catalogue_dataframe)"
            )
        return self.start_processing(catalogue, wait=True)

    def start_processing(
        self, catalogue_data: pd.DataFrame | str | os.PathLike | None = None, wait: bool = True
    ) -> dict:
        """Start the workflow on a catalogue.

        Parameters
        ----------
        catalogue_data : DataFrame or path, optional
            The source catalogue. A DataFrame is written to
            ``{output_dir}/.cutana/input_catalogue.parquet`` first (rewritten only when its
            content changed, so a resumed run does not redo finished batches). None means
            ``config.source_catalogue``.
        wait : bool
            Block until the workflow ends (Ctrl-C stops it cleanly). With False, return at once
            while a background thread follows the run; poll :meth:`get_progress_for_ui` and
            collect the results with :meth:`wait`.

        Returns
        -------
        dict
            ``status`` ("completed", "failed", "stopped", or "running" when ``wait`` is False),
            ``total_sources``, ``completed_batches``, ``total_batches``, ``mapping_csv`` and
            ``mapping_path`` (the merged Parquet index), ``error`` (None unless failed),
            ``counts`` (rows per status, also flattened as ``n_ok``, ``n_partial``,
            ``n_no_overlap``, ``n_failed``), ``runtime``, ``output_dir``, ``log_file`` and
            ``run_summary`` (the parsed ``run_summary.json``) when completed.

        Raises
        ------
        RuntimeError
            If this Orchestrator is already running a workflow.
        """
        with self._lock:
            if self._status == "running":
                raise RuntimeError("a workflow is already running; call stop_processing() first")
            self._status = "running"
            self._result = None
        try:
            try:  # before anything is written there (a DataFrame catalogue, the run config)
                check_output_dir_for({**self.config, "output_dir": str(self.output_dir)})
            except OutputDirError as error:
                return self._failed_before_start(str(error))
            catalogue_path = self._prepare_catalogue(catalogue_data)
            if catalogue_path is None:
                return self._failed_before_start(
                    "no catalogue given: set source_catalogue in the config to the path of a "
                    "CSV or Parquet catalogue (or pass a DataFrame or a path to "
                    "start_processing())"
                )
            problem = executor_plugin_problem(self.profile)
            if problem:
                return self._failed_before_start(problem)
            if not catalogue_path.exists() and not self._is_demo_catalogue(catalogue_path):
                return self._failed_before_start(
                    f"source catalogue {catalogue_path} does not exist: check "
                    "config.source_catalogue (relative paths are relative to "
                    f"{self.working_directory})"
                )
            self._write_run_config(catalogue_path)
            self._launch()
        except BaseException:
            with self._lock:
                if self._process is None:
                    self._status = "failed"
            raise
        if not wait:
            return self._running_result()
        return self.wait()

    def wait(self, timeout: float | None = None) -> dict | None:
        """Block until the current run ends and return its results dict.

        Parameters
        ----------
        timeout : float, optional
            Give up after this many seconds and return None if the run is still going.

        Returns
        -------
        dict or None
            The results dict (see :meth:`start_processing`), or None on timeout.
        """
        watcher = self._watcher
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while watcher is not None and watcher.is_alive():
                # Short joins keep the main thread responsive to Ctrl-C.
                watcher.join(0.2)
                if deadline is not None and time.monotonic() > deadline:
                    return None
        except KeyboardInterrupt:
            logger.warning("Interrupted: stopping the workflow (rerun to resume)")
            self.stop_processing()
        return self._result

    @property
    def result(self) -> dict | None:
        """The results dict of the last finished run (None while running or before a run)."""
        return self._result

    def is_running(self) -> bool:
        """True while the Snakemake process of this Orchestrator runs."""
        return self._status == "running"

    # ------------------------------------------------------------------ preparation
    def _prepare_catalogue(self, catalogue_data) -> Path | None:
        if catalogue_data is None:
            catalogue_data = self.config.get("source_catalogue")
            if not catalogue_data:
                return None
        if isinstance(catalogue_data, pd.DataFrame):
            self._write_dataframe_catalogue(catalogue_data)
            return self.input_catalogue_path
        return self._absolute(catalogue_data)

    def _is_demo_catalogue(self, path: Path) -> bool:
        demo_dir = self._absolute(self.config["demo"]["dir"])
        return os.path.normpath(path) == os.path.normpath(demo_dir / "catalogue.csv")

    def _write_dataframe_catalogue(self, frame: pd.DataFrame) -> None:
        frame = frame.copy()
        if "fits_file_paths" in frame.columns:
            # Relative FITS paths of an in-memory catalogue mean "relative to the current
            # directory"; written next to the run's files they would resolve elsewhere.
            frame["fits_file_paths"] = _parse_path_lists(
                frame["fits_file_paths"], self.working_directory
            )
        target = self.input_catalogue_path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        frame.to_parquet(tmp, index=False)
        _replace_if_changed(tmp, target)

    def _write_run_config(self, catalogue_path: Path) -> None:
        run_config = to_plain(self.config)
        run_config["source_catalogue"] = str(catalogue_path)
        run_config["output_dir"] = str(self.output_dir)
        # Absolute too, so the workflow still recognises the demo catalogue as its own output.
        run_config["demo"]["dir"] = str(self._absolute(self.config["demo"]["dir"]))
        self.run_config_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.run_config_path.with_name(f"run_config.yaml.tmp-{os.getpid()}")
        # JSON, not YAML: Snakemake reads JSON config files as plain data, whereas a YAML file
        # with `__use_yte__: true` is a YTE template whose `?...` values it evaluates as Python
        # (config files are data, SPEC §5). JSON is also valid YAML for readers of this file.
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(run_config, handle, indent=1)
        _replace_if_changed(tmp, self.run_config_path)

    def snakemake_command(self) -> list[str]:
        """The Snakemake command line this Orchestrator runs.

        Returns
        -------
        list of str
            ``python -m snakemake --snakefile <packaged Snakefile> --directory <cwd>
            --configfile <run_config.yaml> --cores N --resources mem_mb=M --rerun-incomplete``
            plus ``--quiet`` at console levels WARNING and above, the profile and the extra
            arguments.
        """
        command = [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(snakefile()),
            "--directory",
            str(self.working_directory),
            "--configfile",
            str(self.run_config_path),
            "--rerun-incomplete",
        ]
        if self.profile:
            command += ["--profile", resolve_profile(self.profile)]
        if self.cores is not None:
            command += ["--cores", str(int(self.cores))]
        elif not self.profile:
            cores = min(int(self.config["max_workers"]), os.cpu_count() or 1)
            command += ["--cores", str(cores)]
        if not self.profile:
            command += ["--resources", f"mem_mb={self.available_memory_mb()}"]
        if self.config["console_log_level"] in _QUIET_LEVELS:
            command += ["--quiet", "progress", "rules"]
        return command + self.snakemake_args

    def available_memory_mb(self) -> int:
        """Memory the cutout jobs may use together: what is available now minus
        ``loadbalancer.main_process_memory_reserve_gb`` (at least 512 MB)."""
        reserve_mb = self.config["loadbalancer"]["main_process_memory_reserve_gb"] * 1024
        available_mb = psutil.virtual_memory().available / 2**20
        return max(512, int(available_mb - reserve_mb))

    def _launch(self) -> None:
        command = self.snakemake_command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_path, "w", encoding="utf-8")
        self._log_handle.write("$ " + " ".join(command) + "\n")
        self._log_handle.flush()
        self._sources_before_start = self._count_status_tables()[0]
        self._stop_requested = False
        self._timed_out = False
        self._start_time = time.time()
        self._end_time = None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        logger.info("Running %s", " ".join(command))
        self._process = subprocess.Popen(
            command,
            cwd=self.working_directory,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=env,
            # Own process group: stop_processing() signals Snakemake and its jobs together,
            # and a Ctrl-C in a terminal or notebook reaches only us, not the jobs.
            start_new_session=True,
        )
        self._watcher = threading.Thread(
            target=self._watch, name="cutana-orchestrator", daemon=True
        )
        self._watcher.start()

    # ------------------------------------------------------------------ watching
    def _watch(self) -> None:
        process = self._process
        time_limit = float(self.config["max_workflow_time_seconds"])
        returncode = None
        while returncode is None:
            try:
                returncode = process.wait(timeout=self.poll_interval)
            except subprocess.TimeoutExpired:
                returncode = None
            if returncode is None:
                if time.time() - self._start_time > time_limit and not self._stop_requested:
                    logger.error("max_workflow_time_seconds=%s exceeded: stopping", time_limit)
                    self._timed_out = True
                    self._signal_group(process, signal.SIGTERM)
                self._notify_panel()
        self._end_time = time.time()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        result = self._final_result(returncode)
        with self._lock:
            self._result = result
            self._status = result["status"]
        self._notify_panel()

    def _notify_panel(self) -> None:
        panel = self.status_panel
        if panel is None:
            return
        try:
            report = self.get_progress_for_ui()
            if hasattr(panel, "update_progress"):
                panel.update_progress(report)
            elif callable(panel):
                panel(report)
        except Exception:  # a broken widget must never break the run
            logger.exception("status panel update failed")

    # ------------------------------------------------------------------ results
    def _base_result(self, status: str, error: str | None) -> dict:
        progress = self.get_progress()
        counts = progress["status_counts"]
        result = {
            "status": status,
            "total_sources": progress["total_sources"],
            "completed_sources": progress["completed_sources"],
            "completed_batches": progress["completed_batches"],
            "total_batches": progress["total_batches"],
            "mapping_csv": str(self.mapping_path),
            "mapping_path": str(self.mapping_path),
            "error": error,
            "counts": counts,
            "runtime": progress["runtime"],
            "output_dir": str(self.output_dir),
            "log_file": str(self.log_path),
        }
        result.update({f"n_{name}": counts.get(name, 0) for name in SOURCE_STATUSES})
        return result

    def _failed_before_start(self, error: str) -> dict:
        result = self._base_result("failed", error)
        with self._lock:
            self._result = result
            self._status = "failed"
        _log_failure(error)
        return result

    def _running_result(self) -> dict:
        return self._base_result("running", None)

    def _final_result(self, returncode: int) -> dict:
        completed = returncode == 0 and self.mapping_path.exists()
        if self._timed_out:
            status = "failed"
            error = (
                f"the run exceeded max_workflow_time_seconds="
                f"{self.config['max_workflow_time_seconds']} and was stopped; run again to "
                "resume from the finished batches"
            )
        elif self._stop_requested:
            status, error = "stopped", None
        elif completed:
            status, error = "completed", None
        elif returncode == 0:
            status = "failed"
            error = (
                f"Snakemake exited normally but {self.mapping_path} was not written (a dry run "
                f"or a target other than 'all'?); see {self.log_path}"
            )
        else:
            status = "failed"
            message = error_from_log(
                self.log_path,
                job_logs=self.log_path.parent,
                since=self._start_time or 0.0,
                scheduler_logs=self.working_directory / ".snakemake" / "slurm_logs",
            )
            error = f"{message} (Snakemake log: {self.log_path})"
            if "LockException" in error or "cannot be locked" in error:
                error += (
                    f"; another run is using {self.output_dir}, or a killed run left its lock: "
                    "if none is running, run `snakemake --unlock` with the same arguments "
                    f"(first line of {self.log_path})"
                )
        result = self._base_result(status, error)
        if status == "failed":
            _log_failure(error)
        if status == "completed":
            summary = _read_json(self.summary_path)
            if summary is not None:
                result["run_summary"] = summary
                summary_counts = summary.get("counts")
                if isinstance(summary_counts, Mapping):
                    result["counts"] = {k: int(v) for k, v in summary_counts.items()}
                    result.update(
                        {f"n_{name}": int(summary_counts.get(name, 0)) for name in SOURCE_STATUSES}
                    )
        return result

    # ------------------------------------------------------------------ progress
    def _manifest(self) -> dict | None:
        return _read_json(self.manifest_path)

    def _count_status_tables(
        self, batch_names: set[str] | None = None
    ) -> tuple[int, int, dict[str, int]]:
        """Rows, tables and rows per status of the finished batches (cached per file)."""
        rows, tables = 0, 0
        counts = dict.fromkeys(SOURCE_STATUSES, 0)
        if not self.status_dir.is_dir():
            return rows, tables, counts
        for path in self.status_dir.glob("*.parquet"):
            # Skip stale tables of an earlier catalogue that the current manifest does not plan.
            if batch_names is not None and path.stem not in batch_names:
                continue
            try:
                mtime = path.stat().st_mtime_ns
                cached = self._status_table_cache.get(path.name)
                if cached is None or cached[0] != mtime:
                    table = pq.read_table(path, columns=["status"])
                    per_status = table.column("status").to_pandas().value_counts().to_dict()
                    cached = (
                        mtime,
                        table.num_rows,
                        {str(k): int(v) for k, v in per_status.items()},
                    )
                    self._status_table_cache[path.name] = cached
            except (OSError, ValueError, KeyError) as error:
                # A table being replaced right now; it is counted at the next poll.
                logger.debug("cannot read status table %s: %s", path, error)
                continue
            rows += cached[1]
            tables += 1
            for name, value in cached[2].items():
                counts[name] = counts.get(name, 0) + value
        return rows, tables, counts

    def get_progress(self) -> dict:
        """Progress of the current (or latest) run, read cheaply from the workflow's files.

        Returns
        -------
        dict
            ``status``, ``total_sources`` (catalogue rows, 0 until the catalogue is split),
            ``completed_sources`` (rows of finished batches), ``completed_batches``,
            ``total_batches``, ``progress_percent``, ``status_counts`` (rows per status so
            far), ``runtime`` (seconds) and ``errors`` (list of messages).
        """
        manifest = self._manifest()
        batch_names = None
        total_sources, total_batches = 0, 0
        if manifest is not None:
            total_sources = int(manifest.get("total_rows", 0))
            batches = manifest.get("batches", [])
            total_batches = len(batches)
            batch_names = {entry["name"] for entry in batches}
        completed_sources, completed_batches, counts = self._count_status_tables(batch_names)
        if self._start_time is None:
            runtime = 0.0
        else:
            runtime = (self._end_time or time.time()) - self._start_time
        errors = []
        if self._result is not None and self._result.get("error"):
            errors.append(self._result["error"])
        percent = 100.0 * completed_sources / total_sources if total_sources else 0.0
        return {
            "status": self._status,
            "total_sources": total_sources,
            "completed_sources": completed_sources,
            "completed_batches": completed_batches,
            "total_batches": total_batches,
            "progress_percent": min(100.0, percent),
            "status_counts": counts,
            "runtime": runtime,
            "errors": errors,
        }

    def get_progress_for_ui(self, completed_sources: int | None = None) -> ProgressReport:
        """Progress and machine resources for the UI.

        Parameters
        ----------
        completed_sources : int, optional
            Override of the completed-sources count (upstream API).

        Returns
        -------
        ProgressReport
            Percent done, throughput (sources/s of this run), ETA, memory and CPU use.
        """
        progress = self.get_progress()
        done = progress["completed_sources"] if completed_sources is None else completed_sources
        total = progress["total_sources"]
        runtime = progress["runtime"]
        done_here = max(0, done - self._sources_before_start)
        throughput = done_here / runtime if runtime > 0 else 0.0
        eta = None
        if total and done >= total:
            eta = 0.0
        elif throughput > 0 and total:
            eta = (total - done) / throughput
        memory = psutil.virtual_memory()
        return ProgressReport(
            progress_percent=min(100.0, 100.0 * done / total) if total else 0.0,
            completed_sources=int(done),
            total_sources=int(total),
            throughput=float(throughput),
            eta_seconds=eta,
            memory_used_gb=(memory.total - memory.available) / _GIB,
            memory_total_gb=memory.total / _GIB,
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            status=progress["status"],
            completed_batches=progress["completed_batches"],
            total_batches=progress["total_batches"],
            runtime_seconds=float(runtime),
            errors=progress["errors"],
        )

    # ------------------------------------------------------------------ control
    def stop_processing(self, timeout: float = 60.0) -> dict:
        """Stop the workflow: SIGTERM to Snakemake's process group, then wait.

        Snakemake cancels its jobs and deletes their incomplete outputs; batches are written
        atomically, so every batch on disk is complete and running again finishes the work.
        If the group has not ended after ``timeout`` seconds it is killed (SIGKILL).

        Parameters
        ----------
        timeout : float
            Seconds to wait for a clean shutdown.

        Returns
        -------
        dict
            ``stopped_processes`` (pids signalled), ``status`` and ``killed`` (True if SIGKILL
            was needed).
        """
        process = self._process
        if process is None or process.poll() is not None:
            return {"stopped_processes": [], "status": self._status, "killed": False}
        self._stop_requested = True
        pids = _process_tree(process.pid)
        self._signal_group(process, signal.SIGTERM)
        # On SIGTERM Snakemake waits for its cluster jobs to end; queued ones would outlive it
        # and race the rerun's jobs for the same outputs. Cancelled, they end now.
        self._cancel_cluster_jobs()
        killed = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("Snakemake did not stop within %.0f s: killing it", timeout)
            self._signal_group(process, signal.SIGKILL)
            process.wait()
            killed = True
            self._unlock()
        # Jobs still shutting down keep the process group alive after Snakemake exits.
        _wait_for_pids(pids, timeout=10.0)
        if self._watcher is not None:
            self._watcher.join(timeout=30.0)
        self._remove_partial_batches()
        return {"stopped_processes": pids, "status": self._status, "killed": killed}

    def _cancel_cluster_jobs(self) -> None:
        """``scancel --name <run id>``: every SLURM job of this run (its common job name)."""
        if not self.profile or shutil.which("scancel") is None:
            return
        run_id = slurm_run_id(self.log_path)
        if run_id is None:
            return
        cancelled = subprocess.run(
            ["scancel", "--name", run_id], capture_output=True, text=True, timeout=60
        )
        if cancelled.returncode == 0:
            logger.warning("cancelled this run's SLURM jobs (scancel --name %s)", run_id)
        else:
            logger.warning(
                "could not cancel this run's SLURM jobs (scancel --name %s: %s): cancel them "
                "before running again",
                run_id,
                cancelled.stderr.strip(),
            )

    def _unlock(self) -> None:
        """Remove the Snakemake locks a killed run of ours left, so the next run can start."""
        subprocess.run(
            [*self.snakemake_command(), "--unlock"],
            cwd=self.working_directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )

    @staticmethod
    def _signal_group(process: subprocess.Popen, signum: int) -> None:
        try:
            os.killpg(os.getpgid(process.pid), signum)
        except ProcessLookupError:
            pass

    def _remove_partial_batches(self) -> None:
        """Delete temporary batch folders (``*.tmp-<pid>``) of writers killed mid-write."""
        if not self.output_dir.is_dir():
            return
        for tmp in self.output_dir.glob("batch_cutout_process_*.tmp-*"):
            pid = tmp.name.rsplit(".tmp-", 1)[-1]
            if pid.isdigit() and psutil.pid_exists(int(pid)):
                continue
            shutil.rmtree(tmp, ignore_errors=True)

    def can_resume(self) -> bool:
        """True if an earlier run in ``output_dir`` finished some batches but not the index.

        Calling :meth:`run` (or the same ``cutana run``/``snakemake`` command) then processes
        only the missing batches.
        """
        if self.mapping_path.exists() or self.is_running():
            return False
        manifest = self._manifest()
        if manifest is None:
            return False
        return self._count_status_tables({entry["name"] for entry in manifest["batches"]})[1] > 0


# ---------------------------------------------------------------------- helpers
#: Set on the log record of a failed run (``extra``): the CLI, which prints the results dict's
#: error itself, drops these records.
RESULT_RECORD = "cutana_result"


def _log_failure(error: str) -> None:
    """Log a failed run's error: the results dict carries it too (upstream's API), but a
    script that does not print that dict must not fail silently."""
    logger.error("cutana: the run failed: %s", error, extra={RESULT_RECORD: True})


def executor_plugin_problem(profile: str | os.PathLike | None) -> str | None:
    """Why ``profile`` cannot run here, if its ``executor`` plugin is not installed.

    Snakemake reports a missing executor plugin as an argparse usage error (``invalid
    choice: 'slurm'``); this names the package to install instead. None when there is no
    profile, it names no executor, or the plugin imports.
    """
    if not profile:
        return None
    folder = Path(resolve_profile(profile))
    config_files = [folder / name for name in ("config.v8+.yaml", "config.yaml")]
    config_file = next((path for path in config_files if path.is_file()), None)
    if config_file is None:
        return None
    try:
        executor = (read_yaml(config_file) or {}).get("executor")
    except Exception:  # noqa: BLE001 - Snakemake reports an unreadable profile itself
        return None
    if not isinstance(executor, str) or executor in ("local", "dryrun", "touch"):
        return None
    module = "snakemake_executor_plugin_" + executor.replace("-", "_")
    if importlib.util.find_spec(module) is not None:
        return None
    hint = (
        " (for the shipped SLURM profile: pip install 'cutana[slurm]')"
        if executor == "slurm"
        else ""
    )
    return (
        f"the profile {folder} runs jobs with Snakemake's '{executor}' executor, whose plugin is "
        f"not installed: pip install snakemake-executor-plugin-{executor}{hint}"
    )


_SLURM_RUN_ID = re.compile(r"SLURM run ID: ([0-9A-Za-z-]+)")


def slurm_run_id(log_path: Path) -> str | None:
    """The run ID the SLURM executor printed in a Snakemake log (every job of the run has it
    as its job name), or None."""
    try:
        text = Path(log_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = _SLURM_RUN_ID.findall(text)
    return found[-1] if found else None


def resolve_profile(profile: str | os.PathLike) -> str:
    """Find a Snakemake profile given as a path or as the name of a shipped profile.

    ``slurm`` and ``profiles/slurm`` name the workflow's own ``profiles/slurm`` (inside the
    installed package or the checkout) unless such a folder exists in the current directory;
    anything else is passed on for Snakemake's own search (``~/.config/snakemake``, ...).
    """
    path = Path(profile).expanduser()
    if path.exists():
        return str(path.resolve())
    root = workflow_root()
    for candidate in (root / path, root / "profiles" / path):
        if candidate.is_dir():
            return str(candidate)
    return str(profile)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _replace_if_changed(tmp: Path, target: Path) -> None:
    """Move ``tmp`` onto ``target`` unless both hold the same bytes.

    Keeping the old file keeps its mtime, so Snakemake does not rerun the jobs downstream of an
    unchanged catalogue or config when a stopped run is resumed.
    """
    if target.exists() and target.read_bytes() == tmp.read_bytes():
        tmp.unlink()
        return
    os.replace(tmp, target)


def _parse_path_lists(column: pd.Series, base_dir: Path) -> pd.Series:
    """Turn ``fits_file_paths`` strings such as ``"['a.fits', 'b.fits']"`` (as read from a CSV)
    into lists of absolute paths (relative ones joined to ``base_dir``), so that the Parquet
    catalogue holds a list column.

    Values that do not parse are left unchanged for the workflow's validation to report with
    their row number.
    """

    def absolute(path: str) -> str:
        path = os.path.expanduser(str(path))
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))

    def parse(value):
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                try:
                    parsed = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    return value
            if isinstance(parsed, (list, tuple)) and all(isinstance(p, str) for p in parsed):
                return [absolute(p) for p in parsed]
            return value
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            return [absolute(p) for p in value]
        return value

    parsed = column.map(parse)
    if all(isinstance(v, list) for v in parsed):
        return parsed
    # Mixed lists and strings cannot share a Parquet column: keep the strings as they came.
    return column.astype(str)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    try:
        parent = psutil.Process(pid)
        return [pid] + [child.pid for child in parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _wait_for_pids(pids: Sequence[int], timeout: float) -> None:
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(processes, timeout=timeout)


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception))(?::\s*(.*))?$")
#: How SLURM reports a job killed for its memory in the job's output.
_OUT_OF_MEMORY = re.compile(r"exceeded memory limit|OUT_OF_MEMORY|oom[-_ ]kill", re.IGNORECASE)

_SNAKEMAKE_NOISE = (
    "RuleException",
    "Error in rule",
    "Shutting down",
    "Exiting because",
    "Complete log",
    "Removing output files",
    "Will exit after",
    "[",
)


def error_from_log(
    log_path: Path,
    max_lines: int = 20,
    job_logs: Path | None = None,
    since: float = 0.0,
    scheduler_logs: Path | None = None,
) -> str:
    """The most telling error message in a Snakemake console log.

    Takes the last Python exception (``SomeError: message`` plus its continuation lines), which
    is where cutana's validation messages end up; else the tail of the log. When that log has
    only Snakemake's generic failure (a cluster run: the jobs' output is in the scheduler's
    files, not in it), the exception of the job logs under ``job_logs`` written since
    ``since`` is taken instead, with the path of its log.

    Parameters
    ----------
    log_path : Path
        The log written by :class:`Orchestrator`.
    max_lines : int
        Upper bound of lines returned.
    job_logs : Path, optional
        The rules' ``log:`` folder.
    since : float
        Only job logs modified at or after this time (seconds since the epoch) count.
    scheduler_logs : Path, optional
        The cluster executor's job logs (``.snakemake/slurm_logs``): where nothing else names
        the cause, jobs the scheduler killed for their memory are reported.

    Returns
    -------
    str
        The message (never empty).
    """
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read()[-200_000:].splitlines()
    except OSError:
        return "the workflow failed and its log could not be read"
    found = _last_exception(lines, max_lines)
    only_generic = found is None or found[1]
    if only_generic and job_logs is not None:
        for path in _recent_logs(job_logs, since, exclude=Path(log_path)):
            in_job = _last_exception(_text_or_empty(path).splitlines(), max_lines)
            if in_job is not None and not in_job[1]:
                return f"{in_job[0]} (job log: {path})"
    if only_generic and scheduler_logs is not None:
        killed = [
            path
            for path in _recent_logs(scheduler_logs, since, exclude=Path(log_path))
            if _OUT_OF_MEMORY.search(_text_or_empty(path))
        ]
        if killed:
            return (
                f"{len(killed)} cluster job(s) were killed for exceeding their memory (e.g. "
                f"{killed[0]}): raise memory.safety_factor or memory.min_mb (docs/cluster.md)"
            )
    if found is not None:
        return found[0]
    tail = [line for line in lines if line.strip()][-max_lines:]
    return "\n".join(tail) or "the workflow failed without output"


def _last_exception(lines: list[str], max_lines: int) -> tuple[str, bool] | None:
    """The last exception message in ``lines`` (a specific one before Snakemake's generic
    wrappers) and whether it is generic; None if there is none."""
    # Snakemake's own catch-all wrappers are less specific than the script's exception.
    generic = {"RuleException", "CalledProcessError", "WorkflowError", "IncompleteFilesException"}
    best = None
    for index, line in enumerate(lines):
        match = _EXCEPTION_LINE.match(line.strip())
        if match and not line.startswith((" ", "\t")):
            is_generic = match.group(1) in generic
            if best is None or not is_generic or best[1]:
                best = (index, is_generic)
    if best is None:
        return None
    start = best[0]
    message = [lines[start].strip()]
    for line in lines[start + 1 : start + max_lines]:
        if not line.strip() or line.lstrip().startswith(_SNAKEMAKE_NOISE):
            break
        message.append(line.rstrip())
    return "\n".join(message).replace("cutana.exceptions.", ""), best[1]


def _text_or_empty(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _recent_logs(folder: Path, since: float, exclude: Path) -> list[Path]:
    """``*.log`` files under ``folder`` modified since ``since``, newest first."""
    found = []
    for path in Path(folder).rglob("*.log"):
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if mtime >= since and path.resolve() != exclude.resolve():
            found.append((mtime, path))
    return [path for _, path in sorted(found, reverse=True)]
