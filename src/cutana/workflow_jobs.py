"""The commands the workflow's rules run: ``python -m cutana.workflow_jobs RULE --log LOG ...``.

Each rule's ``shell:`` runs one of these thin adapters between Snakemake and the library: they
read the paths from the command line, call one function of ``cutana`` and log to the rule's
``log:`` file. They are commands rather than Snakemake ``script:`` files because a script job
first imports Snakemake to unpickle its ``snakemake`` object: ~60 ms of every job's start
(measured: 0.25 s to start Python and import the engine, 0.30-0.33 s with that preamble, means
of 10), i.e. ~0.6 s of a 20-job run on 2 cores and ~0.25 s of the four stages a 10-source run
waits for one after another.

The run's validated configuration comes in the environment variable ``CUTANA_RUN_CONFIG``
(JSON, :data:`cutana.config.CONFIG_VARIABLE`), which the Snakefile sets in its own process:
Snakemake runs a job's shell command with its environment, locally as in a SLURM job (whose
``snakemake`` reads the Snakefile again). The command lines stay short for
``--printshellcmds``. ``--config FILE`` (JSON or YAML) replaces the variable to run a step by
hand.
"""

from __future__ import annotations

import os

# Every job is one single-threaded process (the rules declare threads: 1; a run's parallelism is
# its jobs side by side), so native thread pools only compete with the other jobs for the cores.
# OpenBLAS starts a busy thread per core when NumPy is imported (0.19 s of CPU per job process,
# measured on 10 imports: 4.6 -> 2.7 s), and OpenCV splits a 256 px resize across threads,
# which is slower than one thread (57 -> 46 us per area enlargement). Read by both libraries
# when they load, so set before they are imported (``import cutana`` loads neither); a value
# the user exported is kept.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
os.environ.setdefault("OPENCV_FOR_THREADS_NUM", "1")

import argparse  # noqa: E402 (after the thread settings, on purpose)
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

from . import warm_jobs  # noqa: E402
from .config import CONFIG_VARIABLE, load_run_config  # noqa: E402
from .exceptions import CutanaError  # noqa: E402

#: The stages whose benchmark files the run summary reads, besides every cutout job's.
STAGE_BENCHMARKS = ("make_demo_survey", "split_catalogue", "profile_memory")

#: What the cutout, index and gallery jobs import: loaded before a warm server is forked
#: (cutana.warm_jobs). With the modules their first calls import lazily: ``numpy.ma``
#: (``np.unique``), ``multiprocessing.synchronize`` (numcodecs' Blosc lock, which is made in
#: each worker: one made in the server would be shared by all of them), ~10 ms per job.
WARM_MODULES = (
    "numpy",
    "numpy.ma",
    "multiprocessing.synchronize",
    "pyarrow",
    "pyarrow.compute",
    "pyarrow.parquet",
    "cv2",
    "numcodecs",
    "cutana.engine",
    "cutana.extraction",
    "cutana.fits_io",
    "cutana.flux",
    "cutana.gallery",
    "cutana.index",
    "cutana.memory_model",
    "cutana.mixing",
    "cutana.normalisation",
    "cutana.resample",
    "cutana.wcs_utils",
    "cutana.writers",
)

#: Steps served by a warm server, and steps that start one when none runs (the Snakefile's
#: ``onstart`` hook normally has: ``python -m cutana.workflow_jobs serve``). The split is not
#: served: it starts as the server does and imports astropy, which the later jobs do not.
WARM_STEPS = ("profile_memory", "cutout_batch", "merge_index", "gallery")
SERVER_STARTING_STEPS = ("profile_memory", "cutout_batch")
#: Steps whose warm worker runs the next job too (cutana.warm_jobs): the many cutout jobs. The
#: profiling job measures a fresh worker's memory; the other steps run once per run.
REUSED_WORKER_STEPS = ("cutout_batch",)

