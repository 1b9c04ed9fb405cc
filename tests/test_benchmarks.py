"""The benchmark scripts run end to end (tiny settings) and print their tables."""
import subprocess
import sys

import pytest

from _helpers import REPO


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_attention_cost_benchmark():
    out = _run("benchmarks/attention_cost.py", "--reps", "1", "--batches", "1", "2", "--size", "32",
               "--ratio-sizes", "32", "--ratio-batch", "2", "--rounds", "1", "--steps", "1")
    assert "| resnet18_lgam |" in out and "fwd+bwd b1" in out
    ratio_rows = [line for line in out.splitlines() if line.startswith("| resnet18") and "train bf16 32" not in line]
    assert "| model | fwd fp32 32 | train fp32 32 | fwd bf16 32 | train bf16 32 |" in out
    assert ratio_rows[0].startswith("| resnet18 img/s |") and ratio_rows[1] == "| resnet18 | 1.00 | 1.00 | 1.00 | 1.00 |"
    assert "LGAM G=32, r=2" in out and "| resnet18_lgam_g32 |" in out


@pytest.mark.slow
def test_app_latency_benchmark(tmp_path):
    """Without six checkpoints it writes freshly initialised ones, serves them from ``python -m
    app`` in its own process and prints every row, the naive loop last."""
    out = _run("benchmarks/app_latency.py", "--reps", "1", "--naive-reps", "1", "--size", "64",
               "--image-size", "96", "--checkpoints", str(tmp_path / "none"))
    rows = [line for line in out.splitlines() if line.startswith("| cpu |")]
    names = [r.split("|")[2].strip() for r in rows]
    assert names[0] == "engine float32" and names[-1].startswith("naive")
    assert any(n.startswith("/compare round trip") for n in names)
    assert any(n.startswith("page, Grad-CAM + gates") for n in names)
    assert "Machine:" in out


def test_lgam_mixing_benchmark():
    out = _run("benchmarks/lgam_mixing.py", "--batch", "2", "--reps", "1")
    rows = [line for line in out.splitlines() if line.startswith("| 64,") or line.startswith("| 128,")]
    assert len(rows) == 2 and all(len(r.split("|")) == 6 for r in rows)
