"""Tests of cutana.memory_model: stamp sizes, workloads, the fit and a real child-process
measurement with a fake batch runner whose memory use is known."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from cutana import memory_budget, memory_model
from cutana.config import validate_config


def make_config(**overrides):
    base = {
        "source_catalogue": "unused.csv",
        "channel_weights": {"A": [1.0, 0.0], "B": [0.0, 1.0]},
        "target_resolution": 32,
        "padding_factor": 1.0,
    }
    base.update(overrides)
    return validate_config(base, warn_unknown=False)


def batch_frame(diameter_pixel, diameter_arcsec=None, paths=("a.fits", "b.fits")):
    n_rows = len(diameter_pixel)
    return pd.DataFrame(
        {
            "row_index": np.arange(n_rows, dtype=np.int64),
            "SourceID": [f"S{i}" for i in range(n_rows)],
            "RA": np.full(n_rows, 10.0),
            "Dec": np.full(n_rows, -5.0),
            "fits_file_paths": [list(paths)] * n_rows,
            "diameter_pixel": pd.array(diameter_pixel, dtype="Float64"),
            "diameter_arcsec": pd.array(
                diameter_arcsec if diameter_arcsec is not None else [None] * n_rows,
                dtype="Float64",
            ),
            "tile": ["t0"] * n_rows,
        }
    )


def test_stamp_sizes_apply_padding_and_per_band_pixel_scale():
    cfg = make_config(padding_factor=1.5)
    frame = batch_frame([10.0, None], [None, 2.0])
    scales = {"a.fits": 0.1, "b.fits": 0.2}
    calls = []

    def pixel_scale(path, extension):
        calls.append((path, extension))
        return scales[path]

    sizes = memory_model.stamp_sizes(frame, cfg, pixel_scale)
    # Row 0: 10 px x 1.5 in both bands. Row 1: 2" / 0.1 = 20 px and 2" / 0.2 = 10 px, x 1.5.
    assert sizes.tolist() == [[15, 15], [30, 15]]
    assert sorted(calls) == [("a.fits", "PRIMARY"), ("b.fits", "PRIMARY")]


def test_source_workloads_follow_the_documented_formula():
    cfg = make_config(target_resolution=16)
    sizes = np.array([[10, 20], [1, 1]])
    workloads = memory_model.source_workloads(sizes, cfg)
    output_units = 16 * 16 * 2
    assert workloads.tolist() == [100 + 400 + output_units, 2 + output_units]


def points(*pairs):
    return {"points": [{"workload": w, "peak_mb": p} for w, p in pairs]}


def test_fit_takes_the_slope_from_the_largest_runs_and_scales_with_attempt():
    cfg = make_config(memory={"safety_factor": 1.0, "min_mb": 100, "job_overhead_mb": 0})
    # The warm-up peak (first-use buffers) lies above the line through the two larger runs.
    model = memory_model.fit_model(points((1e4, 230.0), (6e5, 250.0), (1.1e6, 300.0)), cfg)
    assert model["mb_per_unit"] == pytest.approx(50.0 / 5e5)
    # The intercept lifts the line to the warm-up point, so no measured peak is under-predicted.
    assert model["base_mb"] == pytest.approx(230.0 - 1e-4 * 1e4)
    for workload, peak in [(1e4, 230.0), (6e5, 250.0), (1.1e6, 300.0)]:
        assert memory_model.mem_mb_for(workload, model) >= peak
    assert memory_model.mem_mb_for(1.1e6, model, attempt=3) == 3 * memory_model.mem_mb_for(
        1.1e6, model
    )
    # The floor applies to tiny batches.
    assert memory_model.mem_mb_for(0, {**model, "base_mb": 1.0}) == 100


def test_job_overhead_is_added_to_every_estimate():
    points_ = points((1e4, 230.0), (6e5, 250.0), (1.1e6, 300.0))
    without = memory_model.fit_model(points_, make_config(memory={"job_overhead_mb": 0}))
    with_overhead = memory_model.fit_model(points_, make_config(memory={"job_overhead_mb": 150}))
    for workload in (1e4, 1.1e6):
        assert memory_model.mem_mb_for(workload, with_overhead) == pytest.approx(
            memory_model.mem_mb_for(workload, without) + 150, abs=1
        )


def test_noisy_measurement_never_gives_a_slope_below_the_floor():
    cfg = make_config()
    model = memory_model.fit_model(points((10, 250.0), (5e5, 245.0), (1e6, 240.0)), cfg)
    assert model["mb_per_unit"] == memory_model.MIN_MB_PER_UNIT
    assert model["base_mb"] == pytest.approx(250.0 - memory_model.MIN_MB_PER_UNIT * 10)


def test_unknown_batch_gets_the_fallback_memory():
    model = {"batches": {}, "base_mb": 1, "mb_per_unit": 1, "safety_factor": 1, "min_mb": 1}
    assert memory_model.mem_mb_for_batch("00000_0123456789", model, 2) == (
        2 * memory_model.FALLBACK_MEM_MB
    )


def write_batches(batches_dir, diameters_per_batch):
    batches_dir.mkdir(parents=True)
    entries = []
    first_row = 0
    for index, diameters in enumerate(diameters_per_batch):
        name = f"{index:05d}_{index:010x}"
        frame = batch_frame(diameters, paths=("a.fits",))
        frame["row_index"] += first_row
        first_row += len(frame)
        frame.to_parquet(batches_dir / f"{name}.parquet", index=False)
        entries.append({"name": name, "index": index, "n_sources": len(frame), "tile": "t0"})
    manifest = {"total_rows": first_row, "batches": entries, "tiles": {"t0": ["a.fits"]}}
    (batches_dir / "manifest.json").write_text(json.dumps(manifest))


def test_scan_batches_records_every_batch_and_samples_the_largest_sources(tmp_path):
    cfg = make_config(channel_weights={"A": [1.0]}, target_resolution=16)
    write_batches(tmp_path / "batches", [[10, 300, 20], [250, 5], [40]])
    batches, sample = memory_model.scan_batches(tmp_path / "batches", cfg, n_sample=3)
    output_units = 16 * 16
    assert batches["00000_0000000000"] == {
        "n_sources": 3,
        "workload": float(100 + 90000 + 400 + 3 * output_units),
    }
    assert set(batches) == {"00000_0000000000", "00001_0000000001", "00002_0000000002"}
    assert sample["diameter_pixel"].to_pylist() == [300, 250, 40]
    assert sample["row_index"].to_pylist() == [1, 3, 5]


FAKE_RUNNER = textwrap.dedent(
    """
    import numpy as np
    import pandas as pd

    BYTES_PER_UNIT = 256

    def run_batch(batch_path, batch_dir, status_path, cfg, config_validated=False):
        # Holds BYTES_PER_UNIT bytes per workload unit (S^2 per source, one band, T=16, C=1).
        table = pd.read_parquet(batch_path)
        units = int((table["diameter_pixel"].astype(float) ** 2 + 16 * 16).sum())
        buffer = np.ones(units * BYTES_PER_UNIT // 8)
        assert buffer.sum() > 0
        pd.DataFrame({"n": [len(table)]}).to_parquet(status_path)
    """
)


def test_child_process_measurement_recovers_a_known_memory_cost(tmp_path):
    (tmp_path / "fake_runner.py").write_text(FAKE_RUNNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    cfg = make_config(
        channel_weights={"A": [1.0]},
        target_resolution=16,
        memory={"profile_sources": 20, "safety_factor": 1.0, "min_mb": 100},
    )
    write_batches(tmp_path / "batches", [[200] * 15, [200] * 15])
    model_path = tmp_path / "model.json"
    # A parent much larger than the child's runs (as a long test session or a Snakemake script
    # can be): Linux carries ru_maxrss over fork/exec, so a measurement based on it would see
    # only the parent's size here and find no cost per source.
    parent_ballast = np.ones(600 * 2**20 // 8)
    model = memory_model.build_memory_model(
        tmp_path / "batches",
        cfg,
        model_path,
        tmp_path / "scratch",
        runner="fake_runner:run_batch",
        env=env,
    )
    del parent_ballast
    assert json.loads(model_path.read_text()) == model
    assert not (tmp_path / "scratch").exists()
    assert model["sample"]["n_sources"] == 20
    assert [p["workload"] for p in model["sample"]["points"]] == [
        2 * 40256.0, 10 * 40256.0, 20 * 40256.0,
    ]  # fmt: skip
    expected_slope = 256 / 2**20
    assert 0.9 * expected_slope < model["mb_per_unit"] < 1.1 * expected_slope
    # Every measured peak is predicted (safety factor 1, so only the fit counts).
    for point in model["sample"]["points"]:
        assert memory_model.mem_mb_for(point["workload"], model) >= point["peak_mb"]
    assert memory_model.mem_mb_for_batch("00000_0000000000", model) >= model["base_mb"]


def test_failing_child_raises_with_its_error_message(tmp_path):
    (tmp_path / "broken_runner.py").write_text(
        "def run_batch(*args, **kwargs):\n    raise ValueError('engine exploded')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    cfg = make_config(channel_weights={"A": [1.0]})
    sample = batch_frame([20, 30], paths=("a.fits",)).assign(_workload=[1.0, 2.0])
    with pytest.raises(RuntimeError, match="engine exploded"):
        memory_model.measure_peak_rss(
            sample, cfg, tmp_path / "scratch", runner="broken_runner:run_batch", env=env
        )


def test_workload_term_is_capped_by_the_engines_working_memory():
    cfg = make_config(channel_weights={"A": [1.0, 0.0, 0.0], "B": [0.0, 1.0, 0.0]})
    model = memory_model.fit_model(
        {"points": [{"workload": 1e5, "peak_mb": 150.0}, {"workload": 1e6, "peak_mb": 210.0}]},
        cfg,
    )
    assert model["working_mb"] == pytest.approx(memory_model.engine_working_mb(cfg))
    assert 100 < model["working_mb"] < 1000
    linear = memory_model.mem_mb_for(1e6, model, n_sources=10)
    assert linear == memory_model.mem_mb_for(1e6, model)  # below the cap: the fitted line
    huge = 1e12  # the line alone would declare ~70 TB
    capped = memory_model.mem_mb_for(huge, model, n_sources=5000)
    expected = (
        model["safety_factor"]
        * (model["base_mb"] + model["working_mb"] + model["per_source_mb"] * 5000)
        + model["job_overhead_mb"]
    )
    assert capped == pytest.approx(expected, abs=1)
    assert memory_model.mem_mb_for(huge, model) > 1000 * capped
    assert memory_model.mem_mb_for(huge, model, attempt=2, n_sources=5000) == pytest.approx(
        2 * capped, abs=2
    )


def test_engine_groups_stay_within_the_group_budget(monkeypatch):
    from cutana import engine

    monkeypatch.setattr(engine, "GROUP_BYTES", 100 * 100 * 4 * 3)  # three 100 px stamps
    files = np.array(["a.fits"] * 7 + ["b.fits"] * 2 + ["a.fits"], dtype=object)
    sizes = np.array([100] * 7 + [100, 100] + [50])
    groups = engine._groups_by_file_and_size(files, sizes)
    assert sorted(np.concatenate(groups).tolist()) == list(range(10))
    for group in groups:
        assert len(set(files[group])) == 1 and len(set(sizes[group])) == 1
        assert len(group) * int(sizes[group[0]]) ** 2 * 4 <= engine.GROUP_BYTES or len(group) == 1
    assert sorted(len(g) for g in groups) == [1, 1, 2, 3, 3]


def test_declared_memory_covers_a_real_batch_far_larger_than_the_sample(tmp_path, make_wcs):
    """The profile runs 20 sources; a 600-source batch of equal 150 px stamps (one big group,
    pages of a whole 3000 px wide image) must still run within what the model declares."""
    from conftest import write_image

    rng = np.random.default_rng(5)
    shape = (1500, 3000)
    wcs = make_wcs(shape, ra=10.0, dec=-5.0, scale_arcsec=0.3)
    image = write_image(tmp_path / "a.fits", rng.normal(size=shape).astype(np.float32), wcs)
    n_rows = 600
    x = rng.uniform(0, shape[1], n_rows)
    y = rng.uniform(0, shape[0], n_rows)
    ra, dec = wcs.all_pix2world(x, y, 0)
    frame = batch_frame([150] * n_rows, paths=(str(image),))
    frame["RA"], frame["Dec"] = ra, dec
    batches = tmp_path / "batches"
    batches.mkdir()
    frame.sort_values("Dec").to_parquet(batches / "00000_0000000000.parquet", index=False)
    manifest = {
        "total_rows": n_rows,
        "batches": [{"name": "00000_0000000000", "index": 0, "n_sources": n_rows, "tile": "t0"}],
        "tiles": {"t0": [str(image)]},
    }
    (batches / "manifest.json").write_text(json.dumps(manifest))
    cfg = make_config(
        channel_weights={"A": [1.0]},
        target_resolution=64,
        fits_extensions=["PRIMARY"],
        memory={"profile_sources": 20},
    )
    # Both measured in fresh processes, like a cutout job (not this large test process).
    env = dict(os.environ)
    model = memory_model.build_memory_model(
        batches, cfg, tmp_path / "m.json", tmp_path / "s1", env=env
    )
    whole = pd.read_parquet(batches / "00000_0000000000.parquet")
    workloads = memory_model.source_workloads(np.full((n_rows, 1), 150), cfg)
    measured = memory_model.measure_peak_rss(
        whole.assign(_workload=workloads), cfg, tmp_path / "s2", env=env
    )
    declared = memory_model.mem_mb_for_batch("00000_0000000000", model)
    assert declared >= measured["peak_mb"], (declared, measured)
    # The cap alone (what is declared whenever the fitted line runs above it) covers it too,
    # without the safety factor and the job overhead.
    bare = {**model, "mb_per_unit": 1.0, "safety_factor": 1.0, "job_overhead_mb": 0}
    capped = memory_model.mem_mb_for_batch("00000_0000000000", bare)
    assert capped < memory_model.mem_mb_for(model["batches"]["00000_0000000000"]["workload"], bare)
    assert capped >= measured["peak_mb"], (capped, measured)


def test_in_process_measurement_resets_the_peak_before_each_run(tmp_path, monkeypatch):
    """Without ``env`` the sample runs in this process; its earlier peak must not leak in."""
    if not memory_model.reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    (tmp_path / "fake_runner_here.py").write_text(FAKE_RUNNER)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = make_config(
        channel_weights={"A": [1.0]},
        target_resolution=16,
        memory={"profile_sources": 20, "safety_factor": 1.0, "min_mb": 100},
    )
    write_batches(tmp_path / "batches", [[200] * 15, [200] * 15])
    spike = np.ones(400 * 2**20 // 8)  # a 400 MB peak of this process before the profile
    del spike
    model = memory_model.build_memory_model(
        tmp_path / "batches",
        cfg,
        tmp_path / "model.json",
        tmp_path / "scratch",
        runner="fake_runner_here:run_batch",
    )
    expected_slope = 256 / 2**20
    assert 0.9 * expected_slope < model["mb_per_unit"] < 1.1 * expected_slope
    peaks = [p["peak_mb"] for p in model["sample"]["points"]]
    assert peaks == sorted(peaks)
    assert peaks[-1] - peaks[0] > 0.8 * 18 * 40256 * 256 / 2**20


def test_profiling_job_process_never_imports_pandas(tmp_path, make_wcs):
    """The profiling job scans every batch and runs its sample in its own process; pandas
    (~0.25 s to import) must not be part of that fixed cost of every run."""
    from conftest import run_in_fresh_process, write_image

    rng = np.random.default_rng(3)
    shape = (400, 400)
    wcs = make_wcs(shape, ra=10.0, dec=-5.0, scale_arcsec=0.3)
    image = write_image(tmp_path / "a.fits", rng.normal(size=shape).astype(np.float32), wcs)
    batches = tmp_path / "batches"
    batches.mkdir()
    entries = []
    for index, diameters in enumerate([[20, 40, 30], [50, 10], [60, 15]]):
        ra, dec = wcs.all_pix2world(rng.uniform(50, 350, len(diameters)), [200] * len(diameters), 0)
        frame = batch_frame(diameters, paths=(str(image),))
        frame["RA"], frame["Dec"] = ra, dec
        name = f"{index:05d}_{index:010x}"
        frame.to_parquet(batches / f"{name}.parquet", index=False)
        entries.append({"name": name, "index": index, "n_sources": len(frame), "tile": "t0"})
    manifest = {"total_rows": 7, "batches": entries, "tiles": {"t0": [str(image)]}}
    (batches / "manifest.json").write_text(json.dumps(manifest))
    cfg = make_config(channel_weights={"A": [1.0]}, memory={"profile_sources": 5})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    modules, (n_sample, names) = run_in_fresh_process(
        [
            "from cutana.memory_model import build_memory_model",
            f"cfg = json.load(open({str(tmp_path / 'cfg.json')!r}))",
            f"model = build_memory_model({str(batches)!r}, cfg, {str(tmp_path / 'm.json')!r}, "
            f"{str(tmp_path / 'scratch')!r})",
        ],
        "[model['sample']['n_sources'], sorted(model['batches'])]",
    )
    assert "pandas" not in modules
    assert n_sample == 5
    assert names == ["00000_0000000000", "00001_0000000001", "00002_0000000002"]


def test_the_snakefiles_memory_module_imports_neither_numpy_nor_pyarrow():
    # Snakemake's process imports it for every run (the cutout jobs' mem_mb); pyarrow alone
    # would cost ~30 ms of each run's start.
    modules = subprocess.run(
        [sys.executable, "-c", "import sys, cutana.memory_budget; print(*sorted(sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "cutana.memory_budget" in modules
    assert not {"numpy", "pyarrow", "cutana.memory_model"} & set(modules), modules
    # The names the workflow uses are memory_model's too.
    assert memory_model.mem_mb_for_batch is memory_budget.mem_mb_for_batch