#: The argument that makes ``python -m cutana.workflow_jobs`` a warm server (onstart hook).
SERVE_COMMAND = "serve"


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
    numpy, astropy, pyarrow and OpenCV: a fifth of a 1000-source 64 px job. Called only when
    every output file is closed (their data is then in the kernel, which a process exit cannot
    lose); the cutout outputs are also fsynced and renamed into place before.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _read_manifest(batches_dir: str) -> dict:
    with open(os.path.join(batches_dir, "manifest.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _status_paths(manifest: Mapping, status_pattern: str) -> list[str]:
    # The rule's status inputs, one per batch of the manifest (the pattern is PATHS.status):
    # named here rather than on the command line, which would grow with the number of batches.
    return [status_pattern.replace("{batch}", entry["name"]) for entry in manifest["batches"]]


def make_demo_survey_job(args, config: dict, log: logging.Logger) -> None:
    from .demo import make_demo_survey

    demo = dict(config["demo"])
    demo.pop("dir", None)
    out_dir = Path(args.catalogue).parent
    log.info("demo survey in %s with %s", out_dir, demo)
    log.info("catalogue written: %s", make_demo_survey(out_dir, **demo))


def split_catalogue_job(args, config: dict, log: logging.Logger) -> None:
    # split_catalogue runs the checks of cutana.inputs_check.check_inputs (catalogue rows and
    # every FITS file) in its single streaming pass and writes nothing unless they pass.
    from .catalogue import split_catalogue

    work_dir = Path(args.batches).parent
    manifest = split_catalogue(args.catalogue, config, work_dir, check_files=True)
    log.info(
        "%d rows in %d batches over %d tiles",
        manifest["total_rows"],
        len(manifest["batches"]),
        len(manifest["tiles"]),
    )


def profile_memory_job(args, config: dict, log: logging.Logger) -> None:
    from .memory_model import build_memory_model

    model = build_memory_model(args.batches, config, args.model, args.scratch)
    log.info(
        "memory model: base %.1f MB + %.3g MB per unit (sample of %d sources, peak %.1f MB)",
        model["base_mb"],
        model["mb_per_unit"],
        model["sample"]["n_sources"],
        model["sample"]["peak_mb"],
    )


def cutout_batch_job(args, config: dict, log: logging.Logger) -> None:
    from .engine import run_batch
    from .memory_model import peak_rss_mb, reset_peak_rss
    from .writers import remove_stale_temporaries

    # A killed earlier attempt of this batch may have left its temporary folder/file behind
    # (writes are tmp + rename); only this batch's leftovers whose writer has died are
    # removed (after `kill -9` of Snakemake alone, its jobs run on and finish the batch).
    for output in (args.batch_dir, args.status):
        for leftover in remove_stale_temporaries(output):
            log.info("removed the leftover of an interrupted attempt: %s", leftover)
    # Recorded so the declared memory can be checked against the measured peak (benchmark).
    log.info("declared resources: mem_mb=%s", args.mem_mb)
    # The peak logged below is this job's, also in a warm worker that ran an earlier one.
    reset_peak_rss()
    # The Snakefile validated and completed the config before any job was created.
    run_batch(args.batch, args.batch_dir, args.status, config, config_validated=True)
    # Snakemake's benchmark samples memory every few tenths of a second and misses the peak
    # of a short job; the kernel's high-water mark does not.
    log.info("peak RSS %.1f MB", peak_rss_mb())


def merge_index_job(args, config: dict, log: logging.Logger) -> None:
    from .index import merge_index

    manifest = _read_manifest(args.batches)
    # Timings of the stages and of every batch's cutout job (absent files are skipped).
    benchmark_paths = [
        os.path.join(args.benchmarks_dir, f"{stage}.tsv") for stage in STAGE_BENCHMARKS
    ] + [
        os.path.join(args.benchmarks_dir, "cutout_batch", f"{entry['name']}.tsv")
        for entry in manifest["batches"]
    ]
    # The cutout jobs' logged peak RSS: Snakemake's benchmark misses a warm worker's memory.
    cutout_logs = [
        os.path.join(args.logs_dir, "cutout_batch", f"{entry['name']}.log")
        for entry in manifest["batches"]
    ]
    written = merge_index(
        _status_paths(manifest, args.status_pattern),
        manifest,
        config,
        args.output_dir,
        benchmark_paths=benchmark_paths,
        log_paths={"cutout_batch": cutout_logs},
    )
    log.info("written: %s", written)


def gallery_job(args, config: dict, log: logging.Logger) -> None:
    from .gallery import make_gallery
    from .index import merge_status_arrow

    manifest = _read_manifest(args.batches)
    # The same rows merge_index writes, merged here so both rules run at once.
    status_paths = _status_paths(manifest, args.status_pattern)
    index = merge_status_arrow(status_paths, int(manifest["total_rows"]), config)
    n_samples = config["gallery"]["n_samples"]
    make_gallery(args.output_dir, index, config, n_samples)
    log.info("gallery of up to %d sources written", n_samples)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cutana.workflow_jobs",
        description="Run one job of cutana's Snakemake workflow (the rules call this).",
    )
    steps = parser.add_subparsers(dest="step", required=True)

    def step(name: str, run: Callable, *options: str) -> argparse.ArgumentParser:
        sub = steps.add_parser(name)
        sub.set_defaults(run=run)
        sub.add_argument("--log", required=True, help="the rule's log file")
        sub.add_argument("--config", help=f"config file instead of ${CONFIG_VARIABLE}")
        sub.add_argument(
            "--settings",
            metavar="DIGEST",
            help="hash of the settings the outputs depend on; ignored here, it is in the "
            "rule's command so that Snakemake reruns the job when they change",
        )
        for option in options:
            sub.add_argument(f"--{option}", required=True)
        return sub

    step("make_demo_survey", make_demo_survey_job, "catalogue")
    step("split_catalogue", split_catalogue_job, "catalogue", "batches")
    step("profile_memory", profile_memory_job, "batches", "model", "scratch")
    step("cutout_batch", cutout_batch_job, "batch", "batch-dir", "status", "mem-mb")
    step(
        "merge_index", merge_index_job,
        "batches", "status-pattern", "benchmarks-dir", "logs-dir", "output-dir",
    )  # fmt: skip
    step("gallery", gallery_job, "batches", "status-pattern", "output-dir")
    return parser


def run_step(argv: list[str]) -> None:
    """Run the job named by ``argv`` in this process (a warm worker may run more after it)."""
    args = _parser().parse_args(argv)
    config = load_run_config(args.config)
    try:
        with logged_step(args.log, config.get("log_level", "INFO"), args.step) as log:
            runner = "a warm server's worker" if warm_jobs.IN_WORKER else "its command"
            log.info("run by %s, pid %d", runner, os.getpid())
            args.run(args, config, log)
    except CutanaError as error:
        # Bad input (a catalogue, a FITS file): the message names the file, row, column and
        # fix; the traceback, of no use to the user, is in the job's log. The first line keeps
        # the form "SomeError: message" that Orchestrator's error_from_log looks for.
        print(f"{type(error).__name__}: {error}\n(details: {args.log})", file=sys.stderr)
        raise SystemExit(1) from None


def import_warm_modules() -> None:
    """Import :data:`WARM_MODULES` (before a warm server serves its first job)."""
    import importlib

    for module in WARM_MODULES:
        importlib.import_module(module)


def server_command() -> list[str]:
    """The command of a run's warm server, spawned by the Snakefile's ``onstart`` hook."""
    return [sys.executable, "-m", "cutana.workflow_jobs", SERVE_COMMAND]


def main(argv: list[str] | None = None) -> None:
    """Run the job named by ``argv``: in a worker of the warm server when one runs (cutout
    jobs, cutana.warm_jobs), else here, first starting a server if this job is one that does.
    With ``serve``, be the run's warm server.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    step = argv[0] if argv else None
    warm = warm_jobs.enabled()
    if step == SERVE_COMMAND:
        if warm:
            warm_jobs.serve(run_step, import_warm_modules, reusable=REUSED_WORKER_STEPS)
        return
    if warm and step in WARM_STEPS:
        status = warm_jobs.run_via_server(argv)
        if status is not None:
            os._exit(status)
    if warm and step in SERVER_STARTING_STEPS:
        import_warm_modules()
        warm_jobs.start_server(run_step, reusable=REUSED_WORKER_STEPS)
    run_step(argv)
    # Every output is closed (written to a temporary name and renamed into place).
    exit_without_teardown()


if __name__ == "__main__":
    main()
