"""``provenance-diff``: what differs between the provenance records of two results folders.

    python -m pipeline.report provenance-diff results/ other_run/results/

Every ``*.provenance.json`` under each folder (``pipeline.records``) is matched by its path relative
to the folder; for each pair it prints what differs (commit, dirty files, code digest, software
versions, hardware, device / precision, settings digest, the artefact's and the inputs' digests,
the environments behind it), then the records found in only one folder. Prints ``identical`` when
nothing differs. Exits 0 whenever the comparison ran (differences are the answer, not an error).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli import command_parser
from pipeline.records import ENVIRONMENT_KEYS, RECORD_SUFFIX, canonical_json, describe_environment, read_record

# top-level scalar fields compared as they are
SCALARS = ("kind", "command", "code_digest", "device", "precision", "config_digest", "sha256")
# nested {name: value} fields compared key by key
MAPPINGS = ("software", "hardware")


def find_records(folder: str | Path) -> dict[str, Path]:
    """``{relative path: path}`` of every provenance record under ``folder``."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob(f"*{RECORD_SUFFIX}")) if p.is_file()}


def _show(value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:16] + "…"  # a SHA-256
    return json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value


def _changed(label: str, a, b) -> list[str]:
    return [] if a == b else [f"{label}: {_show(a)} -> {_show(b)}"]


def _mapping_diff(label: str, a: dict | None, b: dict | None) -> list[str]:
    a, b = a or {}, b or {}
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            lines.append(f"{label}[{key}]: only in A ({_show(a[key])})")
        elif key not in a:
            lines.append(f"{label}[{key}]: only in B ({_show(b[key])})")
        else:
            lines += _changed(f"{label}[{key}]", a[key], b[key])
    return lines


def _environments(record: dict) -> dict[str, dict]:
    envs = {}
    for env in record.get("environments") or []:
        summary = {k: env.get(k) for k in ENVIRONMENT_KEYS}
        envs[canonical_json(summary)] = summary
    return envs


def _describe(env: dict) -> str:
    commit = (env.get("commit") or "unknown")[:12] + (" dirty" if env.get("dirty") else "")
    return f"commit {commit} · {describe_environment(env)}"


def compare_records(a: dict, b: dict) -> list[str]:
    """What differs between two records, one line each (empty: nothing)."""
    code_a, code_b = a.get("code") or {}, b.get("code") or {}
    lines = _changed("code.commit", code_a.get("commit"), code_b.get("commit"))
    lines += _changed("code.dirty", code_a.get("dirty"), code_b.get("dirty"))
    lines += _mapping_diff("code.dirty_files", code_a.get("dirty_files"), code_b.get("dirty_files"))
    for key in SCALARS:
        lines += _changed(key, a.get(key), b.get(key))
    for key in MAPPINGS:
        lines += _mapping_diff(key, a.get(key), b.get(key))
    lines += _mapping_diff("inputs", a.get("inputs"), b.get("inputs"))
    env_a, env_b = _environments(a), _environments(b)
    lines += [f"environment only in A: {_describe(env_a[k])}" for k in env_a if k not in env_b]
    lines += [f"environment only in B: {_describe(env_b[k])}" for k in env_b if k not in env_a]
    return lines


def diff_folders(folder_a: str | Path, folder_b: str | Path) -> list[str]:
    """The report of ``provenance-diff`` as lines; ``["identical"]`` when nothing differs."""
    rec_a, rec_b = find_records(folder_a), find_records(folder_b)
    lines = []
    for rel in sorted(set(rec_a) & set(rec_b)):
        a, b = read_record(rec_a[rel]), read_record(rec_b[rel])
        if a is None or b is None:
            unreadable = [str(p) for p, r in ((rec_a[rel], a), (rec_b[rel], b)) if r is None]
            lines += [f"{rel}:", f"  unreadable: {', '.join(unreadable)}"]
            continue
        found = compare_records(a, b)
        if found:
            lines += [f"{rel}:"] + [f"  {line}" for line in found]
    lines += [f"only in A ({folder_a}): {rel}" for rel in sorted(set(rec_a) - set(rec_b))]
    lines += [f"only in B ({folder_b}): {rel}" for rel in sorted(set(rec_b) - set(rec_a))]
    return lines or ["identical"]


def main(argv=None) -> None:
    """``provenance-diff A B``."""
    ap = command_parser("report", "provenance-diff", __doc__)
    ap.add_argument("a", help="a results folder (A)")
    ap.add_argument("b", help="another results folder (B)")
    args = ap.parse_args(argv)
    for folder in (args.a, args.b):
        if not Path(folder).is_dir():
            ap.error(f"not a folder: {folder}")
    n_a, n_b = len(find_records(args.a)), len(find_records(args.b))
    print(f"A = {args.a} ({n_a} records), B = {args.b} ({n_b} records)")
    print("\n".join(diff_folders(args.a, args.b)))
