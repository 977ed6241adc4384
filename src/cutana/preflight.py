"""Checks of the output directory before any work starts (SPEC §5).

A run that cannot write its results should stop at once with a message naming ``output_dir``,
not after the catalogue was split and the first batches were cut. :func:`check_output_dir` is
called where every entry point starts: when the workflow parses its configuration (Snakemake
CLI, ``cutana run``, the API and the UI all run the workflow) and in
:meth:`cutana.orchestrator.Orchestrator.start_processing` before it writes its run config.

The check writes nothing that stays: a probe file is created (and removed) in ``output_dir`` or,
when that does not exist yet, in its nearest existing parent.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .exceptions import CutanaError

#: Free space (MB) below which a run is refused even when one batch would fit.
MIN_FREE_MB = 64


class OutputDirError(CutanaError):
    """The output directory cannot be created or written, or its disk is (nearly) full."""


def batch_output_mb(cfg: Mapping) -> float:
    """Size in MB of the images of one full batch (uncompressed), an upper bound of its files.

    Parameters
    ----------
    cfg : mapping
        The validated configuration (``N_batch_cutout_process``, ``target_resolution``,
        ``channel_weights``, ``data_type``).

    Returns
    -------
    float
        ``N_batch_cutout_process × target_resolution² × channels × bytes per pixel`` in MB.
    """
    weights = cfg.get("channel_weights") or {"band": [1.0]}
    n_channels = max(len(list(v)) for v in weights.values())
    itemsize = np.dtype(cfg.get("data_type", "float32")).itemsize
    side = int(cfg.get("target_resolution", 256))
    n_batch = int(cfg.get("N_batch_cutout_process", 1000))
    return n_batch * side * side * n_channels * itemsize / 2**20


def _nearest_existing(path: Path) -> Path:
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    return existing


def check_output_dir(output_dir: str | os.PathLike, min_free_mb: float | None = None) -> Path:
    """Fail fast, naming ``output_dir``, when results could not be written there.

    Parameters
    ----------
    output_dir : path
        The configuration's ``output_dir`` (relative paths are relative to the current
        directory). It need not exist yet: then its nearest existing parent must be a writable
        directory.
    min_free_mb : float, optional
        Free space required on its file system; default :data:`MIN_FREE_MB`.

    Returns
    -------
    Path
        ``output_dir`` as an absolute path.

    Raises
    ------
    OutputDirError
        If ``output_dir`` (or a parent on the way to it) is a file, if a file cannot be
        created in it (permissions, read-only file system, disk full), or if its file system
        has less than ``min_free_mb`` MB free. The message names the directory, the cause and
        the fix.
    """
    path = Path(output_dir).absolute()
    required = MIN_FREE_MB if min_free_mb is None else float(min_free_mb)
    existing = _nearest_existing(path)
    where = "" if existing == path else f" (it does not exist yet; its parent {existing} does)"
    if not existing.is_dir():
        raise OutputDirError(
            f"output_dir {path} cannot be created: {existing} is a file, not a directory. "
            "Fix: set config key output_dir to a directory path."
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".cutana-write-test-", dir=existing)
        try:
            os.write(handle, b"cutana")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputDirError(
                f"output_dir {path}{where}: the disk is full ({error.strerror}). Fix: free "
                "space on that file system or set config key output_dir to another disk."
            ) from None
        raise OutputDirError(
            f"output_dir {path} is not writable{where}: cannot create a file in {existing} "
            f"({error.strerror}). Fix: set config key output_dir to a directory you can write "
            "to, or change its permissions."
        ) from None
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < required:
        raise OutputDirError(
            f"output_dir {path}{where}: only {free_mb:.0f} MB free on its file system, cutana "
            f"needs at least {required:.0f} MB to write a batch. Fix: free space there or set "
            "config key output_dir to another disk."
        )
    return path


def check_output_dir_for(cfg: Mapping) -> Path:
    """:func:`check_output_dir` of ``cfg["output_dir"]`` with room for one uncompressed batch
    and at least :data:`MIN_FREE_MB`, after checking that the paths Snakemake uses as rule
    inputs/outputs hold no ``{`` or ``}`` (it would read them as wildcards)."""
    paths = {
        "output_dir": cfg.get("output_dir"),
        "source_catalogue": cfg.get("source_catalogue"),
        "demo.dir": (cfg.get("demo") or {}).get("dir"),
    }
    for key, value in paths.items():
        if isinstance(value, str) and ("{" in value or "}" in value):
            raise OutputDirError(
                f"config key {key} = {value!r} contains '{{' or '}}', which Snakemake reads as "
                "wildcards in file names. Fix: choose a path without braces."
            )
    return check_output_dir(cfg["output_dir"], max(MIN_FREE_MB, batch_output_mb(cfg)))
