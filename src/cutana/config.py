"""The cutana configuration: defaults, validation and TOML persistence.

One JSON schema (``workflow/schemas/config.schema.yaml``) defines every key, its default and its
allowed range. The Snakemake workflow and the Python API both validate through
:func:`validate_config`, so ``config/config.yaml``, ``--config`` and ``get_default_config()`` share
one vocabulary.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigValidationError
from .paths import config_schema_path

# yaml, dotmap and the TOML modules are imported where used: a cutout job, which only reads
# the validated config it is given, then loads none of them (~20 ms of its start-up).
if TYPE_CHECKING:
    from dotmap import DotMap

logger = logging.getLogger(__name__)

#: Default transition parameter ``a`` of the stretches, used when the user leaves ``a`` unset.
DEFAULT_STRETCH_A = {"asinh": 0.7, "log": 1000.0}


def read_yaml(path: str | Path):
    """Parse a YAML file as plain data with a safe loader (libyaml's when PyYAML has it: the
    config schema parses in 4 instead of 21 ms, once per run and per job that validates)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=loader)  # noqa: S506 - a safe loader


@lru_cache(maxsize=1)
def load_schema() -> dict:
    """Return the config JSON schema (parsed once)."""
    return read_yaml(config_schema_path())


def _defaults_from_schema(schema: Mapping) -> Any:
    if schema.get("type") == "object" and "properties" in schema:
        base = copy.deepcopy(schema.get("default", {}))
        for key, sub in schema["properties"].items():
            value = _defaults_from_schema(sub)
            if key not in base and (value is not None or "default" in sub):
                base[key] = value
        return base
    return copy.deepcopy(schema.get("default"))


def default_config_dict() -> dict:
    """Every key with its default value, as a plain nested dict."""
    return _defaults_from_schema(load_schema())


def to_plain(config: Mapping | DotMap) -> dict:
    """Convert a DotMap (or nested mapping) to plain dicts and lists, dropping empty DotMaps that
    attribute access created by accident."""
    dotmap = sys.modules.get("dotmap")  # a DotMap exists only once dotmap is imported
    if dotmap is not None and isinstance(config, dotmap.DotMap):
        config = config.toDict()

    def clean(value):
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(config)


def _merge(base: dict, override: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if (
            isinstance(value, Mapping)
            and isinstance(out.get(key), dict)
            and key != "channel_weights"
        ):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _unknown_keys(config: Mapping, schema: Mapping, prefix: str = "") -> list[str]:
    unknown = []
    props = schema.get("properties")
    if props is None or "additionalProperties" in schema:
        return unknown
    for key, value in config.items():
        if key not in props:
            unknown.append(prefix + key)
        elif isinstance(value, Mapping):
            unknown.extend(_unknown_keys(value, props[key], prefix + key + "."))
    return unknown


def _without_unknown_keys(config: Mapping, schema: Mapping) -> dict:
    """``config`` without the keys :func:`_unknown_keys` names (at every level)."""
    props = schema.get("properties")
    if props is None or "additionalProperties" in schema:
        return dict(config)
    return {
        key: _without_unknown_keys(value, props[key]) if isinstance(value, Mapping) else value
        for key, value in config.items()
        if key in props
    }


def _describe_error(error) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    schema = error.schema
    allowed = []
    if "enum" in schema:
        allowed.append("one of " + ", ".join(repr(v) for v in schema["enum"]))
    if "minimum" in schema or "maximum" in schema:
        allowed.append(
            f"a value in [{schema.get('minimum', '-inf')}, {schema.get('maximum', 'inf')}]"
        )
    if "type" in schema and not allowed:
        allowed.append(f"of type {schema['type']}")
    hint = f"; allowed: {' and '.join(allowed)}" if allowed else ""
    return f"config key '{key}' = {error.instance!r} is invalid: {error.message}{hint}"


#: Optional ``format`` checkers jsonschema imports when installed (they come with Jupyter).
_JSONSCHEMA_FORMAT_MODULES = (
    "rfc3987_syntax", "rfc3987", "rfc3986_validator", "rfc3339_validator", "isoduration",
    "uri_template", "webcolors", "fqdn", "jsonpointer",
)  # fmt: skip


def import_jsonschema():
    """Import ``jsonschema`` without its optional ``format`` checkers.

    When ``rfc3987_syntax`` is installed (it comes with Jupyter), jsonschema imports it to check
    the ``iri`` formats, which builds a grammar parser: 1.5-3.5 s of start-up in every process
    that validates a config (the Snakemake run, each job); the other checkers cost ~0.1 s more.
    The schemas here use no ``format``, so these imports are blocked while jsonschema loads (and
    allowed again afterwards).

    Returns
    -------
    module
        ``jsonschema``.
    """
    if "jsonschema" not in sys.modules:
        blocked = [name for name in _JSONSCHEMA_FORMAT_MODULES if name not in sys.modules]
        for name in blocked:
            sys.modules[name] = None  # makes "import name" an ImportError
        try:
            import jsonschema
        finally:
            for name in blocked:
                del sys.modules[name]
    import jsonschema

    return jsonschema


def validate_config(config: Mapping | DotMap, warn_unknown: bool = True) -> dict:
    """Validate ``config`` against the schema, fill defaults and check cross-key rules.

    Parameters
    ----------
    config : mapping or DotMap
        A full or partial configuration; missing keys get their defaults.
    warn_unknown : bool
        Emit a warning for keys the schema does not know (they are kept, as upstream does).

    Returns
    -------
    dict
        The complete, validated configuration as plain dicts.

    Raises
    ------
    ConfigValidationError
        Naming every bad key, its value and the allowed values or range.
    """
    # Imported here: jsonschema costs ~1 s of import time, which every cutout job would pay.
    jsonschema = import_jsonschema()

    merged = _merge(default_config_dict(), to_plain(config))
    schema = load_schema()
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(merged), key=lambda e: list(e.path)
    )
    messages = [_describe_error(e) for e in errors]
    messages.extend(_cross_key_errors(merged))
    if messages:
        raise ConfigValidationError("Invalid cutana configuration:\n  - " + "\n  - ".join(messages))
    if warn_unknown:
        for key in _unknown_keys(merged, schema):
            warnings.warn(unknown_key_message(key), UserWarning, stacklevel=2)
    return merged


