"""The app server's memory under many users: ``python -m app`` in its own process, ``--clients``
gradio_client users sending the same photo to ``/compare`` at once, ``--rounds`` times in
lock-step; the server's resident memory (RSS, from ``/proc``) after each round.

A leak grows with every request; glibc's per-thread heaps grew too (+6 % from the first three
rounds to the last three before the app capped them, ``app.server.limit_malloc_arenas``). After the
first round (threads started, caches filled) the RSS should stay flat within the noise of a
shared machine (±2 % from round to round measured on the development VM): the script prints the
trace and the growth from the mean of rounds 1-3 to the mean of the last three. A number for a
person to read: a busy machine moves it, so no test holds it to a threshold
(``tests/test_app.py`` checks that every answer is complete and equal).

    python benchmarks/app_memory.py [--checkpoints checkpoints] [--clients 16] [--rounds 11]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app_latency import _checkpoints, machine  # noqa: E402  (benchmarks/ is the script's folder)


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux ``/proc``)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(checkpoints: Path, clients: int, rounds: int, photo: Path) -> list[float]:
    """The server's RSS before the first round and after each round."""
    from gradio_client import Client, handle_file

    from app.server import app_process

    with app_process(["--checkpoints", str(checkpoints), "--device", "cpu",
                      "--precision", "float32"]) as (proc, url):
        users = [Client(url, verbose=False) for _ in range(clients)]
        trace = [rss_mb(proc.pid)]
        for _ in range(rounds):
            errors: list[BaseException] = []

            def call(c):
                try:
                    c.predict(handle_file(str(photo)), api_name="/compare")
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=call, args=(c,)) for c in users]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise SystemExit(f"a request failed: {errors[0]!r}")
            trace.append(rss_mb(proc.pid))
    return trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--size", type=int, default=160, help="input size of fresh models (no checkpoints)")
    args = p.parse_args(argv)
    if args.rounds < 4:
        raise SystemExit("--rounds must be at least 4 (growth compares rounds 1-3 with the last three)")
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "photo.jpg"
        Image.effect_mandelbrot((320, 240), (-2, -1.2, 1, 1.2), 100).convert("RGB").save(photo)
        trace = measure(_checkpoints(args.checkpoints, args.size, tmp), args.clients, args.rounds, photo)
    growth = statistics.fmean(trace[-3:]) / statistics.fmean(trace[1:4]) - 1
    print(f"{machine()}; {args.clients} clients x {args.rounds} rounds of /compare")
    print("server RSS (MiB): " + " → ".join(f"{m:.0f}" for m in trace))
    print(f"growth, rounds 1-3 to the last three: {100 * growth:+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
