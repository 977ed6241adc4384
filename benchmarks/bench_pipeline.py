"""End-to-end throughput and memory of cutana, measured side by side with its baselines.

Generates the benchmark survey with :mod:`cutana.demo` (default: 2 tiles x 4 bands x 8000^2
float32, 20,000 sources with diameters 32-256 px), then measures, for every cell of the matrix
{64, 256} px x {1, 3} channels (asinh, float32, Zarr):

* cutana end to end through ``snakemake --cores 2`` (split, profile, cutouts, gallery, index);
* the I/O floor: reading every stamp's pixels through memory maps, nothing else;
* a naive loop: astropy ``Cutout2D`` + ``skimage.transform.resize`` + astropy asinh stretch
  (on a subset of sources, rate extrapolated: it is slow);
* with ``--with-upstream``: upstream Cutana 0.4.0 from PyPI in its own virtual environment
  (``--upstream-python``, default ``/opt/upstream-cutana/bin/python``; made if absent).

Cutana runs with this interpreter, or with ``--cutana-python``: a path that does not exist is
made as a virtual environment holding only this repository and its dependencies, like
upstream's. Snakemake imports every installed executor plugin and storage transport when it
starts (the SLURM plugin imports pandas, smart_open imports boto3 where installed), so a
crowded environment starts every run later.

With ``--repeat N`` every cell runs cutana and upstream N times each, alternately, and keeps
each tool's fastest run (all run times are printed): the machine's speed drifts by ~15 % within
minutes. Before every measured run of either tool the cell's FITS files are read once and the
dirty pages written out (``sync``), so both start from a warm page cache and an idle disk.

Prints a Markdown table of cutouts/s, ratios and peak RSS. Besides the end-to-end rate (wall
time of the whole ``snakemake`` run, like upstream's ``Orchestrator.run()``) it reports the rate
of the cutout stage alone (cutout job seconds from Snakemake's benchmark files, divided by the
number of jobs that can run at once), since a short run is dominated by the fixed start-up cost.

Then (unless ``--skip-extras``):

* fixed overhead: wall time of a 10-source run end to end, with the time of every rule;
* scaling: 1k -> 10k -> 100k sources (rows of the survey catalogue repeated with new IDs and
  sub-pixel offsets): seconds per source should stay flat;
* memory vs mosaic size: the same sources cut from a mosaic of side N and 2N; the peak RSS per
  cutout job should not change (stamps are read through memory maps, never whole images).

Every figure is printed with the machine's load average at the time. Usage::

    python benchmarks/bench_pipeline.py [--size 8000] [--sources 20000] [--with-upstream]
    python benchmarks/bench_pipeline.py --size 2000 --sources 2000   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
BANDS_1 = ["VIS"]
BANDS_3 = ["VIS", "NIR_Y", "NIR_H"]
UPSTREAM_NAMES = {"VIS": "VIS", "NIR_Y": "NIR-Y", "NIR_J": "NIR-J", "NIR_H": "NIR-H"}
ALL_BANDS = ["VIS", "NIR_Y", "NIR_J", "NIR_H"]


class PeakRSS:
    """Poll the summed RSS of a process tree (the process and all its children)."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval, self.peak_mb, self.peak_single_mb = pid, interval, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            total = 0.0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    rss = proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                total += rss
                self.peak_single_mb = max(self.peak_single_mb, rss)
            self.peak_mb = max(self.peak_mb, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], cwd: Path, log: Path) -> tuple[float, PeakRSS]:
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT)
        with PeakRSS(proc.pid) as peak:
            code = proc.wait()
    elapsed = time.perf_counter() - start
    if code != 0:
        sys.exit(f"command failed ({code}): {' '.join(cmd)}; see {log}")
    return elapsed, peak