def unknown_config_keys(config: Mapping) -> list[str]:
    """The keys of ``config`` the schema does not know, dotted (``normalisation.percentil``)."""
    return _unknown_keys(to_plain(config), load_schema())


def unknown_key_message(key: str) -> str:
    """The warning given for a key the schema does not know."""
    return f"Unknown config key '{key}' is ignored (check its spelling against config/README.md)"


def _cross_key_errors(config: dict) -> list[str]:
    errors = []
    weights = config.get("channel_weights") or {}
    lengths = {len(v) for v in weights.values() if isinstance(v, list)}
    if len(lengths) > 1:
        errors.append(
            "config key 'channel_weights' has lists of different lengths "
            f"{ {k: len(v) for k, v in weights.items()} }: give every band one weight per "
            "output channel"
        )
    for band, values in weights.items():
        if isinstance(values, list) and not all(
            isinstance(v, int | float) and math.isfinite(v) for v in values
        ):
            errors.append(
                f"config key 'channel_weights.{band}' = {values!r} holds a non-finite weight: "
                "give finite numbers (0 leaves the band out of a channel)"
            )
    n_ext = len(config.get("fits_extensions") or [])
    if weights and n_ext not in (1, len(weights)):
        errors.append(
            f"config key 'fits_extensions' has {n_ext} entries but channel_weights has "
            f"{len(weights)} bands: give one extension for all bands or one per band"
        )
    norm = config.get("normalisation") or {}
    if norm.get("crop_enable"):
        for key in ("crop_width", "crop_height"):
            value = norm.get(key)
            if value is None or not 1 <= value <= config["target_resolution"]:
                errors.append(
                    f"config key 'normalisation.{key}' = {value!r} is invalid with crop_enable: "
                    f"give an integer in [1, target_resolution={config['target_resolution']}]"
                )
    if config.get("normalisation_method") == "none" and config.get("data_type") == "uint8":
        # Allowed: documented in SPEC §6 as linear min-max; nothing to report.
        pass
    return errors


def stretch_a(config: Mapping) -> float | None:
    """The effective transition parameter ``a``: the user's value or the method's default."""
    method = config["normalisation_method"]
    value = config["normalisation"].get("a")
    if value is None:
        return DEFAULT_STRETCH_A.get(method)
    return float(value)


def n_bands(config: Mapping) -> int:
    return len(config["channel_weights"])


def band_extensions(config: Mapping) -> list[str | int]:
    """The HDU (name or index) to read for each band, in band order."""
    exts = list(config["fits_extensions"])
    bands = list(config["channel_weights"])
    return exts * len(bands) if len(exts) == 1 else exts


