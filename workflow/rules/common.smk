# Helpers shared by the rules: configuration handling, output paths, input functions that
# resolve the checkpoints, and the memory resource of the cutout jobs.

import functools
import json
import os
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod

from cutana.config import (
    CONFIG_VARIABLE,
    config_hash,
    import_jsonschema,
    read_yaml,
    run_config_json,
    settings_hash,
    unknown_config_keys,
    unknown_key_message,
    validate_config,
)
from cutana.exceptions import ConfigValidationError
from cutana.preflight import OutputDirError, check_output_dir_for
from cutana import job_client, memory_budget, warm_jobs
from cutana.workflow_jobs import server_command
from cutana.progress_report import finished_run_line
from cutana.snakemake_exit import finish_promptly

# Before the Snakefile's validate(): jsonschema without its slow optional iri checker (~2 s).
import_jsonschema()

#: When this Snakemake process read the workflow: a run summary written since then is this run's.
WORKFLOW_READ_AT = time.time()

#: The name of a batch: 5-digit index, underscore, 10 hex chars of the content hash (DESIGN.md).
BATCH_PATTERN = r"\d{5}_[0-9a-f]{10}"


wildcard_constraints:
    batch=BATCH_PATTERN,


def load_config_schema():
    """The config JSON schema shared with cutana.config (parsed as data)."""
    return read_yaml(
        Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
    )


def _coerce_scalar(value, types):
    # `--config 'demo={"n_sources": 40}'` arrives with every nested value as a string (Snakemake
    # parses nested values with YAML's BaseLoader); convert back when the schema wants a number.
    if "integer" in types:
        try:
            return int(value)
        except ValueError:
            pass
    if "number" in types:
        try:
            return float(value)
        except ValueError:
            pass
    if "boolean" in types and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if "null" in types and value.lower() in ("null", "none", "~"):
        return None
    return value


def coerce_cli_strings(node, schema):
    """Convert string values to the number/boolean/null type the schema asks for, in place.

    Parameters
    ----------
    node : dict
        A (sub-)configuration.
    schema : dict
        The matching (sub-)schema.
    """
    properties = schema.get("properties", {})
    for key, value in list(node.items()):
        sub_schema = properties.get(key)
        if sub_schema is None and isinstance(schema.get("additionalProperties"), dict):
            sub_schema = schema["additionalProperties"]
        if sub_schema is None:
            continue
        types = sub_schema.get("type", [])
        types = [types] if isinstance(types, str) else types
        if isinstance(value, dict):
            coerce_cli_strings(value, sub_schema)
        elif isinstance(value, list) and isinstance(sub_schema.get("items"), dict):
            item_types = sub_schema["items"].get("type", [])
            item_types = [item_types] if isinstance(item_types, str) else item_types
            node[key] = [
                _coerce_scalar(v, item_types) if isinstance(v, str) else v
                for v in value
            ]
        elif isinstance(value, str) and "string" not in types:
            node[key] = _coerce_scalar(value, types)


def validated_config(raw_config):
    """The complete configuration after cutana's validation, or a WorkflowError naming the key.

    Parameters
    ----------
    raw_config : dict
        Snakemake's config (config file, --configfile and --config merged).

    Returns
    -------
    dict
        Every key of the schema, validated, as plain data.
    """
    try:
        full = validate_config(raw_config, warn_unknown=False)
    except ConfigValidationError as error:
        raise WorkflowError(str(error)) from None
    # Reported through Snakemake's logger: Python warnings raised while the Snakefile is
    # parsed are not shown.
    for key in unknown_config_keys(full):
        logger.warning(f"cutana: {unknown_key_message(key)}")
    if not full.get("source_catalogue"):
        raise WorkflowError(
            "config key 'source_catalogue' is not set: give the path of a CSV or Parquet "
            "catalogue (e.g. --config source_catalogue=sources.csv), or use the demo survey "
            "of config/config.yaml"
        )
    # Fail before any job when output_dir cannot be written or its disk is full (SPEC §5).
    try:
        check_output_dir_for(full)
    except OutputDirError as error:
        raise WorkflowError(str(error)) from None
    return full


