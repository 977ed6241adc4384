"""The cutout engine: one batch of sources from FITS mosaics to finished images (SPEC §3.3, §6).

For each band the batch is grouped by file: the file is opened once (:class:`ImageCache`), all
positions come from one ``all_world2pix`` call, sizes and windows are computed with numpy, and
every stamp is read once. A batch written by ``split_catalogue`` carries those positions and
each image's layout, so its images are memory-mapped without astropy (see
:func:`cutana.fits_io.map_image`). Stamps of one size are processed as stacks: flux
conversion, mask-aware resampling to the target resolution, channel mixing and normalisation all
run on arrays, never per pixel in Python. Sources are processed in chunks so intermediate arrays
stay bounded.

Statuses (one per batch row): ``ok``; ``partial`` (the stamp crosses an image edge or holds
invalid pixels in some band); ``no_overlap`` (the stamp misses the image in every band);
``failed`` (a file of the source could not be read; the reason names it). A failed file fails
only its sources, never the batch.

Batches in and tables out are pyarrow tables handled through :mod:`cutana.arrow_tables`, so a
cutout job never imports pandas (~0.25 s of start-up per job); :class:`BatchResult` converts its
tables to DataFrames only when asked, and :func:`process_batch` also takes a DataFrame.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import arrow_tables
from .config import band_extensions
from .exceptions import CutanaError
from .extraction import StampWindows, extract_stamps, stamp_sizes, stamp_windows
from .fits_io import LAYOUTS_METADATA_KEY, POSITION_COLUMNS, ImageCache, zeropoint
from .flux import flux_conversion_factor

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

#: glibc ``mallopt`` parameters (malloc.h) and the values a cutout job sets, see
#: :func:`keep_freed_memory_for_reuse`.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Arrays up to this size come from the heap (glibc's largest allowed value on 64-bit).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: Freed heap memory up to this size is kept by the process instead of handed back.
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024


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
        ``BUNIT``), otherwise "". Made from ``metadata_table`` on first access.
    index : DataFrame
        One row per batch row, :data:`INDEX_COLUMNS`. Made from ``index_table``.
    metadata_table, index_table : pyarrow.Table
        The same tables as Arrow tables (what the writers use).
    """

    def __init__(self, images, metadata_table: pa.Table, index_table: pa.Table) -> None:
        self.images = images
        self.metadata_table = metadata_table
        self.index_table = index_table
        self._frames: dict = {}

    def _frame(self, name: str):
        if name not in self._frames:
            self._frames[name] = getattr(self, f"{name}_table").to_pandas()
        return self._frames[name]

    @property
    def metadata(self):
        return self._frame("metadata")

    @property
    def index(self):
        return self._frame("index")


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


def _batch_columns(batch) -> dict:
    """The engine's columns of a batch (a pyarrow Table or a DataFrame) as arrays.

    ``RA``, ``Dec``, ``diameter_pixel``, ``diameter_arcsec`` as float64 (NaN for nulls),
    ``row_index`` int64 (the position when absent), ``SourceID`` and ``tile`` (None when
    absent) as object arrays of str, ``fits_file_paths`` as a list of lists.
    """
    if not isinstance(batch, pa.Table):
        batch = batch.reset_index(drop=True)
    columns = {
        name: arrow_tables.float_column(batch, name)
        for name in ("RA", "Dec", "diameter_pixel", "diameter_arcsec")
    }
    columns["row_index"] = (
        arrow_tables.int_column(batch, "row_index")
        if arrow_tables.has_column(batch, "row_index")
        else np.arange(arrow_tables.n_rows(batch), dtype=np.int64)
    )
    columns["SourceID"] = arrow_tables.text_column(batch, "SourceID")
    columns["tile"] = (
        arrow_tables.text_column(batch, "tile") if arrow_tables.has_column(batch, "tile") else None
    )
    columns["fits_file_paths"] = arrow_tables.values_of(batch, "fits_file_paths")
    return columns


