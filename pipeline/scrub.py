"""``python -m pipeline.scrub [--results results] [--remove]``: verify every recorded digest of a
results folder, report what is corrupt, and with ``--remove`` delete it and what was made from it.

What is checked (each file hashed once):

- every ``<name>.sha256`` (``pipeline.io``): checkpoints, resume states (``last.pth``,
  ``previous.pth``), view parts, shards and ``bag.h5`` against their recorded content digests;
- every ``.pth`` / ``.h5`` file, which the workflow always writes with a digest: one without is
  untrusted (copied without its ``.sha256``, say);
- every model folder (an S-LDM folder, ``sldm.json``) against its ``digests.sha256`` manifest
  (``pipeline.io.verify_folder_digests``): a missing manifest is untrusted too;
- every provenance record (``<stem>.provenance.json``, ``pipeline.records``) against its artefact
  (tables, ``metrics.csv``, checkpoints, ``knn.npz``, the bag, S-LDM folders): the artefact's
  SHA-256 (a folder's digest) must be the recorded one; an unreadable record is corrupt.

Dependents come from the records: each lists every input of its artefact, transitively (records
merge their inputs' inputs). ``--remove`` deletes each corrupt or untrusted artefact (with its
``.sha256`` and record) and every artefact whose record names one of them, directly or through
another removed one. Snakemake then sees those outputs missing, so the normal command
(``snakemake --cores 8 results/table4.csv``) rebuilds exactly them, resuming from the kept
training states (a finished job's state rewrites its checkpoint byte for byte without retraining).

Infrastructure: it computes no result; exit status 1 when something was found and not removed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.io import (
    DIGEST_SUFFIX,
    FOLDER_DIGESTS,
    RESULTS_DIR,
    IntegrityError,
    digest_path,
    file_sha256,
    recorded_digest,
    verify_folder_digests,
)
from pipeline.records import RECORD_SUFFIX, folder_digest, record_path

DIGESTED_SUFFIXES = (".pth", ".h5")  # files the workflow always writes with a recorded digest
MODEL_MANIFEST = "sldm.json"  # marks a model folder (docs/sldm-format.md), which carries FOLDER_DIGESTS
CORRUPT, UNTRUSTED, DEPENDENT = "corrupt", "no digest", "made from"


@dataclass(frozen=True)
class Finding:
    """One artefact to remove: ``path`` (relative to the workflow folder), what is wrong, why."""

    path: str
    problem: str  # CORRUPT, UNTRUSTED or DEPENDENT
    detail: str


def kind_of(path: str, root: Path = Path()) -> str:
    """What an artefact (``path`` relative to the workflow folder ``root``) is, for the report."""
    name = Path(path).name
    if (root / path / MODEL_MANIFEST).exists() or (root / path / FOLDER_DIGESTS).exists():
        return "model folder"
    if name in ("last.pth", "previous.pth"):
        return "resume state"
    if name == "bag.h5":
        return "bag of views"
    if "/parts/" in path and name.endswith(".h5"):
        return "view part"
    if name.startswith("shard-") and name.endswith(".h5"):
        return "view shard"
    if name.endswith(".pth"):
        return "checkpoint"
    if name.endswith(RECORD_SUFFIX):
        return "provenance record"
    if name.startswith(("table", "figure")) and Path(path).parent.name == RESULTS_DIR:
        return "table or figure"
    return {"metrics.csv": "propagation metrics", "knn.npz": "k-NN neighbours"}.get(name, "artefact")


class Scrubber:
    """Scan one results folder (``results``), whose parent is the workflow folder the records'
    paths are relative to."""

    def __init__(self, results: str | os.PathLike):
        self.results = Path(results)
        if not self.results.is_dir():
            raise SystemExit(f"python -m pipeline.scrub: {self.results} is not a folder")
        self.root = self.results.resolve().parent
        self.notes: list[str] = []

    def rel(self, path: str | os.PathLike) -> str:
        """``path`` relative to the workflow folder, as the records name artefacts and inputs."""
        p = Path(path)
        p = p if p.is_absolute() else self.root / p
        p = Path(os.path.normpath(p))
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return p.as_posix()

    @functools.cache  # noqa: B019 (one scrub, one folder: the cache lives as long as the scan)
    def sha(self, path: Path) -> str:
        return file_sha256(path)

    # -----------------------------------------------------------------------------------------
    # checks

    def scan(self) -> dict[str, Finding]:
        """Corrupt and untrusted artefacts, by path (dependents not included)."""
        found: dict[str, Finding] = {}

        def add(path, problem: str, detail: str) -> None:
            found.setdefault(self.rel(path), Finding(self.rel(path), problem, detail))

        files = sorted(p for p in self.results.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
        folders = sorted({p.parent for p in files if p.name in (FOLDER_DIGESTS, MODEL_MANIFEST)})
        in_folder = lambda p: any(f in p.parents for f in folders)  # noqa: E731
        for folder in folders:
            try:
                verify_folder_digests(folder, external=False)
            except IntegrityError as err:
                add(folder, CORRUPT if (folder / FOLDER_DIGESTS).exists() else UNTRUSTED, str(err))
        for path in files:
            if in_folder(path):
                continue
            if path.name.endswith(DIGEST_SUFFIX):
                target = path.with_name(path.name[: -len(DIGEST_SUFFIX)])
                if not target.exists():
                    self.notes.append(f"{self.rel(path)}: a recorded digest whose file is gone (harmless)")
                continue
            if path.name.endswith(".corrupt"):
                self.notes.append(f"{self.rel(path)}: set aside by an earlier run as corrupt, not used")
                continue
            expected = recorded_digest(path)
            if expected is not None:
                actual = self.sha(path)
                if actual != expected:
                    add(
                        path,
                        CORRUPT,
                        f"content digest {actual[:16]}… != recorded {expected[:16]}… ({digest_path(path).name})",
                    )
            elif path.suffix in DIGESTED_SUFFIXES:
                add(
                    path,
                    UNTRUSTED,
                    f"{digest_path(path).name} missing: every {path.suffix} the workflow writes has one",
                )
        for record in (p for p in files if p.name.endswith(RECORD_SUFFIX) and not in_folder(p)):
            self.check_record(record, add)
        return found

    def check_record(self, record: Path, add) -> None:
        """The artefact of ``record`` against the digest it records."""
        try:
            data = json.loads(record.read_text())
            artefact = record.parent / Path(data["artefact"]).name
            expected = data["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            add(record, CORRUPT, f"unreadable provenance record ({type(err).__name__}: {err})")
            return
        if not artefact.exists():
            self.notes.append(f"{self.rel(record)}: the record of a missing artefact {self.rel(artefact)}")
            return
        actual = folder_digest(artefact) if artefact.is_dir() else self.sha(artefact)
        if actual != expected:
            add(
                artefact,
                CORRUPT,
                f"content digest {str(actual)[:16]}… != {str(expected)[:16]}… of its record {record.name}",
            )

    # -----------------------------------------------------------------------------------------
    # dependents

    def records(self) -> dict[str, tuple[Path, set[str]]]:
        """Every readable record: artefact path -> (record file, input paths)."""
        out = {}
        for record in self.results.rglob("*" + RECORD_SUFFIX):
            try:
                data = json.loads(record.read_text())
                artefact = self.rel(record.parent / Path(data["artefact"]).name)
                inputs = {self.rel(p) for p in (data.get("inputs") or {})}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            out[artefact] = (record, inputs)
        return out

    def dependents(self, bad: dict[str, Finding]) -> dict[str, Finding]:
        """Artefacts whose records name a bad artefact (or a file inside a bad folder), directly or
        through another dependent."""
        records = self.records()
        gone = dict(bad)
        changed = True
        while changed:
            changed = False
            for artefact, (_, inputs) in records.items():
                if artefact in gone:
                    continue
                hit = next((i for i in sorted(inputs) for g in gone if i == g or i.startswith(g + "/")), None)
                if hit is not None:
                    gone[artefact] = Finding(artefact, DEPENDENT, hit)
                    changed = True
        return {k: v for k, v in gone.items() if k not in bad}

    # -----------------------------------------------------------------------------------------
    # removal

    def remove(self, findings: dict[str, Finding]) -> list[str]:
        """Delete each artefact with its recorded digest and its record; the paths deleted."""
        removed = []
        for rel in sorted(findings):
            path = self.root / rel
            companions = [digest_path(path), record_path(path)]
            if path.name.endswith(RECORD_SUFFIX):  # a corrupt record: its artefact's job rewrites both
                data_artefact = [p for p in path.parent.iterdir() if record_path(p) == path and p != path]
                companions += data_artefact + [digest_path(p) for p in data_artefact]
            for p in [path, *companions]:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
                else:
                    continue
                removed.append(self.rel(p))
        return removed


def report(findings: dict[str, Finding], notes: list[str], root: Path = Path()) -> str:
    """One line per finding (corrupt, then untrusted, then dependents), then the notes."""
    lines = []
    for problem in (CORRUPT, UNTRUSTED, DEPENDENT):
        for f in sorted((f for f in findings.values() if f.problem == problem), key=lambda f: f.path):
            kind = kind_of(f.path, root)
            what = f"{kind}, {problem} {f.detail}" if problem == DEPENDENT else f"{kind}: {f.detail}"
            lines.append(f"{problem.upper():10s} {f.path}  ({what})")
    lines += [f"{'NOTE':10s} {n}" for n in notes]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.scrub",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--results", default="results", help="the results folder (default: results)")
    ap.add_argument(
        "--remove",
        action="store_true",
        help="delete the corrupt and untrusted artefacts and everything made from them, so that the "
        "workflow's normal command rebuilds exactly those",
    )
    args = ap.parse_args(argv)
    scrubber = Scrubber(args.results)
    bad = scrubber.scan()
    dependents = scrubber.dependents(bad)
    findings = {**bad, **dependents}
    text = report(findings, scrubber.notes, scrubber.root)
    if text:
        print(text)
    counts = {p: sum(f.problem == p for f in findings.values()) for p in (CORRUPT, UNTRUSTED, DEPENDENT)}
    summary = f"{counts[CORRUPT]} corrupt, {counts[UNTRUSTED]} without a digest, {counts[DEPENDENT]} made from them"
    if not findings:
        print(f"{args.results}: every recorded digest verified; nothing to remove")
        return
    if not args.remove:
        print(f"{summary}; `python -m pipeline.scrub --remove` deletes them, then the workflow rebuilds them")
        raise SystemExit(1)
    removed = scrubber.remove(findings)
    print(f"{summary}: removed {len(removed)} files and folders; rebuild with the usual command, e.g.")
    print("  snakemake --cores 8 results/table4.csv")


if __name__ == "__main__":
    sys.exit(main())