def make_survey(workdir: Path, args) -> Path:
    from cutana.demo import make_demo_survey

    survey = workdir / f"survey_{args.tiles}x{args.size}_{args.sources}"
    catalogue = survey / "catalogue.csv"
    if not catalogue.exists():
        t0 = time.perf_counter()
        make_demo_survey(
            survey,
            n_tiles=args.tiles,
            tile_size=args.size,
            n_sources=args.sources,
            seed=7,
            min_diameter_pixel=32,
            max_diameter_pixel=256,
        )
        print(f"survey generated in {time.perf_counter() - t0:.1f} s: {survey}", file=sys.stderr)
    df = pd.read_csv(catalogue)
    paths = df["fits_file_paths"].map(json.loads)
    for bands in (BANDS_1, BANDS_3):
        sub = df.copy()
        picks = [ALL_BANDS.index(b) for b in bands]
        sub["fits_file_paths"] = paths.map(lambda p, picks=picks: json.dumps([p[i] for i in picks]))
        sub.to_csv(survey / f"catalogue_{len(bands)}band.csv", index=False)
    warm_page_cache(sorted(survey.glob("*.fits")))
    return survey


def warm_page_cache(paths) -> None:
    """Read files once, as the issue's figures were measured with a warm page cache; then
    write out every dirty page (``sync``), so that no earlier run's writes (each run writes
    all its cutouts) are flushed during the next measured run."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
    os.sync()


def cell_files(survey: Path, bands: list[str]) -> list[Path]:
    """The FITS files a cell reads (every tile's file of each of its bands)."""
    return sorted(p for band in bands for p in survey.glob(f"tile*_{band}.fits"))


def load() -> str:
    """The 1-minute load average (2 cores on the reference machine)."""
    return f"{os.getloadavg()[0]:.1f}"


def logged_peak_rss_mb(results: Path) -> list[float]:
    """The largest peak RSS the cutout jobs logged (kernel high-water mark, MB), as a list.

    Snakemake's ``max_rss`` comes from samples a few tenths of a second apart and misses the
    peak of a job that short; it reads only the job's command, not a warm worker.
    """
    from cutana.index import logged_peak_rss_mb as largest_logged_peak

    logs = glob.glob(str(results / ".cutana" / "logs" / "cutout_batch" / "*.log"))
    peak = largest_logged_peak(logs)
    return [] if peak is None else [peak]


def benchmark_rows(results: Path) -> dict[str, list[dict]]:
    """Snakemake benchmark rows per rule (``s``, ``max_rss``, ...) of a finished run."""
    rules: dict[str, list[dict]] = {}
    root = results / ".cutana" / "benchmarks"
    for tsv in sorted(glob.glob(str(root / "**" / "*.tsv"), recursive=True)):
        rel = Path(tsv).relative_to(root)
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        with open(tsv) as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                parsed = {}
                for key, value in row.items():
                    try:
                        parsed[key] = float(value)
                    except (TypeError, ValueError):
                        parsed[key] = value
                rules.setdefault(rule, []).append(parsed)
    return rules


def cutana_cell(
    survey: Path,
    workdir: Path,
    res: int,
    bands: list[str],
    args,
    catalogue: Path | None = None,
    name: str | None = None,
    batch: int | None = None,
    keep: bool = False,
) -> dict:
    out = workdir / (name or f"cutana_{res}px_{len(bands)}ch")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    n = len(bands)
    config = {
        "source_catalogue": str(catalogue or survey / f"catalogue_{n}band.csv"),
        "output_dir": str(out / "results"),
        "target_resolution": res,
        "normalisation_method": "asinh",
        "data_type": "float32",
        "output_format": "zarr",
        "N_batch_cutout_process": batch or args.batch,
        "channel_weights": {
            b: [1.0 if c == i else 0.0 for c in range(n)] for i, b in enumerate(bands)
        },
        "fits_extensions": ["PRIMARY"],
    }
    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    cmd = [
        args.cutana_python,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(out),
        "--configfile",
        str(cfg_path),
        "--cores",
        str(args.cores),
        "--quiet",
        "all",
    ]
    load_before = load()
    elapsed, peak = run_measured(cmd, out, out / "snakemake.log")
    index = pd.read_parquet(out / "results" / "source_to_zarr_mapping.parquet")
    n_ok = int(index["status"].isin(["ok", "partial"]).sum())
    rules = benchmark_rows(out / "results")
    cutout = rules.get("cutout_batch", [])
    job_rss = [row["max_rss"] for row in cutout if isinstance(row.get("max_rss"), float)]
    job_rss += logged_peak_rss_mb(out / "results")
    job_seconds = [row["s"] for row in cutout if isinstance(row.get("s"), float)]
    parallel = max(1, min(args.cores, len(job_seconds)))
    stage_s = sum(job_seconds) / parallel if job_seconds else float("nan")
    rule_s = {
        rule: sum(r["s"] for r in rows if isinstance(r.get("s"), float))
        for rule, rows in rules.items()
    }
    if not keep:
        shutil.rmtree(out / "results", ignore_errors=True)
    return {
        "elapsed": elapsed,
        "n": n_ok,
        "rate": n_ok / elapsed,
        "stage_rate": n_ok / stage_s if stage_s > 0 else float("nan"),
        "n_jobs": len(job_seconds),
        "rule_s": rule_s,
        "peak_job_mb": max(job_rss) if job_rss else float("nan"),
        "peak_tree_mb": peak.peak_mb,
        "load": f"{load_before}->{load()}",
    }


def stamp_windows(df: pd.DataFrame, path: str):
    from astropy.io import fits
    from astropy.wcs import WCS

    with fits.open(path) as hdul:
        wcs = WCS(hdul[0].header).celestial
    x, y = wcs.all_world2pix(df["RA"].to_numpy(), df["Dec"].to_numpy(), 0)
    return x, y


def io_floor(survey: Path, bands: list[str]) -> dict:
    """Read every stamp's pixels via memmap slices, one band file after another; no processing."""
    from astropy.io import fits

    df = pd.read_csv(survey / f"catalogue_{len(bands)}band.csv")
    paths = df["fits_file_paths"].map(json.loads)
    start = time.perf_counter()
    total = 0.0
    for band in range(len(bands)):
        files = paths.map(lambda p, band=band: p[band])
        for path, group in df.groupby(files):
            x, y = stamp_windows(group, path)
            size = group["diameter_pixel"].to_numpy()
            with fits.open(path, memmap=True) as hdul:
                data = hdul[0].data
                ny, nx = data.shape
                for xi, yi, s in zip(x, y, size, strict=True):
                    x0 = max(int(np.ceil(xi - s / 2)), 0)
                    y0 = max(int(np.ceil(yi - s / 2)), 0)
                    x1, y1 = min(x0 + int(s), nx), min(y0 + int(s), ny)
                    if x1 > x0 and y1 > y0:
                        total += float(np.array(data[y0:y1, x0:x1])[0, 0])
    elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "n": len(df), "rate": len(df) / elapsed}


