"""The memory a cutout job declares, from the memory model (SPEC §3.2, §9).

The Snakefile imports this module to compute each cutout job's ``mem_mb`` resource; it holds
only what that needs (the standard library), so Snakemake's process does not import pyarrow and
the engine's modules with :mod:`cutana.memory_model`, which measures and fits the model (and
re-exports these names).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

#: Declared memory (MB) of a cutout job created before the model exists or whose batch it does
#: not know. The workflow profiles before it creates cutout jobs wherever memory limits them (a
#: cluster, ``--resources mem_mb``); a plain local run does not wait, and nothing checks the
#: declared value there.
FALLBACK_MEM_MB = 4000

#: Memory (MB) a batch keeps per source until it is written: its metadata row, WCS header text
#: and status row (a few KB; rounded up).
PER_SOURCE_MB = 0.01


def load_model(path: str | Path) -> dict:
    """Read a model JSON written by :func:`cutana.memory_model.build_memory_model`."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def mem_mb_for(
    workload: float, model: Mapping, attempt: int = 1, n_sources: int | None = None
) -> int:
    """Memory (MB) to declare for a batch of ``workload`` units.

    Parameters
    ----------
    workload : float
        Sum of :func:`cutana.memory_model.source_workloads` over the batch.
    model : mapping
        The fitted model (:func:`cutana.memory_model.fit_model` keys).
    attempt : int
        Snakemake's attempt number (1 on the first try); the estimate is multiplied by it so a
        job killed for lack of memory is retried with more.
    n_sources : int, optional
        Sources of the batch. When given (and the model has ``working_mb``), the workload term
        is capped at ``working_mb + per_source_mb x n_sources``: the engine streams, so its
        memory stops growing with the workload once its buffers are full.

    Returns
    -------
    int
        Megabytes, at least ``min_mb x attempt``.
    """
    variable = model["mb_per_unit"] * workload
    if n_sources is not None and "working_mb" in model:
        cap = model["working_mb"] + model.get("per_source_mb", PER_SOURCE_MB) * n_sources
        variable = min(variable, cap)
    estimate = model["safety_factor"] * (model["base_mb"] + variable)
    # A cluster counts every process of the job, including the Snakemake process that runs the
    # rule's script inside it, which the profiling child does not see.
    estimate += model.get("job_overhead_mb", 0)
    return int(math.ceil(max(estimate, model["min_mb"]) * max(int(attempt), 1)))


def mem_mb_for_batch(batch_name: str, model: Mapping, attempt: int = 1) -> int:
    """Memory (MB) to declare for the named batch, from its workload recorded in the model.

    Parameters
    ----------
    batch_name : str
        ``{index:05d}_{id}`` as in the manifest.
    model : mapping
        The model JSON (:func:`cutana.memory_model.build_memory_model` output).
    attempt : int
        Snakemake's attempt number.

    Returns
    -------
    int
        Megabytes; :data:`FALLBACK_MEM_MB` x attempt for a batch the model does not know.
    """
    entry = model.get("batches", {}).get(batch_name)
    if entry is None:
        return FALLBACK_MEM_MB * max(int(attempt), 1)
    return mem_mb_for(entry["workload"], model, attempt, n_sources=entry.get("n_sources"))
