"""The ``cutana`` command line.

::

    cutana run CONFIG [--cores N] [--profile P] [--no-progress] [-- SNAKEMAKE ARGS...]
    cutana demo --out DIR [--tiles 2 --size 2000 --sources 500 --seed 42]
    cutana validate CATALOGUE [--config CONFIG]
    cutana config [--format yaml|toml]

``cutana run`` executes the packaged Snakemake workflow (the same rules as ``snakemake`` in the
repository) through :class:`cutana.orchestrator.Orchestrator`; arguments after ``--`` go to
Snakemake unchanged. Exit status: 0 completed, 1 failed, 2 bad usage or configuration,
130 stopped by Ctrl-C (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .progress_report import counts_text

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _error(message: str) -> None:
    print(f"cutana: error: {message}", file=sys.stderr)


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="cutana",
        description="Cut normalised image stamps out of FITS survey mosaics (Snakemake workflow).",
        epilog="Arguments after `--` in `cutana run` are passed to Snakemake unchanged.",
    )
    parser.add_argument("--version", action="version", version=f"cutana {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the workflow on a config file",
        description="Validate CONFIG, then run the packaged Snakemake workflow with it. Relative "
        "paths in CONFIG are relative to the current directory. Ctrl-C stops cleanly; running "
        "the same command again resumes without redoing finished batches.",
    )
    run.add_argument("config", help="YAML or TOML config file (keys of `cutana config`)")
    run.add_argument(
        "--cores",
        type=int,
        help="cores for Snakemake (default: the config's max_workers or the CPUs, if fewer)",
    )
    run.add_argument("--profile", help="Snakemake profile, e.g. a SLURM profile directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    demo = commands.add_parser(
        "demo",
        help="write the synthetic demo survey and a config to process it",
        description="Write a synthetic Euclid-like survey (FITS tiles + catalogue) into DIR and "
        "DIR/cutana_config.yaml, ready for `cutana run DIR/cutana_config.yaml`.",
    )
    demo.add_argument("--out", required=True, help="output directory")
    demo.add_argument("--tiles", type=int, default=2, help="number of tiles (default 2)")
    demo.add_argument("--size", type=int, default=2000, help="tile side in pixels (default 2000)")
    demo.add_argument("--sources", type=int, default=500, help="number of sources (default 500)")
    demo.add_argument("--seed", type=int, default=42, help="random seed (default 42)")

    validate = commands.add_parser(
        "validate",
        help="check a catalogue and its FITS files without processing",
        description="Run every check a run makes before starting (catalogue columns and "
        "values, FITS files, WCS, flux keyword) and print a summary or the errors.",
    )
    validate.add_argument("catalogue", help="CSV or Parquet catalogue")
    validate.add_argument(
        "--config",
        help="config file (bands, extensions, flux keyword); without it one band per "
        "catalogue path is assumed and flux conversion is checked with the default keyword",
    )

    config = commands.add_parser("config", help="print the default configuration")
    config.add_argument("--format", choices=("yaml", "toml"), default="yaml")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cutana`` console script.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    snakemake_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, snakemake_args = argv[:split], argv[split + 1 :]
    args = _build_parser().parse_args(argv)
    if snakemake_args and args.command != "run":
        _error("arguments after `--` are only accepted by `cutana run`")
        return EXIT_USAGE
    if args.command == "run":
        return run_command(args, snakemake_args)
    if args.command == "demo":
        return demo_command(args)
    if args.command == "validate":
        return validate_command(args)
    return config_command(args)


# ---------------------------------------------------------------------- run
def _load_config(path: str) -> dict:
    from .config import load_config_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    return load_config_file(path)


def run_command(args: argparse.Namespace, snakemake_args: Sequence[str]) -> int:
    """``cutana run``: validate the config, run the workflow with a progress bar."""
    from .exceptions import CutanaError
    from .orchestrator import Orchestrator

    try:
        raw = _load_config(args.config)
    except FileNotFoundError as error:
        _error(str(error))
        return EXIT_USAGE
    except Exception as error:  # YAML/TOML syntax errors do not name the file: we do
        _error(f"cannot read config file {args.config}: {error}")
        return EXIT_USAGE
    try:
        orchestrator = Orchestrator(
            raw,
            snakemake_args=snakemake_args,
            cores=args.cores,
            profile=args.profile,
            poll_interval=0.5,
        )
    except (CutanaError, ValueError) as error:
        _error(f"{args.config}: {error}")
        return EXIT_USAGE

    # The results dict's error is printed below: the Orchestrator's log record of it would
    # say it twice. (One filter object: adding it again, for another run, is a no-op.)
    logging.getLogger("cutana.orchestrator").addFilter(_drop_result_records)
    print(f"cutana: output in {orchestrator.output_dir}", file=sys.stderr)
    interrupted = False
    try:
        result = orchestrator.start_processing(wait=False)
        if result["status"] == "running":
            print(f"cutana: Snakemake log in {orchestrator.log_path}", file=sys.stderr)
            _follow_with_progress_bar(orchestrator, show=not args.no_progress)
        result = orchestrator.wait()
    except KeyboardInterrupt:
        interrupted = True
        print("\ncutana: stopping (run the same command again to resume) ...", file=sys.stderr)
        orchestrator.stop_processing()
        result = orchestrator.wait()
    _print_result(result)
    if interrupted or result["status"] == "stopped":
        return EXIT_INTERRUPTED
    return EXIT_OK if result["status"] == "completed" else EXIT_FAILED


def _drop_result_records(record: logging.LogRecord) -> bool:
    from .orchestrator import RESULT_RECORD

    return not getattr(record, RESULT_RECORD, False)


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _follow_with_progress_bar(orchestrator, show: bool) -> None:
    """Poll the Orchestrator until the run ends, drawing sources done, rate and ETA."""
    from tqdm import tqdm

    # Our own rate/ETA (from the Orchestrator) instead of tqdm's: tqdm would count the batches
    # of an interrupted earlier run, found at start, as instantly processed.
    bar = tqdm(
        total=None,
        unit="src",
        disable=not show,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} sources [{elapsed}{postfix}]",
        desc="cutana",
    )

    def draw(report) -> None:
        if report.total_sources and bar.total != report.total_sources:
            bar.total = report.total_sources
        bar.n = report.completed_sources
        bar.set_postfix_str(
            f"{report.throughput:.1f} src/s, ETA {_format_seconds(report.eta_seconds)}, "
            f"batches {report.completed_batches}/{report.total_batches or '?'}",
            refresh=False,
        )
        bar.refresh()

    try:
        while orchestrator.is_running():
            draw(orchestrator.get_progress_for_ui())
            time.sleep(0.5)
        draw(orchestrator.get_progress_for_ui())  # the last frame shows the end state
    finally:
        bar.close()


def _print_result(result: dict) -> None:
    stream = sys.stdout if result["status"] == "completed" else sys.stderr
    counts = counts_text(result.get("counts", {}))
    done = (
        f"{result['completed_sources']}/{result['total_sources']} sources in "
        f"{result['completed_batches']}/{result['total_batches']} batches ({counts})"
    )
    if result["status"] == "completed":
        print(f"cutana: completed: {done} in {_format_seconds(result.get('runtime'))}", file=stream)
    elif result["total_batches"]:
        # What the output folder holds (batches of this or earlier runs): a run that failed
        # before its first job must not seem to have made them.
        print(f"cutana: {result['status']}; {result['output_dir']} holds {done}", file=stream)
    else:
        print(f"cutana: {result['status']}", file=stream)
    if result["status"] == "completed":
        print(f"cutana: index: {result['mapping_path']}", file=stream)
    if result.get("error"):
        _error(result["error"])


# ---------------------------------------------------------------------- demo
def demo_command(args: argparse.Namespace) -> int:
    """``cutana demo``: write the demo survey and a ready-to-run config."""
    import yaml

    from .demo import demo_config, make_demo_survey
    from .exceptions import CutanaError

    out = Path(args.out).expanduser().resolve()
    try:
        catalogue = make_demo_survey(
            out, n_tiles=args.tiles, tile_size=args.size, n_sources=args.sources, seed=args.seed
        )
    except (CutanaError, ValueError) as error:
        _error(str(error))
        return EXIT_USAGE
    config = demo_config(out)
    config["output_dir"] = str(out / "cutana_output")
    config_path = out / "cutana_config.yaml"
    with open(config_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    print(f"catalogue: {catalogue}")
    print(f"config:    {config_path}")
    print(f"next:      cutana run {config_path}")
    return EXIT_OK


# ---------------------------------------------------------------------- validate
def _bands_from_catalogue(catalogue: str) -> dict[str, list[float]]:
    """One placeholder band per path in the catalogue's first row (used without --config)."""
    from .catalogue import iter_catalogue

    for chunk in iter_catalogue(catalogue, chunk_rows=100):
        for paths in chunk["fits_file_paths"]:
            if paths is not None and not isinstance(paths, str) and len(paths):
                return {f"band{index + 1}": [1.0] for index in range(len(paths))}
    return {"PRIMARY": [1.0]}