def naive_loop(survey: Path, bands: list[str], res: int, limit: int) -> dict:
    """astropy Cutout2D + skimage resize + astropy asinh stretch, one source at a time."""
    from astropy.io import fits
    from astropy.nddata import Cutout2D
    from astropy.visualization import AsinhStretch, PercentileInterval
    from astropy.wcs import WCS
    from skimage.transform import resize

    df = pd.read_csv(survey / f"catalogue_{len(bands)}band.csv").head(limit)
    paths = df["fits_file_paths"].map(json.loads)
    handles: dict[str, tuple] = {}
    stretch, interval = AsinhStretch(0.7), PercentileInterval(99.8)
    start = time.perf_counter()
    done = 0
    for ra, dec, size, files in zip(df["RA"], df["Dec"], df["diameter_pixel"], paths, strict=True):
        channels = []
        try:
            for path in files:
                if path not in handles:
                    hdul = fits.open(path, memmap=True)
                    handles[path] = (hdul, WCS(hdul[0].header))
                hdul, wcs = handles[path]
                x, y = wcs.all_world2pix(ra, dec, 0)
                cut = Cutout2D(
                    hdul[0].data,
                    (float(x), float(y)),
                    int(size),
                    mode="partial",
                    fill_value=np.nan,
                    copy=True,
                ).data
                img = resize(np.nan_to_num(cut), (res, res), preserve_range=True)
                channels.append(stretch(interval(img)))
        except Exception:  # noqa: BLE001 - the naive loop simply skips what it cannot cut
            continue
        np.stack(channels, axis=-1).astype(np.float32)
        done += 1
    elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "n": done, "rate": done / elapsed}


