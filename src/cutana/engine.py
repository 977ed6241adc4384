"""The cutout engine: one batch of sources from FITS mosaics to finished images (SPEC §3.3, §6).

For each band the batch is grouped by file: the file is opened once (:class:`ImageCache`), all
positions come from one ``all_world2pix`` call, sizes and windows are computed with numpy, and
every stamp is read once. Stamps of one size are processed as stacks: flux conversion, mask-aware
resampling to the target resolution, channel mixing and normalisation all run on arrays, never
per pixel in Python. Sources are processed in chunks so intermediate arrays stay bounded.

Statuses (one per batch row): ``ok``; ``partial`` (the stamp crosses an image edge or holds
invalid pixels in some band); ``no_overlap`` (the stamp misses the image in every band);
``failed`` (a file of the source could not be read; the reason names it). A failed file fails
only its sources, never the batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import band_extensions
from .exceptions import CutanaError
from .extraction import StampWindows, extract_stamps, stamp_sizes, stamp_windows
from .fits_io import ImageCache, zeropoint
from .flux import flux_conversion_factor
from .wcs_utils import CutoutHeaderTemplate

#: Columns of ``BatchResult.metadata`` (SPEC §7.1), in order.
METADATA_COLUMNS = [
    "source_id",
    "ra",
    "dec",
    "idx_in_zarr",
    "diameter_arcsec",
    "diameter_pixel",
    "processing_timestamp",
    "tile",
    "extraction_origin_x",
    "extraction_origin_y",
    "extraction_size",
    "pixel_scale_arcsec",
    "valid_fraction",
    "status",
    "wcs_header",
    "bunit",
]

#: Columns of ``BatchResult.index``, in order.
INDEX_COLUMNS = ["row_index", "SourceID", "RA", "Dec", "status", "reason", "idx_in_zarr"]

#: Bytes of float32 band stacks (N, B, T, T) processed at once; bounds the working memory.
CHUNK_BYTES = 64 * 1024 * 1024
#: Bytes of float32 stamps (K, S, S) extracted and resampled at once: stamps of one size from
#: one file are cut in groups of at most this much, whatever the batch size.
GROUP_BYTES = 32 * 1024 * 1024


@dataclass
class BatchResult:
    """Output of :func:`process_batch`.

    Attributes
    ----------
    images : ndarray, shape (M, T, T, C)
        One image per source with status ok/partial, in batch order, of ``cfg["data_type"]``.
    metadata : DataFrame
        M rows, :data:`METADATA_COLUMNS` (row i describes image i): SPEC §7.1 plus ``bunit``,
        the unit of the pixel values when they keep a physical unit (normalisation ``none``
        with float32 output: ``Jy`` after flux conversion, else the reference band's
        ``BUNIT``), otherwise "".
    index : DataFrame
        One row per batch row, :data:`INDEX_COLUMNS`.
    """

    images: np.ndarray
    metadata: pd.DataFrame
    index: pd.DataFrame


@dataclass
class _BandPlan:
    """Where every source's stamp lies in one band (arrays of length N)."""

    windows: StampWindows
    pixel_scale: np.ndarray  # arcsec per pixel of the source's file
    flux_factor: np.ndarray  # multiplier to Jy (1 when conversion is off)
    file_of_row: np.ndarray  # object array: path per row
    handles: dict  # path -> ImageHandle (open, from the cache)


def _weights_matrix(cfg: Mapping) -> np.ndarray:
    """``channel_weights`` as a (B, C) float matrix, bands in key order."""
    return np.array([list(v) for v in cfg["channel_weights"].values()], dtype=np.float64)


def _paths_per_band(batch_df: pd.DataFrame, n_bands: int) -> np.ndarray:
    """(N, B) object array of file paths from the ``fits_file_paths`` column."""
    paths = np.empty((len(batch_df), n_bands), dtype=object)
    for row, entry in enumerate(batch_df["fits_file_paths"].tolist()):
        entry = list(entry) if entry is not None else []
        if len(entry) != n_bands:
            raise CutanaError(
                f"batch row {row} (SourceID {batch_df['SourceID'].iloc[row]!r}): "
                f"fits_file_paths has {len(entry)} paths but channel_weights defines {n_bands} "
                "bands. Fix: give one file per band, in the order of channel_weights."
            )
        paths[row, :] = [os.fspath(p) for p in entry]
    return paths


