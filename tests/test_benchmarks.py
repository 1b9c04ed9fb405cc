"""The benchmark scripts run end to end (tiny settings) and print their tables."""
import os
import subprocess
import sys

import pytest
import torch

from _helpers import REPO


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_attention_cost_benchmark():
    out = _run("benchmarks/attention_cost.py", "--reps", "1", "--batches", "1", "2", "--size", "32",
               "--ratio-sizes", "32", "--ratio-batch", "2", "--rounds", "1", "--steps", "1")
    assert "| resnet18_lgam (eager) |" in out
    assert "| resnet18_lgam |" in out and "fwd+bwd b1" in out
    ratio_rows = [line for line in out.splitlines() if line.startswith("| resnet18") and "train bf16 32" not in line]
    assert "| model | fwd fp32 32 | train fp32 32 | fwd bf16 32 | train bf16 32 |" in out
    assert ratio_rows[0].startswith("| resnet18 img/s |") and ratio_rows[1] == "| resnet18 | 1.00 | 1.00 | 1.00 | 1.00 |"
    assert all(float(v) > 0 for row in ratio_rows for v in row.strip("|").split("|")[1:])  # every cell measured
    assert "LGAM on the CPU: " in out and "threads" in out.splitlines()[1]
    assert "LGAM G=32, r=2" in out and "| resnet18_lgam_g32 |" in out


def test_attention_cost_ratio_table_of_chosen_models():
    out = _run("benchmarks/attention_cost.py", "--models", "resnet18_lgam", "--ratio-sizes", "32",
               "--ratio-batch", "2", "--rounds", "1", "--steps", "1", "--modes", "fwd", "--skip-latency",
               "--skip-growth")
    rows = [line.split(" |")[0] for line in out.splitlines() if line.startswith("| resnet18")]
    assert rows == ["| resnet18 img/s", "| resnet18", "| resnet18_lgam"]  # plain always, the rest as asked


def test_attention_cost_skip_growth_keeps_the_latency_table():
    """--skip-growth returned before the latency table, which only --skip-latency should skip."""
    out = _run("benchmarks/attention_cost.py", "--ratio-sizes", "--reps", "1", "--batches", "1", "--size", "32",
               "--skip-growth")
    assert "fwd+bwd b1" in out and "| resnet18_lgam |" in out
    assert "activation growth" not in out


@pytest.mark.slow
def test_app_latency_benchmark(tmp_path):
    """Without six checkpoints it writes freshly initialised ones, serves them from ``python -m
    app`` in its own process and prints every row, the naive loop last."""
    out = _run("benchmarks/app_latency.py", "--reps", "1", "--naive-reps", "1", "--size", "64",
               "--image-size", "96", "--checkpoints", str(tmp_path / "none"), "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith("| cpu |")]
    names = [r.split("|")[2].strip() for r in rows]
    assert names[0] == "engine float32" and names[-1].startswith("naive")
    assert any(n.startswith("/compare round trip") for n in names)
    assert any(n.startswith("page, Grad-CAM + gates") for n in names)
    assert rows[-1].endswith("| 1.0x |") and all(float(r.split("|")[3]) > 0 for r in rows)
    assert "Machine:" in out and "(freshly initialised," in out and "app_latency.py --reps 1" in out
    assert "the app's server: 1 threads; paths interleaved, 1 reps (1 naive)" in out


def test_app_latency_paths_are_interleaved():
    """Each path's reps ran in one block, minutes apart from the naive loop's they are divided by."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("app_latency", REPO / "benchmarks" / "app_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    paths = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = bench._time_interleaved(paths, {"a": 3, "b": 3, "c": 1}, lambda: None)
    assert calls[:6] == list("aabbcc")  # two warm-up calls each
    assert calls[6:] == list("abc") + list("ba") + list("ab")  # rotated rounds; c has its one rep
    assert [len(times[k]) for k in "abc"] == [3, 3, 1]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_app_memory_benchmark(tmp_path):
    """It serves fresh models from ``python -m app``, sends concurrent requests in rounds and
    prints the server's RSS after each round and the growth (a number, no threshold)."""
    out = _run("benchmarks/app_memory.py", "--clients", "2", "--rounds", "4", "--size", "64",
               "--checkpoints", str(tmp_path / "none"))
    trace = next(line for line in out.splitlines() if line.startswith("server RSS (MiB): "))
    assert trace.count("→") == 4 and "growth, rounds 1-3 to the last three: " in out


def test_lgam_paths_benchmark():
    from lgam.attention.lgam.kernels import kernel_missing

    out = _run("benchmarks/lgam_paths.py", "--batch", "2", "--size", "32", "--reps", "1", "--threads", "1")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"SE", "LGAM eager"} <= rows.keys() and "64ch 8x8 fwd" in rows["module"]
    assert ("LGAM fused" in rows) == (kernel_missing() is None)  # the op's row wherever it builds
    assert all(len(rows[r].split("|")) == 13 for r in rows if r != "module")
    assert out.startswith("# `benchmarks/lgam_paths.py --batch 2") and "cpu: " in out and "1 threads" in out
    proc = subprocess.run([sys.executable, "benchmarks/lgam_paths.py", "--batch", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--batch must be at least 2" in proc.stderr


@pytest.mark.parametrize("script", ["benchmarks/attention_cost.py", "benchmarks/train_throughput.py"])
def test_cuda_graphs_without_a_gpu_is_a_clear_error(script):
    proc = subprocess.run([sys.executable, script, "--cuda-graphs", "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cuda-graphs needs --device cuda" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_cost_cuda_graphs_on_cuda():
    """Every model's forward and training step capture as one CUDA graph and replay (LGAM's
    hand-written backward included): the table has a row per model."""
    out = _run("benchmarks/attention_cost.py", "--device", "cuda", "--cuda-graphs", "--ratio-sizes", "32",
               "--ratio-batch", "4", "--rounds", "1", "--steps", "2", "--skip-latency", "--skip-growth")
    assert "CUDA graphs" in out and "| model | fwd bf16 32 | train bf16 32 |" in out
    assert "| resnet18_lgam |" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lgam_replayed_as_a_cuda_graph_matches_eager_on_cuda(monkeypatch):
    """The benchmarks' captured graph recomputes on new input: replay == eager forward."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_throughput import captured

    import lgam
    torch.manual_seed(0)
    model = lgam.create_model("resnet18_lgam", num_classes=20).cuda().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    out = {}
    with torch.no_grad():
        graph = captured(lambda: out.update(y=model(x)))
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out["y"], model(x))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs /proc/self/clear_refs (Linux)")
def test_upload_memory_benchmark(tmp_path):
    """Both ways run in their own process on the same request and print their peak memory."""
    out = _run("benchmarks/upload_memory.py", "--images", "2", "--megapixels", "0.5",
               "--checkpoints", str(tmp_path / "none"))
    rows = [line.split(" |")[0] for line in out.splitlines() if line.startswith("| held") or line.startswith("| prepared")]
    assert rows == ["| held", "| prepared"] and "prepared / held, peak above before: " in out
