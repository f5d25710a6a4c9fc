"""``bench/rehearse_paper_preset.py`` (the paper preset's code paths at their true sizes, on the CPU):
here its ``--tiny`` run end to end, every stage in one process, so that the script cannot rot."""

import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.slow
def test_the_rehearsal_runs_every_stage_of_the_preset_with_tiny_sizes(tmp_path):
    from bench.rehearse_paper_preset import STAGES

    cmd = [sys.executable, "-m", "bench.rehearse_paper_preset", "--tiny", "--in-process", "--threads", "1"]
    cmd += ["--sampling-steps", "2", "--bag-steps", "1", "--work", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = [ln for ln in out.stdout.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| stage | what ran") and len(table) == 1 + len(STAGES)
    assert [ln.split(" | ")[0].removeprefix("| ") for ln in table[1:]] == list(STAGES)
    assert "failed" not in out.stdout
    text = out.stdout
    # the preset's choices reach the code paths: its S-LDM samples with CFG 6, bf16 requested
    # (float32 on the CPU), the CompVis schedule; the bag is merged as a virtual dataset
    assert "CFG 6.0, epsilon, dtype bfloat16 (float32 on CPU)" in text
    assert '"beta_schedule": "scaled_linear"' in text and '"steps_offset": 1' in text
    assert "views generate + merge (vds): 2 images x 4 views" in text
    for method in ("cropmae", "siammae", "cdgmae"):
        assert f"| {method} vit_mini_patch4 48 px" in text or f"{method} vit_mini_patch4 48 px" in text
    assert "N=3 r_a=0.25 r_t=0.9" in text and "r_t=0.985" in text
    assert "scored (J&F" in text and "DAVIS-2017 val, 1,999 frames" in text
