"""Preview cutouts for the UI, made by the same engine as a full run.

:func:`preview_cutouts` runs :func:`cutana.engine.process_batch` in-process on the first rows
of a catalogue, so what the UI shows is exactly what ``cutana run`` would write for those
sources with the same configuration.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import validate_config

#: Statuses of sources that have an image (SPEC §7.3).
IMAGE_STATUSES = ("ok", "partial")


def preview_cutouts(
    catalogue: pd.DataFrame | str | os.PathLike,
    cfg: Mapping[str, Any],
    n: int | None = None,
    base_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Cut, resample, mix and normalise the first ``n`` usable sources of a catalogue.

    Rows are processed in catalogue order, a small block at a time, until ``n`` sources with
    status ``ok`` or ``partial`` have an image; rows that miss their image (``no_overlap``),
    whose files fail, or whose values are invalid are skipped.

    Parameters
    ----------
    catalogue : DataFrame or path
        A catalogue as accepted by the run (CSV or Parquet path, or an in-memory DataFrame).
    cfg : mapping or DotMap
        A (possibly partial) configuration; validated like the run's.
    n : int, optional
        Number of previews; default ``cfg["ui"]["preview_samples"]``.
    base_dir : path, optional
        Directory that relative ``fits_file_paths`` of a DataFrame are relative to (e.g. the
        folder of the CSV it was read from); default the current directory. Paths in a
        catalogue file are always relative to that file's folder.

    Returns
    -------
    images : ndarray
        Shape ``(m, T, T, C)`` with ``m <= n`` (fewer only if the catalogue has fewer usable
        sources), ``T = target_resolution``, of the configured ``data_type``.
    source_ids : list of str
        The SourceID of each image.

    Raises
    ------
    cutana.exceptions.ConfigValidationError
        If ``cfg`` is invalid.
    cutana.exceptions.CatalogueValidationError
        If the catalogue cannot be read (missing file, missing columns).
    """
    from .catalogue import iter_catalogue, tile_id
    from .engine import process_batch

    config = validate_config(cfg, warn_unknown=False)
    if base_dir is not None and isinstance(catalogue, pd.DataFrame):
        from .orchestrator import _parse_path_lists

        catalogue = catalogue.copy()
        catalogue["fits_file_paths"] = _parse_path_lists(
            catalogue["fits_file_paths"], Path(base_dir).resolve()
        )
    wanted = int(n if n is not None else config["ui"]["preview_samples"])
    n_channels = len(next(iter(config["channel_weights"].values())))
    size = int(config["target_resolution"])
    images: list[np.ndarray] = []
    source_ids: list[str] = []
    if wanted <= 0:
        return _stack(images, size, n_channels, config["data_type"]), source_ids

    # Small blocks: a preview must be quick even for a catalogue of millions of rows.
    block_rows = max(wanted, 8)
    collected = 0
    for chunk in iter_catalogue(catalogue, chunk_rows=max(4 * block_rows, 256)):
        usable = _usable_rows(chunk, n_bands=len(config["channel_weights"]))
        for start in range(0, len(usable), block_rows):
            block = usable.iloc[start : start + block_rows].copy()
            block["tile"] = [tile_id(list(paths)) for paths in block["fits_file_paths"]]
            result = process_batch(block.reset_index(drop=True), config)
            metadata = result.metadata.reset_index(drop=True)
            for position in range(len(metadata)):
                if str(metadata.loc[position, "status"]) not in IMAGE_STATUSES:
                    continue
                images.append(np.asarray(result.images[position]))
                source_ids.append(str(metadata.loc[position, "source_id"]))
                collected += 1
                if collected >= wanted:
                    return _stack(images, size, n_channels, config["data_type"]), source_ids
    return _stack(images, size, n_channels, config["data_type"]), source_ids


def _usable_rows(chunk: pd.DataFrame, n_bands: int) -> pd.DataFrame:
    """Rows with finite coordinates, a positive size and one path per band."""

    def size_ok(row) -> bool:
        for column in ("diameter_pixel", "diameter_arcsec"):
            value = row.get(column)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                return value > 0
        return False

    def paths_ok(paths) -> bool:
        return paths is not None and not isinstance(paths, str) and len(paths) == n_bands

    keep = (
        np.isfinite(chunk["RA"].to_numpy(dtype=float))
        & np.isfinite(chunk["Dec"].to_numpy(dtype=float))
        & chunk.apply(size_ok, axis=1).to_numpy(dtype=bool)
        & chunk["fits_file_paths"].map(paths_ok).to_numpy(dtype=bool)
    )
    return chunk.loc[keep]


def _stack(images: list[np.ndarray], size: int, n_channels: int, dtype: str) -> np.ndarray:
    if images:
        return np.stack(images)
    return np.zeros((0, size, size, n_channels), dtype=dtype)
