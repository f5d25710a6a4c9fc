"""``bench/gpu_suite.sh``: every GPU path once; here its ``--tiny`` CPU run end to end, and the
driver's reporting of failing sections and of its time budget."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import gpu_suite

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_suite_runs_every_section_on_the_cpu_with_tiny_sizes():
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--tiny"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    for name in gpu_suite.ORDER:
        assert f"| {name} | ok |" in text, text[-3000:]
    # each section's own table: pretraining against the reference-style step for a1 and a3, the
    # DDP step over a real process group, both diffusion generators, S-LDM steps, propagation /8
    assert "| 1 | 0 | reference |" in text and "| 3 | 0.25 | ours |" in text
    assert "# ddp: gloo world 1" in text and "| DDP pretraining step (fp32) |" in text
    assert "| sd-variation (tiny" in text and "| sldm (tiny" in text
    assert "| S-LDM training step |" in text and "| /8 seq-000 48x88, grid 6x11, 3 frames |" in text


def test_a_failing_section_is_reported_and_the_suite_goes_on(monkeypatch, capsys):
    def broken(sizes):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(gpu_suite.SECTIONS, "views", broken)
    monkeypatch.setitem(gpu_suite.SECTIONS, "sldm-train", lambda sizes: print("sldm ran"))
    assert gpu_suite.run_suite(["views", "sldm-train"], tiny=True) == 1
    text = capsys.readouterr().out
    assert "views failed: RuntimeError: out of memory" in text
    assert "| views | failed (RuntimeError) |" in text and "sldm ran" in text and "| sldm-train | ok |" in text


def test_sections_past_the_suite_budget_are_reported_not_run(monkeypatch, capsys):
    monkeypatch.setattr(gpu_suite, "SUITE_BUDGET_S", 0)
    assert gpu_suite.run_suite(["pretrain", "propagation"], tiny=True) == 2
    assert "| propagation | not run (suite budget spent) |" in capsys.readouterr().out


def test_the_gpu_run_refuses_to_start_without_a_gpu(monkeypatch):
    monkeypatch.setattr(gpu_suite.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device visible; use --tiny"):
        gpu_suite.main([])


def test_a_hanging_section_is_killed_with_its_children(monkeypatch, tmp_path):
    pid_file = tmp_path / "pid"
    # the section's process starts a child (as torchrun starts its worker) and hangs
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    monkeypatch.setattr(gpu_suite, "section_command", lambda name, tiny: ["bash", "-c", script])
    assert gpu_suite.run_section("ddp", tiny=False, timeout=2, env={}) == "timed out (2 s)"
    status = Path(f"/proc/{pid_file.read_text().strip()}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone (or a zombie awaiting init)