def _paths_per_band(columns: dict, n_bands: int) -> np.ndarray:
    """(N, B) object array of file paths from the ``fits_file_paths`` column."""
    entries = columns["fits_file_paths"]
    paths = np.empty((len(entries), n_bands), dtype=object)
    for row, entry in enumerate(entries):
        entry = list(entry) if entry is not None else []
        if len(entry) != n_bands:
            raise CutanaError(
                f"batch row {row} (SourceID {columns['SourceID'][row]!r}): "
                f"fits_file_paths has {len(entry)} paths but channel_weights defines {n_bands} "
                "bands. Fix: give one file per band, in the order of channel_weights."
            )
        paths[row, :] = [os.fspath(p) for p in entry]
    return paths


def _precomputed_layouts(batch, n_bands: int) -> tuple[list[dict], np.ndarray | None]:
    """The batch's image layouts and (N, B, 2) pixel positions made by ``split_catalogue``.

    Returns ``([], None)`` when the batch has none (a DataFrame, an older batch, or a tile
    whose files could not be described), so every image is opened with astropy.
    """
    if not isinstance(batch, pa.Table) or not all(
        name in batch.column_names for name in POSITION_COLUMNS
    ):
        return [], None
    metadata = batch.schema.metadata or {}
    if LAYOUTS_METADATA_KEY not in metadata:
        return [], None
    layouts = [layout for layout in json.loads(metadata[LAYOUTS_METADATA_KEY]) if layout]
    positions = np.full((batch.num_rows, n_bands, 2), np.nan)
    for axis, name in enumerate(POSITION_COLUMNS):
        for row, values in enumerate(batch[name].to_pylist()):
            if values is not None and len(values) == n_bands:
                positions[row, :, axis] = [np.nan if v is None else v for v in values]
    return layouts, positions