def export_run_config(cfg):
    """Put the validated config in the environment every job's command inherits (the jobs'
    processes read it, cutana.workflow_jobs); a SLURM job's snakemake sets it again. With it
    this process's PID, which names the run's warm job server (cutana.warm_jobs)."""
    try:
        os.environ[CONFIG_VARIABLE] = run_config_json(cfg)
    except ConfigValidationError as error:
        raise WorkflowError(str(error)) from None
    os.environ[warm_jobs.RUN_VARIABLE] = str(os.getpid())


def jobs_use_conda():
    """Whether the jobs run in conda environments (``--sdm conda``)."""
    return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


def start_warm_server():
    """Start the run's warm job server (cutana.warm_jobs) when jobs run on this machine.

    Called by the ``onstart`` hook (not in dry runs): the server imports the jobs' modules on
    the core the catalogue split leaves idle, and the jobs after the split skip those imports.
    Not for cluster runs (each job has its own allocation) nor conda environments (their jobs
    run another interpreter, which this server's address would not match).
    """
    if workflow.local_exec and not jobs_use_conda() and warm_jobs.enabled():
        warm_jobs.spawn_server(server_command())


def job_command(warm=False):
    """The start of a rule's shell command: ``<python> -m cutana.workflow_jobs``.

    The interpreter is the one Snakemake gives a ``script:``: the conda environment's
    ``python`` with ``--sdm conda``, else the interpreter running Snakemake (cutana imports
    there: this file does). With ``warm``, for the steps a warm server runs, the command is
    ``<python> -I -S <cutana>/job_client.py``, which hands the job to the server without
    Python's site initialisation or cutana's imports (isolated: the script's folder, cutana's,
    is not put on the module path) and otherwise execs the first form (not with conda: the
    environment's cutana lives elsewhere).
    """
    if jobs_use_conda():
        return "python -m cutana.workflow_jobs"
    python = shlex.quote(sys.executable)
    if warm:
        return f"{python} -I -S {shlex.quote(job_client.__file__)}"
    return f"{python} -m cutana.workflow_jobs"


def workflow_paths(cfg):
    """Every path the rules produce, derived from ``output_dir`` (SPEC §7, DESIGN.md)."""
    out = os.path.normpath(cfg["output_dir"])
    work = f"{out}/.cutana"
    return SimpleNamespace(
        out=out,
        work=work,
        batches=f"{work}/batches",
        manifest=f"{work}/batches/manifest.json",
        batch_table=f"{work}/batches/{{batch}}.parquet",
        memory_model=f"{work}/memory_model.json",
        profile_scratch=f"{work}/profile_scratch",
        batch_dir=f"{out}/batch_cutout_process_{{batch}}",
        status=f"{work}/status/{{batch}}.parquet",
        logs=f"{work}/logs",
        benchmarks=f"{work}/benchmarks",
        cutout_benchmark=f"{work}/benchmarks/cutout_batch/{{batch}}.tsv",
        index=f"{out}/source_to_zarr_mapping.parquet",
        summary=f"{out}/run_summary.json",
        config_toml=f"{out}/cutana_config.toml",
        gallery_png=f"{out}/gallery.png",
        gallery_html=f"{out}/gallery.html",
    )


def demo_catalogue_path(cfg):
    """Output path of make_demo_survey, i.e. ``source_catalogue`` itself when it names
    ``{demo.dir}/catalogue.csv`` (so Snakemake matches the exact string), else that path.
    """
    demo_path = os.path.join(cfg["demo"]["dir"], "catalogue.csv")
    if os.path.normpath(cfg["source_catalogue"]) == os.path.normpath(demo_path):
        return cfg["source_catalogue"]
    return demo_path