def settings_hash(settings) -> str:
    """A stable 12-hex-digit hash of a mapping (or any value) of settings: equal settings, in
    any key order, give the same hash."""
    blob = json.dumps(to_plain(settings), sort_keys=True, default=str).encode()
    import hashlib  # here: loading OpenSSL costs every job ~10 ms, and jobs never hash

    return hashlib.sha256(blob).hexdigest()[:12]


def config_hash(config: Mapping) -> str:
    """A stable short hash of the settings that change the pixels (not paths or log levels).

    Keys the schema does not know are left out: they are ignored (with a warning), so adding
    or removing a misspelt key must not redo the outputs.
    """
    plain = _without_unknown_keys(to_plain(config), load_schema())
    weights = plain.get("channel_weights")
    if isinstance(weights, Mapping):
        # The bands' order is meaningful (band i reads path i of fits_file_paths), and
        # settings_hash sorts mapping keys: hashed as an ordered list of (band, weights).
        plain["channel_weights"] = [[band, value] for band, value in weights.items()]
    ignored = {
        "name",
        "log_level",
        "console_log_level",
        "output_dir",
        "max_workers",
        "ui",
        "loadbalancer",
        "tracking_file",
        "config_file",
        "available_extensions",
        "gallery",
        "max_workflow_time_seconds",
    }
    return settings_hash({k: v for k, v in plain.items() if k not in ignored})


#: Environment variable carrying the run's validated configuration (JSON) to the workflow's
#: jobs (cutana.workflow_jobs); the Snakefile sets it in its own process, which the jobs inherit.
CONFIG_VARIABLE = "CUTANA_RUN_CONFIG"

#: Longest JSON text put in :data:`CONFIG_VARIABLE` (Linux limits one variable to 128 KiB).
MAX_CONFIG_JSON = 100_000


def run_config_json(config: Mapping) -> str:
    """The configuration as the JSON text of :data:`CONFIG_VARIABLE`.

    Raises
    ------
    ConfigValidationError
        If it is longer than :data:`MAX_CONFIG_JSON` characters.
    """
    text = json.dumps(to_plain(config), default=str, separators=(",", ":"))
    if len(text) > MAX_CONFIG_JSON:
        raise ConfigValidationError(
            f"the configuration is {len(text)} characters of JSON, more than the "
            f"{MAX_CONFIG_JSON} a job's environment can carry: shorten it (e.g. fewer "
            "channel_weights entries)"
        )
    return text


def load_run_config(path: str | Path | None = None) -> dict:
    """The run's configuration: read from ``path`` (JSON or YAML), else from
    :data:`CONFIG_VARIABLE`.

    Raises
    ------
    ConfigValidationError
        If neither is given.
    """
    if path:
        return dict(read_yaml(path))  # YAML is a superset of JSON
    text = os.environ.get(CONFIG_VARIABLE)
    if not text:
        raise ConfigValidationError(
            f"the environment variable {CONFIG_VARIABLE} is not set: run the workflow with "
            "snakemake (its Snakefile sets it), or give --config FILE with a validated config"
        )
    return json.loads(text)


def get_default_config() -> DotMap:
    """Return the default configuration as a DotMap (upstream Cutana compatible).

    Every key of the upstream configuration table is present with its default, plus cutana's own
    keys (``fill_value``, ``gallery``, ``memory``, ``demo``).
    """
    from dotmap import DotMap

    return DotMap(default_config_dict(), _dynamic=False)


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


def save_config_toml(config: Mapping | DotMap, filepath: str | Path) -> str:
    """Write ``config`` to a TOML file and return its path.

    TOML has no null: keys whose value is ``None`` are omitted and come back as their default
    (which is ``None`` for every such key) on :func:`load_config_toml`.
    """
    path = Path(filepath)
    path.parent.mkdir(parents=True, exist_ok=True)
    import tomli_w

    plain = _drop_none(to_plain(config))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        tomli_w.dump(plain, handle)
    tmp.replace(path)
    return str(path)


def load_config_toml(filepath: str | Path) -> DotMap:
    """Read a TOML file written by :func:`save_config_toml` (or by hand), merged with defaults.

    The file is parsed as data only; nothing in it is executed.
    """
    import tomllib

    from dotmap import DotMap

    with open(filepath, "rb") as handle:
        data = tomllib.load(handle)
    return DotMap(_merge(default_config_dict(), data), _dynamic=False)


def load_config_file(filepath: str | Path) -> dict:
    """Read a YAML/JSON/TOML config file as plain data (safe loaders only)."""
    path = Path(filepath)
    if path.suffix.lower() == ".toml":
        return to_plain(load_config_toml(path))
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigValidationError(
            f"config file {path} must hold a mapping of keys, not {type(data).__name__}"
        )
    return data