def upstream_cell(survey: Path, workdir: Path, res: int, bands: list[str], python: str) -> dict:
    out = workdir / f"upstream_{res}px_{len(bands)}ch"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    cmd = [
        python,
        str(Path(__file__).with_name("upstream_runner.py")),
        str(survey / f"catalogue_{len(bands)}band.csv"),
        str(out / "results"),
        str(res),
        *[UPSTREAM_NAMES[b] for b in bands],
    ]
    load_before = load()
    elapsed, peak = run_measured(cmd, out, out / "upstream.log")
    n = 0
    for meta in glob.glob(str(out / "results" / "**" / "images_metadata.parquet"), recursive=True):
        n += len(pd.read_parquet(meta))
    shutil.rmtree(out / "results", ignore_errors=True)
    return {
        "elapsed": elapsed,
        "n": n,
        "rate": n / elapsed,
        "peak_tree_mb": peak.peak_mb,
        "load": f"{load_before}->{load()}",
    }


def scaled_catalogue(survey: Path, n_rows: int, bands: list[str]) -> Path:
    """``n_rows`` sources: the survey's rows repeated with new IDs and sub-pixel offsets."""
    path = survey / f"catalogue_{len(bands)}band_{n_rows}.csv"
    if path.exists():
        return path
    base = pd.read_csv(survey / f"catalogue_{len(bands)}band.csv")
    rng = np.random.default_rng(n_rows)
    picks = np.arange(n_rows) % len(base)
    df = base.iloc[picks].reset_index(drop=True)
    df["SourceID"] = [f"S{i:08d}" for i in range(n_rows)]
    repeat = picks != np.arange(n_rows)  # first copy unchanged, later copies offset
    jitter = rng.uniform(-1.5e-5, 1.5e-5, size=(n_rows, 2)) * repeat[:, None]  # < 0.5 px
    df["RA"] = (df["RA"] + jitter[:, 0]) % 360.0
    df["Dec"] = df["Dec"] + jitter[:, 1]
    df.to_csv(path, index=False)
    return path


def fixed_overhead(survey: Path, workdir: Path, args) -> dict:
    """Wall time of a 10-source run (64 px, 1 channel) end to end, and of each rule."""
    catalogue = survey / "catalogue_1band_10.csv"
    pd.read_csv(survey / "catalogue_1band.csv").head(10).to_csv(catalogue, index=False)
    runs = [
        cutana_cell(survey, workdir, 64, BANDS_1, args, catalogue=catalogue, name="overhead")
        for _ in range(args.repeat_overhead)
    ]
    return min(runs, key=lambda r: r["elapsed"])


def scaling(survey: Path, workdir: Path, args) -> list[tuple[int, dict]]:
    """Seconds per source at 1k, 10k, 100k sources (64 px x 1 channel)."""
    rows = []
    for n_rows in (int(v) for v in args.scaling.split(",") if v.strip()):
        catalogue = scaled_catalogue(survey, n_rows, BANDS_1)
        result = cutana_cell(
            survey, workdir, 64, BANDS_1, args, catalogue=catalogue, name=f"scaling_{n_rows}"
        )
        rows.append((n_rows, result))
        print(f"scaling {n_rows}: {result['elapsed']:.1f} s", file=sys.stderr)
    return rows


