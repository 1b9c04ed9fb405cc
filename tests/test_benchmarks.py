"""The benchmark scripts run end to end (tiny settings) and print their tables."""
import subprocess
import sys

from conftest import REPO


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_attention_cost_benchmark():
    out = _run("benchmarks/attention_cost.py", "--reps", "1", "--batches", "1", "2", "--size", "32")
    assert "| resnet18_lgam |" in out and "fwd+bwd b1" in out
    assert "LGAM G=32, r=2" in out and "| resnet18_lgam_g32 |" in out