def _plan_band(
    columns: dict,
    band_paths: np.ndarray,
    extension,
    cfg: Mapping,
    cache: ImageCache,
    reasons: list[str],
    positions: np.ndarray | None = None,
) -> _BandPlan:
    """Open the band's files and compute every source's window (one WCS call per file).

    ``positions`` (N, 2), when given, are the sources' pixel positions in this band computed by
    ``split_catalogue``; they are used for the files mapped from their layouts (which have no
    WCS object), the others' positions come from their WCS.
    """
    n_rows = len(band_paths)
    ra, dec = columns["RA"], columns["Dec"]
    diameters = {k: columns[k] for k in ("diameter_pixel", "diameter_arcsec")}
    x = np.full(n_rows, np.nan)
    y = np.full(n_rows, np.nan)
    pixel_scale = np.full(n_rows, np.nan)
    flux_factor = np.ones(n_rows, dtype=np.float64)
    sizes = np.ones(n_rows, dtype=np.int64)
    shapes = np.zeros((n_rows, 2), dtype=np.int64)
    handles = {}
    convert = bool(cfg.get("apply_flux_conversion", False))
    zp_keyword = cfg.get("flux_conversion_keywords", {}).get("AB_zeropoint", "MAGZERO")
    for path in dict.fromkeys(band_paths.tolist()):  # unique, in order of appearance
        rows = np.flatnonzero(band_paths == path)
        try:
            handle = cache.get(path, extension)
            if convert:
                factor = flux_conversion_factor(zeropoint(handle.header, zp_keyword, path))
                flux_factor[rows] = factor
            if handle.wcs is None:  # mapped from the layout the split made with this WCS
                if positions is None:
                    raise CutanaError("internal error: an image layout without positions")
                xs, ys = positions[rows, 0], positions[rows, 1]
            else:
                xs, ys = handle.wcs.all_world2pix(ra[rows], dec[rows], 0, quiet=True)
            sizes[rows] = stamp_sizes(
                {k: v[rows] for k, v in diameters.items()},
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


def _resample_whole_stamps(
    rows: np.ndarray,
    windows: StampWindows,
    files: np.ndarray,
    plan: _BandPlan,
    target: int,
    interpolation: str,
    band_out: np.ndarray,
    band_valid: np.ndarray,
) -> np.ndarray:
    """Cut and resample the stamps lying wholly inside their image, one at a time.

    Most stamps of a batch lie wholly inside their image and are finite: they are read
    straight from the image into one stamp buffer and resampled straight into their plane of
    ``band_out`` (``(K, T, T)``), which is what :func:`extract_stamps` + :func:`resample_stack`
    compute for them, without those functions' per-group masks, fills and copies (engine at
    64 px x 3 ch: 1942 -> 2362 sources/s). Returns the positions (into ``rows``) of the other
    stamps, for that general path:
    stamps crossing the image edge or missing it, holding a non-finite pixel, with
    nearest-neighbour enlarging, or whose read fails (the general path reports the error).
    """
    from .resample import ENLARGE_FLAGS, resize_flag, resize_plane

    whole = ~windows.partial & ~windows.no_overlap
    candidates = np.flatnonzero(whole)
    if candidates.size == 0:
        return np.arange(len(rows))
    # Image order (file, then rows, then columns), as extract_stamps reads within a group.
    file_codes = np.unique(files[candidates].astype(str), return_inverse=True)[1]
    order = np.lexsort((windows.large_x0[candidates], windows.large_y0[candidates], file_codes))
    factors = plan.flux_factor[rows].astype(np.float32)
    flags: dict[int, int | None] = {}
    rest = np.ones(len(rows), dtype=bool)
    for local in candidates[order].tolist():
        handle = plan.handles.get(files[local])
        read_into = getattr(handle, "read_into", None)
        side = int(windows.size[local])
        if side not in flags:
            flags[side] = resize_flag(side, target, interpolation)
        flag = flags[side]
        if read_into is None or flag == ENLARGE_FLAGS["nearest"]:
            continue
        stamp = np.empty((side, side), dtype=np.float32)
        try:
            read_into(
                stamp,
                int(windows.large_y0[local]),
                int(windows.large_y1[local]),
                int(windows.large_x0[local]),
                int(windows.large_x1[local]),
            )
        except Exception:  # noqa: BLE001 - the general path reads it again and reports why
            continue
        if not np.isfinite(stamp).all():
            continue
        if factors[local] != 1:
            stamp *= factors[local]
        resize_plane(stamp, flag, band_out[local])
        band_valid[local] = True
        rest[local] = False
    return np.flatnonzero(rest)


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
        rest = _resample_whole_stamps(
            rows, windows, files, plan, target, interpolation, bands[:, b], valid[:, b]
        )
        for group in _groups_by_file_and_size(files[rest], windows.size[rest]):
            local = rest[group]
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


def _valid_fractions(valid: np.ndarray | None, n_images: int) -> np.ndarray:
    """Fraction of valid values of each image (1 for all; counted only where some are not)."""
    fractions = np.ones(n_images)
    if valid is None:
        return fractions
    flat = valid.reshape(n_images, -1)
    some_invalid = np.flatnonzero(~flat.all(axis=1))
    fractions[some_invalid] = np.count_nonzero(flat[some_invalid], axis=1) / flat.shape[1]
    return fractions


def process_batch(batch, cfg: Mapping, sink=None) -> BatchResult:
    """Cut, convert, resample, mix and normalise every source of a batch.

    Parameters
    ----------
    batch : DataFrame or pyarrow.Table
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
    from .mixing import interleave_planes, mix_planes
    from .normalisation import normalise_planes

    columns = _batch_columns(batch)
    n_rows = len(columns["RA"])
    weights = _weights_matrix(cfg)
    n_bands, n_channels = weights.shape
    target = int(cfg["target_resolution"])
    out_dtype = np.uint8 if cfg.get("data_type", "float32") == "uint8" else np.float32
    extensions = band_extensions(cfg)
    paths = _paths_per_band(columns, n_bands)
    reasons = [""] * n_rows

    layouts, positions = _precomputed_layouts(batch, n_bands)
    with ImageCache(layouts) as cache:
        plans = [
            _plan_band(
                columns,
                paths[:, b],
                extensions[b],
                cfg,
                cache,
                reasons,
                None if positions is None else positions[:, b],
            )
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
            # Channel planes (K, C, T, T) throughout; the channels are interleaved once, for
            # the output's (K, T, T, C) layout. The bands are finite and 0 where invalid, as
            # resample_stack and the whole-stamp path write them.
            mixed, mixed_valid = mix_planes(bands, band_valid, weights, finite=True)
            # One band per channel in order: the planes are the bands themselves, finite. (A
            # weighted sum could overflow float32, so other mixes are checked.)
            mixed_is_bands = mixed is bands
            del bands, band_valid
            finished = normalise_planes(mixed, mixed_valid, cfg, finite=mixed_is_bands)
            valid_fraction[start : start + len(rows)] = _valid_fractions(mixed_valid, len(rows))
            del mixed, mixed_valid
            if n_channels == 1:
                finished = finished.reshape(len(rows), target, target, 1)
            else:
                finished = interleave_planes(finished)
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

    index = arrow_tables.table_of(
        {
            "row_index": arrow_tables.numeric_array(columns["row_index"], np.int64),
            "SourceID": arrow_tables.string_array(columns["SourceID"]),
            "RA": arrow_tables.numeric_array(columns["RA"], np.float64),
            "Dec": arrow_tables.numeric_array(columns["Dec"], np.float64),
            "status": arrow_tables.string_array(status),
            "reason": arrow_tables.string_array(reason),
            "idx_in_zarr": arrow_tables.numeric_array(idx_in_zarr, np.int64),
        }
    )
    metadata = _metadata(columns, plans[0], todo, status, valid_fraction, target, cfg)
    return BatchResult(images=images, metadata_table=metadata, index_table=index)


def _metadata(
    columns: dict,
    reference: _BandPlan,
    todo: np.ndarray,
    status: np.ndarray,
    valid_fraction: np.ndarray,
    target: int,
    cfg: Mapping,
) -> pa.Table:
    """SPEC §7.1 metadata of the images (reference band = first band)."""
    windows = reference.windows.take(todo)
    scale = reference.pixel_scale[todo]
    size = windows.size
    arcsec = columns["diameter_arcsec"][todo]
    pixels = columns["diameter_pixel"][todo]
    # Report both diameters: the catalogue's value where given, else derived from the other.
    pixels = np.where(np.isfinite(pixels), pixels, np.rint(arcsec / scale))
    arcsec = np.where(np.isfinite(arcsec), arcsec, pixels * scale)
    headers = []
    # The header template of each file (made once by its handle): the text of each cutout is
    # the parent's with a few values changed (CRPIX, CD/PC, SIP), ~50x faster than serialising
    # a WCS per cutout.
    origin_x = windows.origin_x.tolist()
    origin_y = windows.origin_y.tolist()
    for k, row in enumerate(todo.tolist()):
        path = reference.file_of_row[row]
        handle = reference.handles.get(path)
        if handle is None or not np.isfinite(scale[k]):
            headers.append("")  # reference band unreadable cannot happen for ok/partial rows
            continue
        template = handle.cutout_header_template()
        headers.append(template.text(origin_x[k], origin_y[k], target / float(size[k])))
    tiles = columns["tile"][todo] if columns["tile"] is not None else [""] * len(todo)
    n_images = len(todo)
    float64, int64, text = np.float64, np.int64, arrow_tables.string_array
    number = arrow_tables.numeric_array
    return arrow_tables.table_of(
        {
            "source_id": text(columns["SourceID"][todo]),
            "ra": number(columns["RA"][todo], float64),
            "dec": number(columns["Dec"][todo], float64),
            "idx_in_zarr": number(np.arange(n_images), int64),
            "diameter_arcsec": number(arcsec, float64),
            "diameter_pixel": number(pixels, float64),
            "processing_timestamp": number(np.full(n_images, time.time()), float64),
            "tile": text(tiles),
            "extraction_origin_x": number(windows.origin_x, int64),
            "extraction_origin_y": number(windows.origin_y, int64),
            "extraction_size": number(size, int64),
            "pixel_scale_arcsec": number(scale * size / float(target), float64),
            "valid_fraction": number(valid_fraction, float64),
            "status": text(status[todo]),
            "wcs_header": text(headers),
            "bunit": text(_pixel_unit(reference, todo, cfg)),
        }
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


def _process_to_zarr(batch: pa.Table, cfg: Mapping, batch_dir: Path) -> BatchResult:
    """Process a batch while streaming its images into ``batch_dir`` (atomic Zarr + Parquet)."""
    from .writers import ZarrShardWriter, _write_parquet, atomic_directory

    n_channels = _weights_matrix(cfg).shape[1]
    target = int(cfg["target_resolution"])
    out_dtype = np.uint8 if cfg.get("data_type", "float32") == "uint8" else np.float32
    with atomic_directory(batch_dir) as tmp:
        writer = ZarrShardWriter(tmp, (target, target, n_channels), out_dtype, batch.num_rows)
        result = process_batch(batch, cfg, sink=writer.append)
        n_images = result.metadata_table.num_rows
        if writer.close() != n_images:
            raise CutanaError(
                f"internal error: {writer.count} images streamed for {n_images} metadata rows"
            )
        _write_parquet(result.metadata_table, tmp / "images_metadata.parquet")
    result.images = _ZarrImages(batch_dir / "images.zarr" / "images", n_images)
    return result


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc keep freed memory for the next chunk instead of handing it back.

    A chunk's arrays (stamp groups, resampled stacks, mixed and normalised images) are alive
    together and then freed together. By default glibc then returns the top of its heap to the
    kernel (and maps larger arrays anew each time), so the next chunk's pages are faulted in and
    zeroed by the kernel again: ~40 % of a 256 px x 3 channel job's system time. Serving arrays
    up to :data:`MMAP_THRESHOLD_BYTES` from the heap and trimming it only past
    :data:`TRIM_THRESHOLD_BYTES` reuses them. The peak RSS stays the same (the same arrays are
    alive at once); memory already freed is only held until the job ends. Measured on a
    1000-source 256 px x 3 channel batch in a fresh process: ``run_batch`` 3.9-4.1 s -> 2.9-3.4
    s, system time 1.4 -> 0.5-0.9 s, peak RSS 390 -> 392 MB.

    Returns
    -------
    bool
        True when the settings were applied (glibc), False elsewhere (nothing changes).
    """
    import ctypes

    try:
        # The process's own symbols, where the C library's are: ctypes.util.find_library
        # would run ``ldconfig -p`` in a subprocess, ~3 ms of every job.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # no mallopt (e.g. macOS): keep the platform's default
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied_mmap = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    applied_trim = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bool(applied_mmap and applied_trim)


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
    *,
    config_validated: bool = False,
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
    config_validated : bool
        True when ``cfg`` is already a complete config returned by
        :func:`cutana.config.validate_config`, as in the workflow, whose Snakefile validates it
        before any job exists: it is then not validated again, which saves a cutout job ~0.08 s
        (importing jsonschema and loading the schema).

    Returns
    -------
    BatchResult
        For Zarr output ``images`` is the written Zarr array (read lazily), as the images are
        streamed to disk chunk by chunk and never held in memory all at once.
    """
    import pyarrow.parquet as pq

    from .config import validate_config
    from .writers import write_fits_batch

    if not config_validated:
        cfg = validate_config(cfg, warn_unknown=False)
    keep_freed_memory_for_reuse()
    batch_path = Path(batch_path)
    batch_dir = Path(batch_dir)
    status_path = Path(status_path)
    batch = arrow_tables.read_table(batch_path)
    zarr_output = cfg.get("output_format", "zarr") != "fits"
    if zarr_output:
        result = _process_to_zarr(batch, cfg, batch_dir)
    else:
        result = process_batch(batch, cfg)

    index = result.index_table
    n_rows = index.num_rows
    batch_number = np.full(n_rows, _batch_index(status_path.stem), dtype=np.int64)
    index = index.append_column("batch_index", arrow_tables.numeric_array(batch_number, np.int64))
    has_image = np.array(index["idx_in_zarr"].to_pylist(), dtype=np.int64) >= 0
    if not zarr_output:
        names = write_fits_batch(batch_dir, result.images, result.metadata_table, cfg)
        files = np.full(n_rows, "", dtype=object)
        if names is not None:
            files[has_image] = [f"{batch_dir.name}/{Path(n).name}" for n in names]
        index = index.append_column("fits_file", arrow_tables.string_array(files))
    else:
        files = np.where(has_image, f"{batch_dir.name}/images.zarr", "")
        index = index.append_column("zarr_file", arrow_tables.string_array(files))

    status_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = status_path.with_name(f"{status_path.name}.tmp-{os.getpid()}")
    pq.write_table(index, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, status_path)
    return result