def memory_vs_mosaic(workdir: Path, args) -> list[tuple[int, dict]]:
    """Peak RSS per cutout job for the same sources cut from mosaics of side N and 2N."""
    from cutana.demo import make_demo_survey

    rows = []
    for side in (args.mosaic_side, 2 * args.mosaic_side):
        survey = workdir / f"mosaic_survey_{side}"
        if not (survey / "catalogue.csv").exists():
            make_demo_survey(
                survey, n_tiles=1, tile_size=side, n_sources=args.mosaic_sources, seed=11,
                min_diameter_pixel=32, max_diameter_pixel=256,
            )  # fmt: skip
        df = pd.read_csv(survey / "catalogue.csv")
        paths = df["fits_file_paths"].map(json.loads)
        picks = [ALL_BANDS.index(b) for b in BANDS_3]
        df["fits_file_paths"] = paths.map(lambda p, picks=picks: json.dumps([p[i] for i in picks]))
        catalogue = survey / "catalogue_3band.csv"
        df.to_csv(catalogue, index=False)
        result = cutana_cell(
            survey, workdir, 256, BANDS_3, args, catalogue=catalogue, name=f"mosaic_{side}"
        )
        rows.append((side, result))
        print(f"mosaic {side}: peak job RSS {result['peak_job_mb']:.0f} MB", file=sys.stderr)
        shutil.rmtree(survey, ignore_errors=True)
    return rows


def print_extras(overhead, scale_rows, mosaic_rows, args) -> None:
    if overhead:
        print(
            f"\nFixed overhead: 10 sources (64 px x 1 ch) end to end in "
            f"{overhead['elapsed']:.1f} s wall (best of {args.repeat_overhead}; load "
            f"{overhead['load']}); rule times (s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in overhead["rule_s"].items())
        )
    if scale_rows:
        print(
            "\n| sources (64 px x 1 ch) | wall (s) | ms per source | cutout stage/s | jobs | load |"
        )
        print("|---|---|---|---|---|---|")
        for n_rows, r in scale_rows:
            print(
                f"| {n_rows} | {r['elapsed']:.1f} | {1000 * r['elapsed'] / n_rows:.3f} | "
                f"{r['stage_rate']:.0f} | {r['n_jobs']} | {r['load']} |"
            )
    if mosaic_rows:
        print("\n| mosaic side (256 px x 3 ch) | sources | peak RSS per job (MB) | load |")
        print("|---|---|---|---|")
        for side, r in mosaic_rows:
            print(f"| {side} | {r['n']} | {r['peak_job_mb']:.0f} | {r['load']} |")


def ensure_venv(python: str, *requirements: str) -> str:
    """``python``; where it does not exist yet, first make its venv and pip-install
    ``requirements`` there (upstream: ``cutana==0.4.0``; cutana: this repository, editable, no
    extras), so each tool runs beside only its own dependencies."""
    if not Path(python).exists():
        venv = Path(python).parent.parent
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *requirements], check=True)
    return python


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench_out")
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--sources", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--cells", default="64x1,64x3,256x1,256x3")
    parser.add_argument("--naive-limit", type=int, default=1500)
    parser.add_argument("--with-upstream", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each tool per cell (the fastest is kept)"
    )
    parser.add_argument("--upstream-python", default="/opt/upstream-cutana/bin/python")
    parser.add_argument(
        "--cutana-python",
        default=sys.executable,
        help="interpreter of cutana's snakemake runs (default: this one); one that does not "
        "exist yet is made as a venv with only cutana installed",
    )
    parser.add_argument("--skip-extras", action="store_true", help="matrix only")
    parser.add_argument("--skip-matrix", action="store_true", help="extras only")
    parser.add_argument("--repeat-overhead", type=int, default=3, help="0: skip")
    parser.add_argument("--scaling", default="1000,10000,100000", help='"": skip')
    parser.add_argument("--mosaic-side", type=int, default=4000, help="0: skip")
    parser.add_argument("--mosaic-sources", type=int, default=2000)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    compile_cutana()
    survey = make_survey(workdir, args)
    upstream = ensure_venv(args.upstream_python, "cutana==0.4.0") if args.with_upstream else None
    args.cutana_python = ensure_venv(args.cutana_python, "-e", str(REPO))

    print(f"machine: {os.cpu_count()} cores, load {load()} at start", file=sys.stderr)
    rows = []
    if not args.skip_matrix:
        floors = {n: io_floor(survey, bands) for n, bands in ((1, BANDS_1), (3, BANDS_3))}
        for cell in args.cells.split(","):
            res, n = (int(v) for v in cell.split("x"))
            bands = BANDS_1 if n == 1 else BANDS_3
            ours_runs, theirs_runs = [], []
            for _ in range(args.repeat):  # alternately, each after warming the cell's files
                warm_page_cache(cell_files(survey, bands))
                ours_runs.append(cutana_cell(survey, workdir, res, bands, args))
                if upstream:
                    warm_page_cache(cell_files(survey, bands))
                    theirs_runs.append(upstream_cell(survey, workdir, res, bands, upstream))
            ours = fastest(ours_runs)
            theirs = fastest(theirs_runs) if upstream else None
            naive = naive_loop(survey, bands, res, args.naive_limit)
            rows.append((res, n, ours, naive, theirs, floors[n]))
            print(
                f"{res}px x{n}: cutana {ours['rate']:.0f}/s (stage {ours['stage_rate']:.0f}/s, "
                f"load {ours['load']}, runs {ours['runs']}), naive {naive['rate']:.0f}/s"
                + (
                    f", upstream {theirs['rate']:.0f}/s (load {theirs['load']}, "
                    f"runs {theirs['runs']})"
                    if theirs
                    else ""
                ),
                file=sys.stderr,
            )
    overhead = scale_rows = mosaic_rows = None
    if not args.skip_extras:
        overhead = fixed_overhead(survey, workdir, args) if args.repeat_overhead > 0 else None
        scale_rows = scaling(survey, workdir, args)
        mosaic_rows = memory_vs_mosaic(workdir, args) if args.mosaic_side > 0 else None

    if rows:
        print_matrix(rows, upstream, args)
    print_extras(overhead, scale_rows, mosaic_rows, args)