def _plan_band(
    batch_df: pd.DataFrame,
    band_paths: np.ndarray,
    extension,
    cfg: Mapping,
    cache: ImageCache,
    reasons: list[str],
) -> _BandPlan:
    """Open the band's files and compute every source's window (one WCS call per file)."""
    n_rows = len(batch_df)
    ra = batch_df["RA"].to_numpy(dtype=np.float64)
    dec = batch_df["Dec"].to_numpy(dtype=np.float64)
    x = np.full(n_rows, np.nan)
    y = np.full(n_rows, np.nan)
    pixel_scale = np.full(n_rows, np.nan)
    flux_factor = np.ones(n_rows, dtype=np.float64)
    sizes = np.ones(n_rows, dtype=np.int64)
    shapes = np.zeros((n_rows, 2), dtype=np.int64)
    handles = {}
    convert = bool(cfg.get("apply_flux_conversion", False))
    zp_keyword = cfg.get("flux_conversion_keywords", {}).get("AB_zeropoint", "MAGZERO")
    for path in pd.unique(band_paths):
        rows = np.flatnonzero(band_paths == path)
        try:
            handle = cache.get(path, extension)
            if convert:
                factor = flux_conversion_factor(zeropoint(handle.header, zp_keyword, path))
                flux_factor[rows] = factor
            xs, ys = handle.wcs.all_world2pix(ra[rows], dec[rows], 0, quiet=True)
            sizes[rows] = stamp_sizes(
                batch_df.iloc[rows],
                np.array([handle.pixel_scale_arcsec]),
                float(cfg.get("padding_factor", 1.0)),
            )[:, 0]
        except Exception as error:  # noqa: BLE001 - a bad file fails its sources only
            for row in rows:
                if not reasons[row]:
                    reasons[row] = f"{path} [{extension}]: {error}"
            continue
        handles[path] = handle
        x[rows], y[rows] = xs, ys
        pixel_scale[rows] = handle.pixel_scale_arcsec
        shapes[rows] = handle.shape
    windows = stamp_windows(x, y, sizes, (1, 1))
    # Windows per file: the image shape differs between files, so compute them per group.
    for path in handles:
        rows = np.flatnonzero(band_paths == path)
        part = stamp_windows(x[rows], y[rows], sizes[rows], tuple(shapes[rows[0]]))
        for name in vars(windows):
            getattr(windows, name)[rows] = getattr(part, name)
    return _BandPlan(windows, pixel_scale, flux_factor, band_paths, handles)