def settings_option(digest):
    """``--settings DIGEST`` for a rule's command, ``DIGEST`` being the hash of the settings
    its outputs depend on (cutana.config: ``config_hash``, ``settings_hash``).

    Snakemake reruns a job whose rule's command changed since it last ran (its ``code`` rerun
    trigger), so changing those settings reruns the rule's jobs; the job itself ignores the
    option. Not a ``params``: to record any job's params Snakemake first imports pandas when it
    is installed (cutana needs it), ~0.3 s of every run spent by its one process before the
    cutout jobs can start (docs/benchmarks.md, session 10).
    """
    return f"--settings {digest}"


def shell_arg(value):
    """``value`` quoted for a rule's shell command, its braces kept literal (Snakemake fills in
    ``{...}`` in a command as its own placeholders)."""
    return shlex.quote(str(value)).replace("{", "{{").replace("}", "}}")


def memory_limits_jobs():
    """Whether the cutout jobs' declared ``mem_mb`` decides how many of them run at once.

    It does on a cluster (each job asks for its memory) and locally under a memory budget
    (``--resources mem_mb=...``, ``mem=...``; the Python API gives one unless it is given a
    profile). A plain local run (``snakemake --cores N``) has no memory budget: only cores
    limit it.
    """
    budgets = {name for name, _ in workflow.global_resources.items()}
    return not workflow.local_exec or bool(budgets & {"mem_mb", "mem_mib", "mem"})


def manifest_batch_names():
    """Names of all batches.

    Resolves the split checkpoint (raising IncompleteCheckpointException until it is done) for
    the names. Where memory limits the jobs (:func:`memory_limits_jobs`) it resolves the memory
    profile too, so the model exists before any cutout job is created and their ``mem_mb``
    comes from it. Otherwise the cutout jobs start beside the profiling job instead of after it
    (it is still run, for the run summary): a job created before the model exists declares
    ``memory_budget.FALLBACK_MEM_MB``, which no budget checks.
    """
    batches_dir = checkpoints.split_catalogue.get().output.batches
    if memory_limits_jobs():
        checkpoints.profile_memory.get()
    with open(os.path.join(batches_dir, "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    return [entry["name"] for entry in manifest["batches"]]


def all_status_files(wildcards):
    """Input function of merge_index and all: one status table per batch."""
    return expand(PATHS.status, batch=manifest_batch_names())


def all_batch_dirs(wildcards):
    """Input function of merge_index and all: every batch folder (as a target of all, a deleted
    folder is remade; Snakemake does not remake missing intermediate files on its own).
    """
    return expand(PATHS.batch_dir, batch=manifest_batch_names())


@functools.lru_cache(maxsize=4)
def _load_memory_model(path, mtime_ns):
    # Keyed by mtime so a re-profiled model is re-read; cached because the resource callable
    # runs once per cutout job (thousands of jobs, one model file).
    return memory_budget.load_model(path)


def cutout_mem_mb(wildcards, attempt):
    """Declared memory of one cutout job (MB): the memory model's estimate for this batch,
    times the attempt number so a retry after running out of memory asks for more."""
    path = PATHS.memory_model
    try:
        model = _load_memory_model(path, os.stat(path).st_mtime_ns)
    except FileNotFoundError:
        # Only reachable when a batch is requested directly before profiling ran.
        return memory_budget.FALLBACK_MEM_MB * attempt
    return memory_budget.mem_mb_for_batch(wildcards.batch, model, attempt)


def report_finished_run():
    """Say how many catalogue rows ended in each status, as the last lines of a run that wrote
    its summary (a warning when some failed: the run itself still succeeds, SPEC §5)."""
    try:
        if os.stat(PATHS.summary).st_mtime < WORKFLOW_READ_AT:
            return
        with open(PATHS.summary, encoding="utf-8") as handle:
            summary = json.load(handle)
    except (OSError, ValueError):
        return
    line, some_failed = finished_run_line(summary, PATHS.index)
    (logger.warning if some_failed else logger.info)(line)
