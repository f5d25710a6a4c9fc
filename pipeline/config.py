"""Load and validate the workflow config against ``schemas/config.schema.yaml``.

The same validation that ``rules/common.smk`` runs through ``snakemake.utils.validate`` is
available here for the stage modules and tests: schema defaults are filled in, and any unknown key,
wrong type or out-of-range value raises ``ConfigError`` naming the offending key path.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value failed validation; the message names the key path."""


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    """The config schema (a fresh copy: the caller may edit it)."""
    return copy.deepcopy(_parsed_schema(str(path)))


@functools.lru_cache(maxsize=4)
def _parsed_schema(path: str) -> dict:
    """The schema parsed once per process (read-only; ``load_schema`` hands out copies): a dry-run
    asks for it once per job (``settings_keys``), and parsing it takes most of a second."""
    with open(path) as fh:
        return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _default_filling_validator(schema: dict):
    """Draft 2020-12 validator that inserts schema defaults while validating (like snakemake)."""
    # imported here: what imports this module without validating (deep_update, load_settings,
    # ConfigError; e.g. the GPU suite's propagation section on an image without jsonschema) runs
    from jsonschema import Draft202012Validator, validators  # noqa: PLC0415

    base = Draft202012Validator

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    cls = validators.extend(base, {"properties": set_defaults})
    return cls(schema)


def _key_path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # the offending key is in the message, not the path
        m = re.findall(r"'([^']+)' was unexpected", error.message)
        if m:
            parts.append(m[0])
    return ".".join(parts) or "<root>"


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate ``config`` in place (defaults filled) and return it; raise ConfigError on failure.

    Defaults are filled in a first pass, then the filled config is validated again so that
    defaults nested under defaults are also checked.
    """
    schema = schema or _parsed_schema(str(SCHEMA_PATH))  # read, never edited
    validator = _default_filling_validator(schema)
    for _ in range(2):
        errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
        if errors:
            lines = [f"  {_key_path(e)}: {e.message}" for e in errors[:10]]
            raise ConfigError("invalid config:\n" + "\n".join(lines))
        _default_cell_generator(config, schema)
    return config


def _default_cell_generator(config: dict, schema: dict) -> None:
    """``pretrain.cell_defaults.generator`` defaults to ``views.generator``: one key chooses the
    generator unless a user names another for the cells."""
    cell_defaults = config.get("pretrain", {}).get("cell_defaults")
    if cell_defaults is not None and "generator" not in cell_defaults:
        views = schema["properties"]["views"]["properties"]
        cell_defaults["generator"] = config.get("views", {}).get("generator", views["generator"]["default"])


def load_config(*paths: str | Path, overrides: dict | None = None) -> dict:
    """Read one or more YAML files (later ones override earlier ones, key by key) and validate."""
    config: dict[str, Any] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        with open(p) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        deep_update(config, data)
    if overrides:
        deep_update(config, overrides)
    return validate_config(config)


def section_defaults(*keys: str, overrides: dict | None = None) -> dict:
    """Resolved settings of one config section (e.g. ``section_defaults("propagation")``).

    Builds a config holding only ``overrides`` under ``keys``, validates it (filling every schema
    default) and returns that section. Stage modules use it so that ``--settings`` may be partial.
    """
    cfg: dict[str, Any] = {}
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = copy.deepcopy(overrides or {})
    validate_config(cfg)
    for k in keys:
        cfg = cfg[k]
    return cfg


def result_neutral_keys(*section: str, schema: dict | None = None) -> list[str]:
    """Keys of a config section marked ``x-result-neutral: true`` in the schema: how a job runs
    (GPUs, loader workers, checkpoint cadence, batch of a deterministic generator), never what it
    computes. The rules leave them out of ``params`` and the resume fingerprints ignore them, so
    editing one re-runs nothing and a resume across them is exact."""
    node = schema or _parsed_schema(str(SCHEMA_PATH))
    for key in section:
        node = node["properties"][key]
    return [k for k, sub in node.get("properties", {}).items() if isinstance(sub, dict) and sub.get("x-result-neutral")]


def _section_schema(section: tuple[str, ...], schema: dict | None) -> dict:
    node = schema or _parsed_schema(str(SCHEMA_PATH))
    for key in section:
        node = node["properties"][key]
    return node.get("properties", {})


def settings_keys(*section: str, command: str | None = None, schema: dict | None = None) -> list[str]:
    """The keys of a config section that are settings of ``command``'s jobs, i.e. what they compute.

    Left out, by the schema's marks: ``x-result-neutral`` (how a job runs), ``x-selects`` (what
    runs: seeds, cells, lists), ``x-slice`` (a nested section passed as a slice of its own) and
    ``x-only-for`` keys of other commands. The rules' ``settings`` params and the resume
    fingerprints both derive from this, so no key list is written by hand."""
    keys = []
    for key, sub in _section_schema(section, schema).items():
        if not isinstance(sub, dict) or any(sub.get(m) for m in ("x-result-neutral", "x-selects", "x-slice")):
            continue
        if "x-only-for" in sub and command not in sub["x-only-for"]:
            continue
        keys.append(key)
    return keys


def job_settings(values: dict, *section: str, command: str | None = None) -> dict:
    """``values`` (a config section) narrowed to ``settings_keys(*section, command=command)``."""
    wanted = set(settings_keys(*section, command=command))
    return {k: v for k, v in values.items() if k in wanted}


def runtime_resource(section: str, key: str) -> str:
    """The Snakemake resource a result-neutral key travels as: ``gpu`` for ``gpus`` (the one GPU
    resource every rule and profile limits), else ``<section>_<key>`` (resources are global names)."""
    return "gpu" if key == "gpus" else f"{section}_{key}"


def runtime_flags(section: str) -> list[tuple[str, str]]:
    """(``--flag``, key) of every result-neutral key of a section but ``gpus`` (the lease's): the
    command-line form a command accepts and the rule passes from its resources."""
    return [("--" + k.replace("_", "-"), k) for k in result_neutral_keys(section) if k != "gpus"]


def add_runtime_flags(parser, section: str) -> None:
    """Add ``runtime_flags(section)`` to an argparse parser, each overriding its config key."""
    for flag, key in runtime_flags(section):
        parser.add_argument(flag, dest=key, type=int, default=None, help=f"override {section}.{key} (result-neutral)")


def apply_runtime_flags(args, section: str, settings: dict) -> dict:
    """``settings`` with the runtime flags given on the command line put in."""
    given = {key: getattr(args, key) for _, key in runtime_flags(section) if getattr(args, key, None) is not None}
    return {**settings, **given}


def load_settings(value: str | None) -> dict:
    """Parse a ``--settings`` argument: a JSON string, or a path to a JSON/YAML file, or None."""
    if value is None or value == "":
        return {}
    text = value
    if not value.lstrip().startswith("{"):
        p = Path(value)
        if not p.exists():
            raise FileNotFoundError(f"--settings: {value} is neither JSON nor an existing file")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text) or {}
    return json.loads(text)


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.config", description="Validate config files and print the resolved config."
    )
    ap.add_argument("configs", nargs="+", help="YAML files, later ones override earlier ones")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(*args.configs)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    print(yaml.safe_dump(cfg, sort_keys=False))


if __name__ == "__main__":
    main()
