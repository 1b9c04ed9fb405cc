"""Command-line flags, engine construction and ``launch`` for the app (which prints a one-line
startup summary: models loaded, device, precision)."""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gradio as gr

from lgam.cli import HelpFormatter
from lgam.device import device_summary
from lgam.engine import PRECISIONS, CamEngine
from lgam.errors import LgamError
from lgam.imageio import MAX_BYTES, MAX_PIXELS

from .ui import build_app, default_examples

__all__ = ["parse_args", "build_engine", "create_app", "launch", "main", "startup_summary", "free_port",
           "wait_until_serving", "app_process", "limit_malloc_arenas", "cpu_quota",
           "limit_threads_to_cpu_quota"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m app",
        description="LGAM Figure 5, live: input + Grad-CAM of six ResNet18 variants (Gradio app).",
        formatter_class=HelpFormatter)
    p.add_argument("--checkpoints", default=os.environ.get("LGAM_CHECKPOINTS", "checkpoints"),
                   help="folder with manifest.json and the six models (default: %(default)s)")
    p.add_argument("--device", default=os.environ.get("LGAM_DEVICE", "auto"),
                   help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=PRECISIONS,
                   default=os.environ.get("LGAM_PRECISION", "auto"),
                   help="auto: bf16 where the device has native bf16 (GPUs of compute capability 8.0+, "
                        "AVX512-BF16/AMX CPUs), "
                        "else float32; float32: exactly what `lgam evaluate` computes")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (0.0.0.0 in Docker/Spaces)")
    p.add_argument("--port", type=int, default=os.environ.get("GRADIO_SERVER_PORT", "7860"),
                   help="port to listen on (default: GRADIO_SERVER_PORT, else 7860)")
    p.add_argument("--examples", default=None, help="folder of extra example images")
    p.add_argument("--max-mb", type=_above_zero(float), default=MAX_BYTES / 2**20,
                   help="largest accepted upload in MiB (default: %(default)s)")
    p.add_argument("--max-megapixels", type=_above_zero(float), default=MAX_PIXELS / 1e6,
                   help="largest accepted image in megapixels (default: %(default)s)")
    p.add_argument("--concurrency", type=_above_zero(int), default=4,
                   help="requests served at once (default: %(default)s)")
    return p.parse_args(argv)


def _above_zero(kind: type) -> Callable[[str], Any]:
    """An argparse ``type``: a finite number of ``kind`` above 0 (``--concurrency 0`` queued every
    request forever: Gradio starts an event only while fewer than the limit run)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def startup_summary(engine: CamEngine) -> str:
    """One line for the server log: how many models loaded (and which did not), the device and
    the precision the models run in."""
    loaded = f"{len(engine.available)}/{len(engine.names)} models loaded"
    if engine.unavailable:
        loaded += " (unavailable: " + ", ".join(engine.label(n) for n in engine.unavailable) + ")"
    return (f"lgam app: {loaded} · device {device_summary(engine.device)} · "
            f"precision {engine.precision}")


def build_engine(args: argparse.Namespace) -> CamEngine:
    """The engine ``args`` ask for: their checkpoints, device and precision."""
    return CamEngine.from_checkpoints(args.checkpoints, device=args.device, precision=args.precision)


def create_app(args: argparse.Namespace, engine: CamEngine | None = None) -> tuple[gr.Blocks, dict]:
    """``(blocks, launch_kwargs)`` for ``args`` (``engine`` defaults to :func:`build_engine`'s)."""
    engine = engine or build_engine(args)
    engine.warmup()
    examples = default_examples(args.examples)
    max_bytes = int(args.max_mb * 2**20)
    demo = build_app(engine, examples, max_bytes=max_bytes,
                     max_pixels=int(args.max_megapixels * 1e6),
                     concurrency_limit=args.concurrency)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    # only the examples' folders: Gradio serves its own outputs (the export) without this, and a
    # folder listed here is served to anyone who names a file in it, uploads included, inline
    allowed = sorted({str(Path(e).parent) for paths in examples.values() for e in paths})
    kwargs = dict(server_name=args.host, server_port=args.port, allowed_paths=allowed,
                  # Gradio's own cap is looser, so that lgam.imageio gives the clear message
                  max_file_size=2 * max_bytes + 1024 * 1024, show_error=True,
                  theme=gr.themes.Soft())
    return demo, kwargs


def launch(args: argparse.Namespace, engine: CamEngine | None = None, **overrides) -> gr.Blocks:
    """Build, print :func:`startup_summary` and launch; ``overrides`` go to ``Blocks.launch``
    (e.g. ``prevent_thread_lock``)."""
    engine = engine or build_engine(args)
    demo, kwargs = create_app(args, engine)
    print(startup_summary(engine), flush=True)
    kwargs.update(overrides)
    demo.launch(**kwargs)
    return demo


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas at ``n`` for this process; ``True`` if the cap was set.

    glibc gives threads that meet contention their own heaps, up to 8 per core, and keeps what
    they free: under 16 concurrent clients the server's RSS grew 18 % (1.50 → 1.78 GB) over 176
    requests and kept it; with two arenas it stays within 2 % at the same speed
    (``tests/test_app.py``, sixteen clients).
    A ``MALLOC_ARENA_MAX`` set by whoever starts the app wins; other C libraries are left alone.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(-8, n) == 1  # -8: M_ARENA_MAX in glibc's malloc.h; mallopt returns 1 on success


def cpu_quota(cgroup: str | Path = "/sys/fs/cgroup") -> int | None:
    """The CPUs a cgroup-v2 quota allows this process (``cpu.max``: ``"200000 100000"`` -> 2,
    rounded up), or ``None`` without a quota (``"max ..."``) or a readable file."""
    try:
        quota, period = (Path(cgroup) / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def limit_threads_to_cpu_quota(cgroup: str | Path = "/sys/fs/cgroup") -> int | None:
    """Size torch's thread pool to the container's CPU quota; returns the threads set, or ``None``.

    torch counts the host's cores, not a cgroup quota: under ``docker run --cpus=2`` (or a 2-vCPU
    Space) on a 64-core host it would run 32 threads on two CPUs' time, and the requests served
    at once multiply them. An ``OMP_NUM_THREADS`` set by whoever starts the app wins.
    """
    n = cpu_quota(cgroup)
    if os.environ.get("OMP_NUM_THREADS") or n is None:
        return None
    import torch

    if n < torch.get_num_threads():
        torch.set_num_threads(n)
        return n
    return None


def main(argv: Sequence[str] | None = None) -> int:
    limit_malloc_arenas()
    limit_threads_to_cpu_quota()
    args = parse_args(argv)
    try:
        launch(args)
    except LgamError as e:  # e.g. --device cuda without a GPU
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    """Return once ``url`` answers; ``RuntimeError`` if ``proc`` exits first or time runs out."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited (code {proc.returncode}) before serving {url}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout_s:.0f} s")


@contextmanager
def app_process(argv: Sequence[str], **popen) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python -m app ARGV --host 127.0.0.1 --port <free>`` in its own process, as deployed
    (for tests and benchmarks): yields the process and its URL once it answers; terminated on
    exit. ``popen``: extra :class:`subprocess.Popen` arguments (default: output discarded)."""
    port = free_port()
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    proc = subprocess.Popen([sys.executable, "-m", "app", *argv, "--host", "127.0.0.1",
                             "--port", str(port)], cwd=Path(__file__).resolve().parents[1], **popen)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, proc)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
