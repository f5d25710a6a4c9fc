"""Provenance records (``pipeline.records``): what a record holds, the git state it reads, how the
environments of upstream records merge, the ``provenance-diff`` command, the summary's provenance
blocks, and that every paper table is report-tagged with its record. Temporary folders only."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import records
from pipeline.cli import run
from pipeline.config import section_defaults
from pipeline.io import record_digest
from pipeline.provenance import code_digest
from pipeline.records import build_record, code_state, read_record, record_path, write_record
from pipeline.report import summary
from pipeline.report.provenance_diff import diff_folders
from pipeline.table_registry import PAPER_TABLES
from tests.support import ROOT, copy_workflow


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_record_path_is_the_stem_beside_the_artefact(tmp_path):
    assert record_path("results/table4.csv") == Path("results/table4.provenance.json")
    assert record_path("results/pretrain/m/seed~0/checkpoint.pth") == Path(
        "results/pretrain/m/seed~0/checkpoint.provenance.json"
    )
    assert record_path("results/eval/m/davis/metrics.csv") == Path("results/eval/m/davis/metrics.provenance.json")
    assert record_path("results/views/warp/bag.h5") == Path("results/views/warp/bag.provenance.json")
    folder = tmp_path / "sldm" / "model.v1"
    folder.mkdir(parents=True)
    assert record_path(folder) == tmp_path / "sldm" / "model.v1.provenance.json"  # a folder keeps its whole name
    assert record_path("results/sldm/model") == Path("results/sldm/model.provenance.json")


def test_record_holds_digests_software_hardware_and_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("table.csv").write_text("a,b\n1,2\n")
    Path("ckpt.pth").write_bytes(b"weights")
    record_digest("ckpt.pth")
    Path("ckpt.pth.sha256").write_text("f" * 64 + "  ckpt.pth\n")  # the recorded digest wins over the bytes
    Path("knn.npz").write_bytes(b"neighbours")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "x.txt").write_text("x")
    settings = {"b": [1, 2], "a": {"z": 1}}
    rec = build_record(
        "table.csv",
        kind="table",
        command=("report", "table"),
        inputs=["ckpt.pth", tmp_path / "knn.npz", None, "root"],
        settings=settings,
        device="cpu",
        precision="fp32",
    )
    for key in ("kind", "artefact", "sha256", "created_utc", "code", "code_digest", "software", "hardware"):
        assert key in rec, key
    assert rec["artefact"] == "table.csv" and rec["kind"] == "table" and rec["command"] == "report table"
    assert rec["sha256"] == _sha(b"a,b\n1,2\n")
    assert rec["code_digest"] == code_digest("pipeline.report.table")
    assert rec["inputs"] == {
        "ckpt.pth": "f" * 64,
        "knn.npz": _sha(b"neighbours"),
        "root": records.folder_digest("root"),
    }
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    assert rec["config_digest"] == _sha(canonical.encode()) and rec["config"] == settings
    assert rec["software"]["python"] == sys.version.split()[0]
    for dist in records.SOFTWARE:
        try:
            expected = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            expected = None
        assert rec["software"][dist] == expected, dist
    assert rec["hardware"]["cpu"] and rec["hardware"]["cpu_count"] >= 1
    if "torch" not in sys.modules:
        assert rec["hardware"]["gpus"] is None
    assert rec["device"] == "cpu" and rec["precision"] == "fp32"
    (env,) = rec["environments"]
    assert env["artefacts"] == ["table.csv"] and env["software"] == rec["software"] and env["device"] == "cpu"
    # large settings: the digest only
    big = build_record("table.csv", kind="table", settings={"x": "y" * 5000})
    assert "config" not in big and len(big["config_digest"]) == 64
    # written atomically beside the artefact, read back
    assert write_record("table.csv", kind="table") == Path("table.provenance.json")
    assert read_record("table.provenance.json")["artefact"] == "table.csv"


def test_large_folders_are_digested_by_listing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.bin").write_bytes(b"0123456789")
    assert records.folder_digest(tmp_path / "a", limit=100) == records.folder_sha256(tmp_path / "a")
    listing = records.folder_digest(tmp_path / "a", limit=5)
    assert listing.startswith("listing-sha256:") and listing == records.folder_digest(tmp_path / "a", limit=5)


def test_git_state_lists_the_digest_of_each_dirty_file(tmp_path):
    repo = tmp_path / "wf"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("ignored.txt\n")
    (repo / "tracked.py").write_text("x = 1\n")
    _git(repo, "add", ".gitignore", "tracked.py")
    _git(repo, "commit", "-q", "-m", "init")
    head = _git(repo, "rev-parse", "HEAD")
    clean = code_state(repo)
    assert clean == {"commit": head, "dirty": False}

    (repo / "tracked.py").write_text("x = 2\n")
    (repo / "new dir").mkdir()
    (repo / "new dir" / "untracked.py").write_text("y = 1\n")
    (repo / "ignored.txt").write_text("never listed")
    (repo / "results").mkdir()
    (repo / "results" / "table4.csv").write_text("never listed either")
    state = code_state(repo)
    assert state["commit"] == head and state["dirty"] is True
    assert state["dirty_files"] == {
        "new dir/untracked.py": _sha(b"y = 1\n"),
        "tracked.py": _sha(b"x = 2\n"),
    }
    rec = build_record(repo / "tracked.py", kind="test", root=repo)
    assert rec["code"] == state
    assert rec["environments"][0]["dirty"] is True and rec["environments"][0]["dirty_digest"]


def test_outside_a_git_checkout_the_commit_is_null(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    state = code_state(plain)
    assert state["commit"] is None and state["dirty"] is None and "not a git checkout" in state["note"]
    (plain / "t.csv").write_text("x\n")
    rec = build_record(plain / "t.csv", kind="table", root=plain)
    assert rec["code"]["commit"] is None and rec["environments"][0]["commit"] is None
    assert "commit unknown" in records.describe_record(rec)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # git missing
    assert code_state(plain) == {"commit": None, "dirty": None, "note": "git is not installed"}


def _fake_software(torch_version):
    real = records.software_versions

    def versions():
        return {**real(), "torch": torch_version}

    return versions


def test_environments_merge_flatly_across_upstream_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bag.h5").write_bytes(b"views")
    record_digest("bag.h5")
    Path("shard-0.h5").write_bytes(b"shard")
    write_record("bag.h5", kind="bag", inputs=["shard-0.h5"])  # the merge job: no device
    monkeypatch.setattr(records, "software_versions", _fake_software("9.9.9"))  # trained elsewhere
    Path("checkpoint.pth").write_bytes(b"weights")
    write_record("checkpoint.pth", kind="checkpoint", inputs=["bag.h5"], device="cuda", precision="bf16")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    for ds in ("davis", "vip"):
        Path(ds).mkdir()
        Path(ds, "metrics.csv").write_text(f"{ds},1\n")
        write_record(f"{ds}/metrics.csv", kind="metrics", inputs=["checkpoint.pth"], device="cpu", precision="fp32")
    Path("table4.csv").write_text("t\n")
    rec = build_record("table4.csv", kind="table", inputs=["davis/metrics.csv", "vip/metrics.csv"])

    # inputs: the metrics, and flatly what was behind them (checkpoint, bag, shard)
    assert set(rec["inputs"]) == {"davis/metrics.csv", "vip/metrics.csv", "checkpoint.pth", "bag.h5", "shard-0.h5"}
    assert rec["inputs"]["checkpoint.pth"] == _sha(b"weights")
    assert rec["upstream"] == ["davis/metrics.provenance.json", "vip/metrics.provenance.json"]
    envs = rec["environments"]
    # three distinct environments: propagation (cpu fp32), training (torch 9.9.9, cuda bf16), and the
    # device-less jobs (the report and the merge, same machine); each listed once with its artefacts
    assert len(envs) == 3
    assert len({json.dumps({k: e[k] for k in records.ENVIRONMENT_KEYS}, sort_keys=True) for e in envs}) == 3
    by_artefacts = {tuple(e["artefacts"]): e for e in envs}
    assert set(by_artefacts) == {
        ("table4.csv", "bag.h5"),
        ("davis/metrics.csv", "vip/metrics.csv"),
        ("checkpoint.pth",),
    }
    assert by_artefacts[("checkpoint.pth",)]["software"]["torch"] == "9.9.9"
    assert by_artefacts[("checkpoint.pth",)]["device"] == "cuda"
    assert by_artefacts[("davis/metrics.csv", "vip/metrics.csv")]["precision"] == "fp32"
    assert "9.9.9" in records.describe_record(rec)

    # a record that describes other bytes than the input read is not merged, and is named
    Path("vip/metrics.csv").write_text("changed after its record\n")
    rec = build_record("table4.csv", kind="table", inputs=["vip/metrics.csv"])
    assert rec["stale_upstream"] == ["vip/metrics.provenance.json"]
    assert set(rec["inputs"]) == {"vip/metrics.csv"} and len(rec["environments"]) == 1


def test_records_does_not_import_torch():
    code = "import pipeline.records, sys; pipeline.records.hardware(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _hand_record(torch_version: str, ckpt_digest: str) -> dict:
    env = {
        "commit": "a" * 40,
        "dirty": False,
        "dirty_digest": None,
        "software": {"python": "3.11.7", "torch": torch_version, "timm": "1.0.9"},
        "hardware": {"cpu": "x86", "cpu_count": 8, "gpus": ["NVIDIA H100"]},
        "device": "cuda",
        "precision": "bf16",
    }
    return {
        "kind": "table",
        "artefact": "results/table4.csv",
        "sha256": "1" * 64,
        "code": {"commit": "a" * 40, "dirty": False},
        "code_digest": "2" * 64,
        "software": env["software"],
        "hardware": env["hardware"],
        "device": "cuda",
        "precision": "bf16",
        "config_digest": "3" * 64,
        "inputs": {"results/eval/m/davis/metrics.csv": "4" * 64, "results/pretrain/m/checkpoint.pth": ckpt_digest},
        "environments": [{**env, "artefacts": ["results/table4.csv"]}],
    }


def test_provenance_diff_names_what_differs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, torch_version, ckpt in ((a, "2.5.1", "5" * 64), (b, "2.6.0", "6" * 64)):
        (folder / "eval").mkdir(parents=True)
        (folder / "table4.provenance.json").write_text(json.dumps(_hand_record(torch_version, ckpt)))
        (folder / "eval" / "metrics.provenance.json").write_text(json.dumps(_hand_record("2.5.1", "7" * 64)))
    (a / "table1.provenance.json").write_text(json.dumps(_hand_record("2.5.1", "7" * 64)))
    (a / "table4.csv").write_text("not a record\n")

    lines = diff_folders(a, b)
    assert "table4.provenance.json:" in lines
    assert "  software[torch]: 2.5.1 -> 2.6.0" in lines
    assert f"  inputs[results/pretrain/m/checkpoint.pth]: {'5' * 16}… -> {'6' * 16}…" in lines
    assert any(line.startswith("  environment only in A:") and "torch 2.5.1" in line for line in lines)
    assert any(line.startswith("  environment only in B:") and "torch 2.6.0" in line for line in lines)
    assert f"only in A ({a}): table1.provenance.json" in lines
    assert not any("eval/metrics" in line for line in lines)  # identical records are not listed
    assert not any("inputs[results/eval/m/davis" in line for line in lines)  # nor identical inputs

    run("report", ["provenance-diff", str(a), str(b)])
    out = capsys.readouterr().out
    assert "software[torch]: 2.5.1 -> 2.6.0" in out and "identical" not in out

    shutil.copytree(a, tmp_path / "a2")
    assert diff_folders(a, tmp_path / "a2") == ["identical"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.report", "provenance-diff", str(a), str(tmp_path / "a2")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("identical"), proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.report", "provenance-diff", str(a), str(b)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "only in A" in proc.stdout, proc.stderr


def test_config_table_command_writes_its_record_and_the_summary_shows_it(tmp_path):
    out = tmp_path / "results" / "table7.csv"
    settings = {"propagation": section_defaults("propagation")}
    run("report", ["config-table", "--name", "table7", "--settings", json.dumps(settings), "--output", str(out)])
    rec = read_record(record_path(out))
    assert rec["command"] == "report config-table" and rec["config"] == settings and rec["inputs"] == {}
    assert rec["sha256"] == _sha(out.read_bytes())

    md = tmp_path / "summary.md"
    run("report", ["summary", "--tables", str(out), "--output", str(md), "--run-label", "t"])
    text = md.read_text()
    assert f"*Provenance* (`{record_path(out).as_posix()}`)" in text
    assert "0 input artefacts" in text and f"torch {importlib.metadata.version('torch')}" in text

    # a table without a record says so
    lines = summary.provenance_lines("results/table2.provenance.json", None)
    assert lines == ["*Provenance:* no record (`results/table2.provenance.json` is missing or unreadable)."]
    md_text = summary.summary_markdown(
        {"table7": pd.read_csv(out)}, "t", "Data.", {"table7": ("x.provenance.json", rec)}
    )
    assert "*Provenance* (`x.provenance.json`)" in md_text


@pytest.fixture(scope="module")
def parsed_workflow(tmp_path_factory):
    """The workflow's rules, parsed (not run) on the tiny config in a private copy."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

    work = copy_workflow(tmp_path_factory.mktemp("wf"))
    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[work / "tests" / "configs" / "tiny.yaml"]),
            storage_settings=StorageSettings(),
            snakefile=work / "Snakefile",
            workdir=work,
        )
        yield list(workflow._workflow.rules)


def test_every_paper_table_is_in_the_html_report_with_its_record(parsed_workflow):
    """Each results/tableN.csv is made by exactly one rule, whose output is report-tagged, and
    whose provenance record results/tableN.provenance.json is a report-tagged output too."""
    from snakemake.io import is_flagged

    for table in [*PAPER_TABLES, "figure4"]:
        for path in (f"results/{table}.csv", f"results/{table}.provenance.json"):
            producers = [(rule, o) for rule in parsed_workflow for o in rule.output if o.match(path)]
            assert len(producers) == 1, (path, [r.name for r, _ in producers])
            rule, output = producers[0]
            assert is_flagged(output, "report"), f"{path} ({rule.name}) is not report-tagged"
