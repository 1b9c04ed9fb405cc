"""Server-side time per app request (one image, six models, Grad-CAM): the engine vs a naive loop.

Per request and device, in the same run:

- ``engine float32``: :meth:`lgam.engine.CamEngine.compare` - preprocess once, one forward per
  model, the fast no-backward Grad-CAM, probabilities, top-5 - in float32;
- ``engine bf16``: the same under bf16 autocast on channels_last copies (the app's default where
  the device has native bf16);
- ``engine ... + gates``: the app's engine, also capturing every attention module's gate (the
  gates view's cost, from the same forward);
- ``page``: what the page's handler does per request with the app's engine: read the upload,
  the engine, the overlays and the HTML grid of JPEG tiles (:func:`app.ui.run_page`); again with
  the view showing Grad-CAM and the gates (twice the tiles);
- ``/compare round trip``: a ``gradio_client`` call with just the image to ``python -m app``
  running in its own process, as deployed (upload, queue, engine, the tiles as JPEG data URLs in
  the JSON answer), the user's wait: with gradio_client as it comes, and with one TLS context
  passed for all its requests (``ssl_verify=ssl.create_default_context(...)``, as the README's
  example does: by default it builds one, loading the CA bundle, for every HTTP request);
- ``naive``: preprocess once, then per model a new pytorch-grad-cam ``GradCAM(model,
  [model.cam_target_layer()])`` in ``with``, called with the model's own top-1 (forward + backward), plus
  the softmax - the usual tutorial loop.

Models come from ``--checkpoints`` when it holds all six, else are freshly initialised at
``--size`` (timing does not depend on the weights); every path runs at the models' input size.
The paths run interleaved (round after round, one call of each, the order rotated), so the
speed-ups are ratios of times measured together. Prints the command, the machine, the threads and
a Markdown table (median and p90 over ``--reps``).

    python benchmarks/app_latency.py [--reps 30] [--devices cpu cuda] [--size 160] [--threads N]
                                     [--engine-only]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the app/ folder (not installed)

import lgam  # noqa: E402
from lgam.checkpoints import load_manifest, save_checkpoint  # noqa: E402
from lgam.device import cpu_name  # noqa: E402
from lgam.engine import CamEngine  # noqa: E402
from lgam.models import FIGURE5_MODELS  # noqa: E402


def _image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1)
    arr = np.clip(arr + rng.integers(-30, 30, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _checkpoints(checkpoints: str | None, size: int, tmp: str) -> Path:
    """``checkpoints`` when it holds all six models, else a folder of freshly initialised ones
    (timing does not depend on the weights)."""
    if checkpoints and (Path(checkpoints) / "manifest.json").is_file():
        if all(n in load_manifest(checkpoints)["models"] for n in FIGURE5_MODELS):
            return Path(checkpoints)
    out = Path(tmp) / "fresh_checkpoints"
    classes = [f"class_{i}" for i in range(20)]
    for name in FIGURE5_MODELS:
        save_checkpoint(lgam.create_model(name, num_classes=20), out, name, classes=classes,
                        input_size=size)
    return out


@contextmanager
def _server(checkpoints: Path, device: str, precision: str, threads: int | None):
    """``python -m app`` in its own process, as deployed (the client is another process; with
    ``threads``, its ``OMP_NUM_THREADS``); yields ``{client: function that calls /compare with
    just the image}`` for gradio_client as it comes and with one TLS context for all its requests
    (as the README's example; by default it builds a context, loading the CA bundle, per HTTP
    request, even for http://)."""
    import ssl

    import certifi
    from gradio_client import Client, handle_file

    from app.server import app_process

    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with app_process(["--checkpoints", str(checkpoints), "--device", device,
                      "--precision", precision], env=env) as (_, url):
        clients = {"gradio_client": Client(url, verbose=False),
                   "gradio_client, one TLS context": Client(
                       url, verbose=False, ssl_verify=ssl.create_default_context(cafile=certifi.where()))}
        yield {k: (lambda path, c=c: c.predict(handle_file(path), api_name="/compare"))
               for k, c in clients.items()}


def _naive(engine: CamEngine, image: Image.Image, size: int) -> None:
    from pytorch_grad_cam import GradCAM

    x = engine.preprocess([image], size)
    for name in engine.available:
        model = engine.model(name)
        with GradCAM(model=model, target_layers=[model.cam_target_layer()]) as cam:
            xin = x.clone().requires_grad_(True)
            grayscale = cam(input_tensor=xin, targets=None)  # own top-1
            probs = torch.softmax(cam.outputs.detach(), 1).cpu().numpy()
            top = np.argsort(-probs[0])[:5]
            _ = grayscale[0], top


def _time_interleaved(paths: dict[str, object], reps: dict[str, int], sync) -> dict[str, list[float]]:
    """Each path's times in ms, the paths interleaved: two warm-up calls each (kernel selection,
    allocator), then round after round, one call of every path that still has reps to do, the
    order rotated each round, so a slow stretch of a shared machine falls on all paths alike and
    their ratios are measured at the same time."""
    for fn in paths.values():
        fn()
        fn()
    out: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for r in range(max(reps.values())):
        for k in names[r % len(names):] + names[:r % len(names)]:
            if len(out[k]) < reps[k]:
                sync()
                t = time.perf_counter()
                paths[k]()
                sync()
                out[k].append((time.perf_counter() - t) * 1e3)
    return out


def _fmt(ts: list[float]) -> tuple[float, float]:
    ts = sorted(ts)
    return statistics.median(ts), ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))]


