"""Which code a result depends on: the rerun logic's one source of truth.

Every module of the package is either **result-carrying** (its content can change a number) or
**infrastructure** (config loading, logging, CLI dispatch, device leasing, atomic IO, ...: how a job
runs, never what it computes). The top-level modules are classified in ``CORE_MODULES``, and a test
keeps that table complete, so a new module must be classified before anything runs; a stage
subpackage's modules (``pipeline/<stage>/``) carry results unless ``STAGE_INFRASTRUCTURE`` names them.

The code of a command (``code_files``) is every result-carrying module its entry module imports,
transitively, wherever it lives (a core module too), with the package data (``*.yaml``) of the
stage subpackages among them. A rule records ``code_digest`` of that set as a ``params:`` entry, and
the resumable jobs (pretraining, S-LDM training, propagation's predictions, view parts) key their
states on the same digests: editing a result-carrying module re-runs exactly the jobs whose code
imports it, editing an infrastructure module re-runs nothing.

Code is digested by its **syntax tree**, docstrings removed (``ast_digest``), and package data by
its parsed content: a comment-, docstring- or format-only edit changes no digest and re-runs
nothing, while any edit that changes what Python executes re-runs its users.

Pure ``ast`` and ``yaml``. A file's syntax-tree digest and import list are kept in a cache keyed on
the file's bytes, this module's own source and the Python version (``syntax_cache_dir``): the
workflow's parse and every job's provenance record read them instead of parsing ~70 files again.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from pipeline.io import write_text_atomic

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name

RESULT = "result-carrying"
INFRASTRUCTURE = "infrastructure"

# every top-level module of the package: (class, why)
CORE_MODULES = {
    PACKAGE: (INFRASTRUCTURE, "package marker and version string"),
    f"{PACKAGE}.constants": (RESULT, "ImageNet normalisation of every encoder input"),
    f"{PACKAGE}.crop_sampler": (RESULT, "the random-resized-crop rule of pretraining and the crop views"),
    f"{PACKAGE}.imaging": (RESULT, "image decoding, resizing and the bad-image policy"),
    f"{PACKAGE}.labels": (RESULT, "the names of views, generators and datasets written into tables"),
    f"{PACKAGE}.palette": (RESULT, "DAVIS's colour map in annotation and prediction PNGs"),
    f"{PACKAGE}.seeding": (RESULT, "every derived seed and the global RNG seeding"),
    f"{PACKAGE}.table_registry": (RESULT, "the tables' rows, cells and captions"),
    f"{PACKAGE}.training": (RESULT, "the lr schedule, loss rule and resumable state of both trainers"),
    f"{PACKAGE}.vit_checkpoints": (RESULT, "which checkpoint keys become which encoder weights"),
    f"{PACKAGE}.__main__": (INFRASTRUCTURE, "python -m pipeline: the list of stages and commands"),
    f"{PACKAGE}.cells": (INFRASTRUCTURE, "cell keys and paths: a change is a new path or param Snakemake sees"),
    f"{PACKAGE}.cli": (INFRASTRUCTURE, "command dispatch and argument parsing"),
    f"{PACKAGE}.config": (INFRASTRUCTURE, "config loading and validation: values reach jobs as params"),
    f"{PACKAGE}.devices": (INFRASTRUCTURE, "device choice, thread count, the DDP process group"),
    f"{PACKAGE}.io": (INFRASTRUCTURE, "atomic writes and content digests"),
    f"{PACKAGE}.lease": (INFRASTRUCTURE, "GPU slot leasing"),
    f"{PACKAGE}.job_server": (INFRASTRUCTURE, "starts a job as a fork of a warm interpreter: runs the same module"),
    f"{PACKAGE}.provenance": (INFRASTRUCTURE, "this table and the digests"),
    f"{PACKAGE}.records": (INFRASTRUCTURE, "the provenance records written beside results"),
    f"{PACKAGE}.registry": (INFRASTRUCTURE, "the name -> entry registry helper"),
    f"{PACKAGE}.resume": (INFRASTRUCTURE, "resumable states, keyed on these digests"),
    f"{PACKAGE}.runtime": (INFRASTRUCTURE, "logging and progress bars"),
    f"{PACKAGE}.scrub": (INFRASTRUCTURE, "verifies recorded digests and removes corrupt results: computes none"),
}
# stage modules that only decide how a job runs (each stage's ``__main__`` is CLI dispatch too)
STAGE_INFRASTRUCTURE = {
    f"{PACKAGE}.views.timelimit": "when a view job stops between parts",
    f"{PACKAGE}.report.provenance_diff": "compares provenance records, computes no result",
}


class UnclassifiedModuleError(LookupError):
    """A top-level module missing from ``CORE_MODULES``."""


def module_file(module: str) -> Path | None:
    """``pipeline.views.generate`` -> its file (module or package ``__init__``), None if not ours."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_stage_module(module: str) -> bool:
    """A module inside a stage subpackage (``pipeline.<stage>.<...>``), not a core module."""
    parts = module.split(".")
    return len(parts) >= 2 and parts[0] == PACKAGE and (PACKAGE_DIR / parts[1]).is_dir()