def _chunk_rows(n_rows: int, n_bands: int, target: int) -> int:
    """Sources per processing chunk so the (K, B, T, T) stacks stay near :data:`CHUNK_BYTES`."""
    per_source = max(1, n_bands * target * target * 4 * 3)  # bands + resample scratch
    return max(1, min(n_rows, CHUNK_BYTES // per_source))


def _groups_by_file_and_size(files: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Positions of the rows sharing a (file, stamp size), each group in row order.

    A group holds at most :data:`GROUP_BYTES` of float32 stamps (larger ones are cut), so the
    memory of extraction and resampling does not grow with the batch.
    """
    if len(files) == 0:
        return []
    _, file_codes = np.unique(files.astype(str), return_inverse=True)
    keys = file_codes.astype(np.int64) * (int(sizes.max()) + 1) + sizes.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.diff(keys[order])) + 1
    groups = []
    for group in np.split(order, starts):
        side = int(sizes[group[0]])
        step = max(1, GROUP_BYTES // max(1, side * side * 4))
        groups.extend(group[i : i + step] for i in range(0, len(group), step))
    return groups


def _process_chunk(
    rows: np.ndarray,
    plans: list[_BandPlan],
    cfg: Mapping,
    reasons: list[str],
    touched_invalid: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Extract, flux-convert and resample every band of ``rows``: (K, B, T, T) data + valid."""
    from .resample import resample_stack

    target = int(cfg["target_resolution"])
    fill = float(cfg.get("fill_value", 0.0))
    interpolation = cfg.get("interpolation", "bilinear")
    n_bands = len(plans)
    bands = np.zeros((len(rows), n_bands, target, target), dtype=np.float32)
    valid = np.zeros((len(rows), n_bands, target, target), dtype=bool)
    for b, plan in enumerate(plans):
        windows = plan.windows.take(rows)
        files = plan.file_of_row[rows]
        for local in _groups_by_file_and_size(files, windows.size):
            path = files[local[0]]
            handle = plan.handles.get(path)
            if handle is None:  # the file failed to open; its rows are already failed
                continue
            try:
                stamps, stamp_valid = extract_stamps(handle, windows.take(local), fill)
            except Exception as error:  # noqa: BLE001 - a bad file fails its sources only
                for row in rows[local]:
                    if not reasons[row]:
                        reasons[row] = f"{path}: {error}"
                continue
            touched_invalid[rows[local]] |= ~stamp_valid.all(axis=(1, 2))
            factor = plan.flux_factor[rows[local]].astype(np.float32)
            if np.any(factor != 1):
                stamps *= factor[:, None, None]
            out, out_valid = resample_stack(stamps, stamp_valid, target, interpolation)
            bands[local, b] = out
            valid[local, b] = out_valid
            del stamps, stamp_valid
    return bands, valid


def process_batch(batch_df: pd.DataFrame, cfg: Mapping, sink=None) -> BatchResult:
    """Cut, convert, resample, mix and normalise every source of a batch.

    Parameters
    ----------
    batch_df : DataFrame
        Batch rows: ``SourceID``, ``RA``, ``Dec``, ``fits_file_paths`` (one path per band),
        ``diameter_pixel`` and/or ``diameter_arcsec``; optional ``row_index`` (default: the
        position) and ``tile``.
    cfg : mapping
        Validated config (``cutana.config.validate_config``).
    sink : callable, optional
        Called with each finished chunk of images (K, T, T, C), in order, instead of
        collecting them: the batch's images are then never all in memory at once (the
        streaming Zarr writer of :func:`run_batch`). ``BatchResult.images`` is then an empty
        (0, T, T, C) array.

    Returns
    -------
    BatchResult
        Images of the ok/partial sources, their metadata and the status of every row.
    """
    from .mixing import mix_channels
    from .normalisation import normalise_batch

    batch_df = batch_df.reset_index(drop=True)
    n_rows = len(batch_df)
    weights = _weights_matrix(cfg)
    n_bands, n_channels = weights.shape
    target = int(cfg["target_resolution"])
    out_dtype = np.uint8 if cfg.get("data_type", "float32") == "uint8" else np.float32
    extensions = band_extensions(cfg)
    paths = _paths_per_band(batch_df, n_bands)
    reasons = [""] * n_rows

    with ImageCache() as cache:
        plans = [
            _plan_band(batch_df, paths[:, b], extensions[b], cfg, cache, reasons)
            for b in range(n_bands)
        ]
        failed = np.array([bool(r) for r in reasons], dtype=bool)
        misses_all = np.all([p.windows.no_overlap for p in plans], axis=0) & ~failed
        crosses_edge = np.any([p.windows.partial for p in plans], axis=0)
        todo = np.flatnonzero(~failed & ~misses_all)

        n_images = 0 if sink is not None else len(todo)
        images = np.empty((n_images, target, target, n_channels), dtype=out_dtype)
        valid_fraction = np.zeros(len(todo), dtype=np.float64)
        kept = np.ones(len(todo), dtype=bool)
        touched_invalid = np.zeros(n_rows, dtype=bool)
        step = _chunk_rows(len(todo), n_bands, target)
        n_out = 0
        for start in range(0, len(todo), step):
            rows = todo[start : start + step]
            bands, band_valid = _process_chunk(rows, plans, cfg, reasons, touched_invalid)
            mixed, mixed_valid = mix_channels(bands, band_valid, weights)
            del bands, band_valid
            finished = normalise_batch(mixed, mixed_valid, cfg)
            valid_fraction[start : start + len(rows)] = mixed_valid.mean(axis=(1, 2, 3))
            del mixed, mixed_valid
            # A file that failed while reading fails its sources (of this chunk: reasons of
            # other chunks' rows are never set here), which drop out of the images.
            keep = np.array([not reasons[r] for r in rows.tolist()], dtype=bool)
            kept[start : start + len(rows)] = keep
            if not keep.all():
                finished = finished[keep]
            if sink is not None:
                sink(finished)
            else:
                images[n_out : n_out + len(finished)] = finished
            n_out += len(finished)
            del finished

    if not kept.all():
        if sink is None:
            images = images[:n_out]
        valid_fraction = valid_fraction[kept]
        todo = todo[kept]
    failed = np.array([bool(r) for r in reasons], dtype=bool)

    status = np.full(n_rows, "ok", dtype=object)
    status[crosses_edge | touched_invalid] = "partial"
    status[misses_all] = "no_overlap"
    status[failed] = "failed"
    reason = np.array(reasons, dtype=object)
    reason[misses_all & ~failed] = "the stamp does not overlap the image in any band"
    partial_rows = (status == "partial") & ~failed
    reason[partial_rows & crosses_edge] = "the stamp crosses the image edge"
    reason[partial_rows & ~crosses_edge] = "the stamp holds invalid (NaN/inf) pixels"
    idx_in_zarr = np.full(n_rows, -1, dtype=np.int64)
    idx_in_zarr[todo] = np.arange(len(todo), dtype=np.int64)

    row_index = (
        batch_df["row_index"].to_numpy(dtype=np.int64)
        if "row_index" in batch_df
        else np.arange(n_rows, dtype=np.int64)
    )
    index = pd.DataFrame(
        {
            "row_index": row_index,
            "SourceID": batch_df["SourceID"].astype(str).to_numpy(),
            "RA": batch_df["RA"].to_numpy(dtype=np.float64),
            "Dec": batch_df["Dec"].to_numpy(dtype=np.float64),
            "status": status.astype(str),
            "reason": reason.astype(str),
            "idx_in_zarr": idx_in_zarr,
        },
        columns=INDEX_COLUMNS,
    )
    metadata = _metadata(batch_df, plans[0], todo, status, valid_fraction, target)
    metadata["bunit"] = _pixel_unit(plans[0], todo, cfg)
    return BatchResult(images=images, metadata=metadata, index=index)


def _optional_column(batch_df: pd.DataFrame, name: str) -> np.ndarray:
    """A numeric column as float64 (NaN for nulls), or all NaN when the column is absent."""
    if name not in batch_df:
        return np.full(len(batch_df), np.nan)
    return pd.to_numeric(batch_df[name], errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )


def _metadata(
    batch_df: pd.DataFrame,
    reference: _BandPlan,
    todo: np.ndarray,
    status: np.ndarray,
    valid_fraction: np.ndarray,
    target: int,
) -> pd.DataFrame:
    """SPEC §7.1 metadata of the images (reference band = first band)."""
    windows = reference.windows.take(todo)
    scale = reference.pixel_scale[todo]
    size = windows.size
    arcsec = _optional_column(batch_df, "diameter_arcsec")[todo]
    pixels = _optional_column(batch_df, "diameter_pixel")[todo]
    # Report both diameters: the catalogue's value where given, else derived from the other.
    pixels = np.where(np.isfinite(pixels), pixels, np.rint(arcsec / scale))
    arcsec = np.where(np.isfinite(arcsec), arcsec, pixels * scale)
    headers = []
    # One header template per file: the text of each cutout is the parent's with a few values
    # changed (CRPIX, CD/PC, SIP), ~50x faster than serialising a WCS per cutout.
    templates: dict[str, CutoutHeaderTemplate] = {}
    origin_x = windows.origin_x.tolist()
    origin_y = windows.origin_y.tolist()
    for k, row in enumerate(todo.tolist()):
        path = reference.file_of_row[row]
        handle = reference.handles.get(path)
        if handle is None or not np.isfinite(scale[k]):
            headers.append("")  # reference band unreadable cannot happen for ok/partial rows
            continue
        template = templates.get(path)
        if template is None:
            template = templates[path] = CutoutHeaderTemplate(handle.wcs)
        headers.append(template.text(origin_x[k], origin_y[k], target / float(size[k])))
    tiles = (
        batch_df["tile"].astype(str).to_numpy()[todo]
        if "tile" in batch_df
        else np.full(len(todo), "", dtype=object)
    )
    return pd.DataFrame(
        {
            "source_id": batch_df["SourceID"].astype(str).to_numpy()[todo],
            "ra": batch_df["RA"].to_numpy(dtype=np.float64)[todo],
            "dec": batch_df["Dec"].to_numpy(dtype=np.float64)[todo],
            "idx_in_zarr": np.arange(len(todo), dtype=np.int64),
            "diameter_arcsec": arcsec,
            "diameter_pixel": pixels,
            "processing_timestamp": np.full(len(todo), time.time()),
            "tile": tiles,
            "extraction_origin_x": windows.origin_x.astype(np.int64),
            "extraction_origin_y": windows.origin_y.astype(np.int64),
            "extraction_size": size.astype(np.int64),
            "pixel_scale_arcsec": scale * size / float(target),
            "valid_fraction": valid_fraction,
            "status": status[todo].astype(str),
            "wcs_header": headers,
        },
        columns=METADATA_COLUMNS,
    )


def _pixel_unit(reference: _BandPlan, todo: np.ndarray, cfg: Mapping) -> list[str]:
    """Unit of each image's pixels: only unstretched float32 values keep a physical unit."""
    if cfg.get("normalisation_method") != "none" or cfg.get("data_type") != "float32":
        return [""] * len(todo)
    if cfg.get("apply_flux_conversion"):
        return ["Jy"] * len(todo)
    units = []
    for row in todo:
        handle = reference.handles.get(reference.file_of_row[row])
        units.append((handle.bunit or "") if handle is not None else "")
    return units


def _batch_index(name: str) -> int:
    """The batch number from a name ``{index:05d}_{id}`` (or -1 if it has none)."""
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def _process_to_zarr(batch_df: pd.DataFrame, cfg: Mapping, batch_dir: Path) -> BatchResult:
    """Process a batch while streaming its images into ``batch_dir`` (atomic Zarr + Parquet)."""
    from .writers import ZarrShardWriter, _write_parquet, atomic_directory

    n_channels = _weights_matrix(cfg).shape[1]
    target = int(cfg["target_resolution"])
    out_dtype = np.uint8 if cfg.get("data_type", "float32") == "uint8" else np.float32
    with atomic_directory(batch_dir) as tmp:
        writer = ZarrShardWriter(tmp, (target, target, n_channels), out_dtype, len(batch_df))
        result = process_batch(batch_df, cfg, sink=writer.append)
        if writer.close() != len(result.metadata):
            raise CutanaError(
                f"internal error: {writer.count} images streamed for {len(result.metadata)} "
                "metadata rows"
            )
        _write_parquet(result.metadata, tmp / "images_metadata.parquet")
    result.images = _ZarrImages(batch_dir / "images.zarr" / "images", len(result.metadata))
    return result


class _ZarrImages:
    """The images of a written Zarr batch, opened only when used (Zarr costs ~0.4 s to import).

    Converts to an ndarray with ``np.asarray``; ``shape``, ``len`` and indexing work too.
    """

    def __init__(self, path: Path, n_images: int) -> None:
        self.path = path
        self._n_images = n_images

    def _array(self):
        import zarr

        return zarr.open_array(self.path, mode="r")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array().shape)

    def __len__(self) -> int:
        return self._n_images

    def __getitem__(self, key):
        return self._array()[key]

    def __array__(self, dtype=None, copy=None):
        data = np.asarray(self._array()[...])
        return data if dtype is None else data.astype(dtype)


def run_batch(
    batch_path: str | os.PathLike,
    batch_dir: str | os.PathLike,
    status_path: str | os.PathLike,
    cfg: Mapping,
) -> BatchResult:
    """Process one batch file and write its outputs and status rows (SPEC §3.3).

    Parameters
    ----------
    batch_path : path-like
        ``{output_dir}/.cutana/batches/{batch}.parquet``.
    batch_dir : path-like
        ``{output_dir}/batch_cutout_process_{batch}``; written atomically by the writer.
    status_path : path-like
        ``{output_dir}/.cutana/status/{batch}.parquet``; written atomically (tmp + replace)
        after the outputs, so its presence means the batch is complete.
    cfg : mapping
        The run's config (validated here).

    Returns
    -------
    BatchResult
        For Zarr output ``images`` is the written Zarr array (read lazily), as the images are
        streamed to disk chunk by chunk and never held in memory all at once.
    """
    from .config import validate_config
    from .writers import write_fits_batch

    cfg = validate_config(cfg, warn_unknown=False)
    batch_path = Path(batch_path)
    batch_dir = Path(batch_dir)
    status_path = Path(status_path)
    batch_df = pd.read_parquet(batch_path)
    zarr_output = cfg.get("output_format", "zarr") != "fits"
    if zarr_output:
        result = _process_to_zarr(batch_df, cfg, batch_dir)
    else:
        result = process_batch(batch_df, cfg)

    index = result.index.copy()
    batch_name = status_path.stem
    index["batch_index"] = np.int64(_batch_index(batch_name))
    has_image = index["idx_in_zarr"].to_numpy() >= 0
    if cfg.get("output_format", "zarr") == "fits":
        names = write_fits_batch(batch_dir, result.images, result.metadata, cfg)
        files = np.full(len(index), "", dtype=object)
        if names is not None:
            files[has_image] = [f"{batch_dir.name}/{Path(n).name}" for n in names]
        index["fits_file"] = files.astype(str)
    else:
        index["zarr_file"] = np.where(has_image, f"{batch_dir.name}/images.zarr", "")

    status_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = status_path.with_name(f"{status_path.name}.tmp-{os.getpid()}")
    index.to_parquet(tmp, index=False)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, status_path)
    return result