def machine() -> str:
    s = f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        s += f", GPU {torch.cuda.get_device_name(0)}"
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--devices", nargs="+", default=None,
                   help="default: cpu, plus cuda when available")
    p.add_argument("--size", type=int, default=160,
                   help="input size of freshly initialised models (checkpoints bring their own)")
    p.add_argument("--image-size", type=int, default=480, help="side of the request's image")
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, here and in the app's server (its OMP_NUM_THREADS)")
    p.add_argument("--naive-reps", type=int, default=None, help="default: --reps")
    p.add_argument("--no-round-trip", action="store_true", help="skip the gradio_client call")
    p.add_argument("--engine-only", action="store_true",
                   help="the library's rows alone (engine, naive): no page or server, no gradio")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    _check_imports(args)
    image = _image(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "request.jpg")
        image.save(path, quality=92)
        checkpoints = _checkpoints(args.checkpoints, args.size, tmp)
        shipped = "shipped" if checkpoints == Path(args.checkpoints) else "freshly initialised"
        server = ("" if args.no_round_trip or args.engine_only else
                  f"the app's server: {args.threads or os.environ.get('OMP_NUM_THREADS') or 'its own'} threads; ")
        print(f"# App request latency: 1 image ({args.image_size}x{args.image_size}), six models "
              f"({shipped}, {checkpoints}), Grad-CAM\n\n`{' '.join(sys.argv)}`\n\nMachine: {machine()}; "
              f"{server}paths interleaved, {args.reps} reps ({args.naive_reps or args.reps} naive)\n")
        print("| device | path | median ms | p90 ms | speed-up vs naive |\n|---|---|---:|---:|---:|")
        for dev in devices:
            _device_rows(dev, args, image, path, checkpoints)


def _check_imports(args: argparse.Namespace) -> None:
    """Fail at once, not after minutes of timing, where a path's packages are missing: the page
    needs gradio (the app), the round trip gradio_client and certifi (the test extra)."""
    needed = [] if args.engine_only else ["gradio"] + ([] if args.no_round_trip else ["gradio_client", "certifi"])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: pip install -r requirements-test.txt, or pass "
                         "--engine-only (no page, no server) / --no-round-trip")


def _page_paths(engine: CamEngine, path: str) -> dict[str, object]:
    from app.ui import run_page

    return {f"page ({engine.precision})": lambda: run_page(engine, path),
            f"page, Grad-CAM + gates ({engine.precision})": lambda: run_page(engine, path, view="both")}


def _device_rows(dev: str, args: argparse.Namespace, image: Image.Image, path: str,
                 checkpoints: Path) -> None:
    sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)
    fp32 = CamEngine.from_checkpoints(checkpoints, device=dev, precision="float32")
    auto = CamEngine.from_checkpoints(checkpoints, device=dev, precision="auto")
    size = fp32.input_size(fp32.available[0])
    naive = f"naive (pytorch-grad-cam, float32, {size} px)"
    paths = {"engine float32": lambda: fp32.compare(image)}
    if auto.precision == "bf16":
        paths["engine bf16"] = lambda: auto.compare(image)
    paths[f"engine {auto.precision} + gates"] = lambda: auto.compare(image, gates=True)
    if not args.engine_only:
        paths.update(_page_paths(auto, path))
    with contextlib.ExitStack() as stack:
        if not (args.no_round_trip or args.engine_only):
            calls = stack.enter_context(_server(checkpoints, dev, "auto", args.threads))
            for k, call in calls.items():
                paths[f"/compare round trip ({auto.precision}), {k}, just the image"] = \
                    lambda call=call: call(path)
        paths[naive] = lambda: _naive(fp32, image, size)
        reps = {k: args.reps for k in paths} | {naive: args.naive_reps or args.reps}
        times = _time_interleaved(paths, reps, sync)
    base = _fmt(times[naive])[0]
    for name, ts in times.items():
        med, p90 = _fmt(ts)
        print(f"| {dev} | {name} | {med:.2f} | {p90:.2f} | {base / med:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