def fastest(runs: list[dict]) -> dict:
    """The run with the shortest wall time, with every run's time (s) under ``runs``."""
    best = dict(min(runs, key=lambda run: run["elapsed"]))
    best["runs"] = "/".join(f"{run['elapsed']:.1f}" for run in runs)
    return best


def compile_cutana() -> None:
    """Write the bytecode of cutana's modules, as a regular ``pip install`` does.

    An editable install under ``PYTHONDONTWRITEBYTECODE=1`` (set on the benchmark machine)
    never caches it, so every job would compile the modules it imports (~0.05 s), a cost
    neither a regular install nor upstream's venv pays.
    """
    import compileall

    import cutana

    compileall.compile_dir(str(Path(cutana.__file__).parent), quiet=1)


def print_matrix(rows, upstream, args) -> None:
    print(
        f"\nSurvey: {args.tiles} tiles x 4 bands x {args.size}^2 float32, {args.sources} "
        f"sources (32-256 px), asinh, float32, Zarr, batches of {args.batch}, "
        f"--cores {args.cores}; fastest of {args.repeat} run(s) per tool and cell\n"
    )
    header = (
        "| cell | cutana cutouts/s (end to end) | cutout stage/s | peak RSS per job (MB) "
        "| naive Cutout2D/s | vs naive | I/O floor stamps/s | % of floor | load |"
    )
    sep = "|---|---|---|---|---|---|---|---|---|"
    if upstream:
        header += " upstream 0.4.0/s | upstream peak RSS (MB) | vs upstream | upstream load |"
        sep += "---|---|---|---|"
    print(header)
    print(sep)
    for res, n, ours, naive, theirs, floor in rows:
        line = (
            f"| {res} px x {n} ch | {ours['rate']:.0f} ({ours['n']} in {ours['elapsed']:.1f}"
            f" s; runs {ours['runs']} s) | {ours['stage_rate']:.0f} | "
            f"{ours['peak_job_mb']:.0f} | {naive['rate']:.0f} | "
            f"{ours['rate'] / naive['rate']:.1f}x | {floor['rate']:.0f} | "
            f"{100 * ours['rate'] / floor['rate']:.0f} % | {ours['load']} |"
        )
        if theirs:
            line += (
                f" {theirs['rate']:.0f} (runs {theirs['runs']} s) | {theirs['peak_tree_mb']:.0f} | "
                f"{ours['rate'] / theirs['rate']:.1f}x | {theirs['load']} |"
            )
        print(line)


if __name__ == "__main__":
    main()
