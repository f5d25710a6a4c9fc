"""Which source files a stage's result depends on, derived from the imports.

A rule lists ``code_files(<the module it runs>)`` as an input, and a resumable job keys its state on
their digests, so editing a stage re-runs that stage and what follows it, and nothing else. The set is
the entry module plus every module of a stage subpackage (``pipeline/<stage>/``) it imports,
transitively, with the package data (``*.yaml``) of those subpackages. The small core modules at the
top of ``pipeline/`` (config, io, runtime, ...) are deliberately left out: they carry no results of
their own, and editing them must not re-run days of GPU work.

Pure ``ast``: cheap enough for every parse of the workflow.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from pipeline.io import file_sha256

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


def module_file(module: str) -> Path | None:
    """``pipeline.views.shards`` -> its file (module or package ``__init__``), None if not ours."""
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


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


@functools.cache
def imported_modules(module: str) -> tuple[str, ...]:
    """Our modules that ``module`` imports (any import statement, at any depth)."""
    path = module_file(module)
    if path is None:
        return ()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
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
    return tuple(m for m in dict.fromkeys(found) if module_file(m) is not None)


def code_files(*modules: str) -> list[Path]:
    """Source files whose content defines what ``modules`` compute (see the module docstring)."""
    missing = [m for m in modules if module_file(m) is None]
    if missing:
        raise ModuleNotFoundError(f"no source file for {missing} under {PACKAGE_DIR}")
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen or not _is_stage_module(m):
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # enclosing stage packages
        todo += imported_modules(m)
    files = {module_file(m) for m in seen}
    for stage in {m.split(".")[1] for m in seen}:
        files.update((PACKAGE_DIR / stage).rglob("*.yaml"))
    return sorted(f for f in files if f is not None)


def code_digests(*modules: str) -> dict[str, str]:
    """SHA-256 of each of ``code_files(*modules)``, keyed by its path inside the package: what a
    resumable state records so that only the same code continues it."""
    return {f.relative_to(PACKAGE_DIR).as_posix(): file_sha256(f) for f in code_files(*modules)}