def classify(module: str) -> str:
    """``RESULT`` or ``INFRASTRUCTURE`` (a core module missing from the table is an error)."""
    if _is_stage_module(module):
        if module in STAGE_INFRASTRUCTURE or module.endswith(".__main__"):
            return INFRASTRUCTURE
        return RESULT
    if module not in CORE_MODULES:
        raise UnclassifiedModuleError(
            f"{module} is not classified: add it to pipeline.provenance.CORE_MODULES as {RESULT!r} "
            f"(its content can change a number) or {INFRASTRUCTURE!r}"
        )
    return CORE_MODULES[module][0]


def core_modules_on_disk() -> list[str]:
    """Every top-level module of the package, as found on disk."""
    return [PACKAGE] + sorted(f"{PACKAGE}.{p.stem}" for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def _import_names(module: str, path: Path, source: bytes) -> list[str]:
    """Every name an import statement of ``module`` (file ``path``, content ``source``) names,
    relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package_of(module, path).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
    return list(dict.fromkeys(found))


@functools.cache
def imported_modules(module: str) -> tuple[str, ...]:
    """Our modules that ``module`` imports (any import statement, at any depth)."""
    path = module_file(module)
    if path is None:
        return ()
    # the names depend on the file's bytes and its place in the package; which exist, on the disk
    names = _cached_syntax(f"imports {module} {path.name}", path, lambda source: _import_names(module, path, source))
    return tuple(m for m in names if module_file(m) is not None)


def code_files(*modules: str, exclude: Iterable[str] = ()) -> list[Path]:
    """The result-carrying source files ``modules`` run (see the module docstring). The import
    graph is followed through every module, infrastructure too; ``exclude`` names modules whose
    imports are not followed (and which are not listed)."""
    missing = [m for m in modules if module_file(m) is None]
    if missing:
        raise ModuleNotFoundError(f"no source file for {missing} under {PACKAGE_DIR}")
    skip = set(exclude)
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen or m in skip:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # enclosing packages
        todo += imported_modules(m)
    carrying = {m for m in seen if classify(m) == RESULT}
    files = {module_file(m) for m in carrying}
    for stage in {m.split(".")[1] for m in carrying if _is_stage_module(m)}:
        files.update((PACKAGE_DIR / stage).rglob("*.yaml"))
    return sorted(f for f in files if f is not None)


@functools.cache
def registrations(stage: str, decorator: str = "register") -> dict[str, str]:
    """``name -> module`` for every ``@<decorator>("name")`` in ``pipeline/<stage>/`` (e.g. the
    view generators), read from the syntax tree."""
    found = {}
    for path in sorted((PACKAGE_DIR / stage).glob("*.py")):
        module = f"{PACKAGE}.{stage}.{path.stem}"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            for dec in node.decorator_list:
                if (
                    isinstance(dec, ast.Call)
                    and getattr(dec.func, "id", getattr(dec.func, "attr", None)) == decorator
                    and dec.args
                    and isinstance(dec.args[0], ast.Constant)
                ):
                    found[dec.args[0].value] = module
    return found


def plugin_code_files(entry: str, stage: str, name: str) -> list[Path]:
    """The code of ``entry`` running the one registered plugin ``name`` of ``stage`` (a view
    generator): the entry's closure without any plugin module, plus that plugin's own closure. So
    editing the ``crop`` generator re-runs the crop views, not the warp views."""
    plugins = registrations(stage)
    if name not in plugins:
        raise KeyError(f"no @register({name!r}) in {PACKAGE}/{stage}/; known: {sorted(plugins)}")
    return sorted(set(code_files(entry, exclude=plugins.values())) | set(code_files(plugins[name])))


# ---------------------------------------------------------------------------------------------
# digests


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def _canonical_digest(path: Path, source: bytes) -> str:
    text = source.decode()
    if path.suffix == ".py":
        canon = ast.dump(_strip_docstrings(ast.parse(text, filename=str(path))), include_attributes=False)
    else:  # package data: its parsed content (comments and layout are not content)
        canon = json.dumps(yaml.safe_load(text), sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


@functools.cache
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:
    return _cached_syntax("digest", path, lambda source: _canonical_digest(path, source))


# ---------------------------------------------------------------------------------------------
# the syntax cache: what a file's bytes give, computed once per content


SYNTAX_CACHE_ENV = "CDGMAE_SYNTAX_CACHE"


def syntax_cache_dir() -> Path:
    """Where parsed-file results are kept: ``$CDGMAE_SYNTAX_CACHE``, else the user's cache folder
    (``$XDG_CACHE_HOME/cdgmae/syntax``, ``~/.cache/cdgmae/syntax``). Shared by every checkout:
    entries are keyed on content, never on paths."""
    if os.environ.get(SYNTAX_CACHE_ENV):
        return Path(os.environ[SYNTAX_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdgmae" / "syntax"


@functools.cache
def _cache_salt() -> bytes:
    """What besides a file's bytes decides a result: this module's code and the Python (its ``ast``)."""
    return hashlib.sha256(Path(__file__).read_bytes() + sys.version.encode()).digest()


def _cached_syntax(kind: str, path: Path, compute: Callable[[bytes], object]):
    """``compute(source)`` of ``path``'s current bytes, from the cache when an intact entry exists;
    the value is computed from the very bytes it is keyed on (one read: an edit in between cannot
    file one content's result under another's key).

    An entry holds its value and a digest of (key, value): a damaged or foreign entry is recomputed
    and rewritten; a cache that cannot be written is only slower."""
    source = path.read_bytes()
    key = hashlib.sha256(_cache_salt() + kind.encode() + b"\0" + source).hexdigest()
    entry = syntax_cache_dir() / key[:2] / f"{key}.json"

    def seal(value) -> str:
        return hashlib.sha256((key + json.dumps(value, sort_keys=True)).encode()).hexdigest()

    try:
        stored = json.loads(entry.read_text())
        if stored["check"] == seal(stored["value"]):
            return stored["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute(source)
    try:
        write_text_atomic(entry, json.dumps({"value": value, "check": seal(value)}))
    except OSError:
        pass
    return value


def ast_digest(path: str | Path) -> str:
    """SHA-256 of a source file's meaning: its syntax tree without docstrings (``*.py``) or its
    parsed content (``*.yaml``). Comments, docstrings and formatting do not change it."""
    path = Path(path)
    st = path.stat()
    return _file_digest(path, st.st_mtime_ns, st.st_size)


def file_digests(files: Iterable[Path]) -> dict[str, str]:
    """``ast_digest`` of each file, keyed by its path inside the package."""
    return {f.relative_to(PACKAGE_DIR).as_posix(): ast_digest(f) for f in files}


def code_digests(*modules: str) -> dict[str, str]:
    """``ast_digest`` of each of ``code_files(*modules)``: what a resumable state records so that
    only the same code continues it."""
    return file_digests(code_files(*modules))


def combined_digest(digests: dict[str, str]) -> str:
    """One digest of a ``{path: digest}`` set (what a rule records as its ``code`` param)."""
    return hashlib.sha256("".join(f"{p} {d}\n" for p, d in sorted(digests.items())).encode()).hexdigest()


def code_digest(*modules: str) -> str:
    """One digest of ``code_digests(*modules)``."""
    return combined_digest(code_digests(*modules))