def validate_command(args: argparse.Namespace) -> int:
    """``cutana validate``: the pre-run checks of SPEC §5, without processing."""
    from .config import validate_config
    from .exceptions import ConfigValidationError, CutanaError
    from .inputs_check import check_inputs

    try:
        raw = _load_config(args.config) if args.config else {}
        if not args.config:
            raw["channel_weights"] = _bands_from_catalogue(args.catalogue)
        raw["source_catalogue"] = args.catalogue
        try:
            config = validate_config(raw)
        except ConfigValidationError as config_error:
            # Every problem at once: the catalogue's own checks (columns, values) need no
            # config, so they are reported with the config's problems.
            from .catalogue_preprocessor import load_and_validate_catalogue

            try:
                load_and_validate_catalogue(args.catalogue)
            except (CutanaError, FileNotFoundError, ValueError) as catalogue_error:
                _error(str(catalogue_error))
            raise config_error from None
        summary = check_inputs(config)
    except (CutanaError, FileNotFoundError, ValueError) as error:
        _error(str(error))
        return EXIT_FAILED
    print(f"{args.catalogue}: valid")
    for key, value in summary.items():
        if key == "pixel_scales" and isinstance(value, dict):
            scales = sorted({round(float(v), 6) for v in value.values()})
            print(f"  pixel scales (arcsec): {scales}")
            continue
        print(f"  {key}: {value}")
    return EXIT_OK


# ---------------------------------------------------------------------- config
def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def config_command(args: argparse.Namespace) -> int:
    """``cutana config``: print every key with its default."""
    from .config import default_config_dict

    config = default_config_dict()
    if args.format == "toml":
        import tomli_w

        # TOML has no null: keys defaulting to None are omitted (they stay None when loaded).
        sys.stdout.write(tomli_w.dumps(_without_none(config)))
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
