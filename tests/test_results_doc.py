"""docs/results.md's table of fair-recipe runs says what the runs' own records say.

Its numbers are copied from ``lgam table4``'s output by hand, one run at a time as the runs come
in; this test reads each row against ``checkpoints/runs/MODEL/seedK/metrics.json`` and fails on a
mistyped number, a row left out or a row for a run that is not there."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "checkpoints" / "runs"
SIZES = (128, 160, 192, 224)
# | model | seed | val 128 / **160** / 192 / 224 | held-out 128 / 160 / 192 / 224 | minutes |
ROW = re.compile(r"^\| (resnet18\w*) \| (\d+) \| ([^|]+) \| ([^|]+) \| [^|]+ \|$")


def _rows(text: str) -> dict[tuple[str, int], tuple[list[str], list[str]]]:
    start = text.index("Fair-recipe runs in so far")
    rows = {}
    for line in text[start:].splitlines():
        m = ROW.match(line)
        if m:
            key = (m[1], int(m[2]))
            assert key not in rows, f"two rows for {key}"
            rows[key] = ([v.strip(" *") for v in m[3].split(" / ")], [v.strip() for v in m[4].split(" / ")])
        elif rows and not line.startswith("|"):
            break  # the table has ended
    return rows


def _runs() -> dict[tuple[str, int], dict]:
    """Every run of Table 4 (``seedK``; the schedule test's ``seedK-Nep`` are not in this table)."""
    return {(p.parent.parent.name, int(p.parent.name[4:])): json.loads(p.read_text())
            for p in RUNS.glob("*/seed*/metrics.json") if re.fullmatch(r"seed\d+", p.parent.name)}


def test_rows_are_the_runs_records():
    rows, runs = _rows((ROOT / "docs" / "results.md").read_text()), _runs()
    if not runs:
        pytest.skip(f"no runs under {RUNS}")
    assert sorted(rows) == sorted(runs), "results.md's fair-run table and checkpoints/runs/ list other runs"
    for key, (val, held_out) in rows.items():
        metrics = runs[key]
        assert val == [f"{metrics[f'val_top1_err_{s}']:.2f}" for s in SIZES], key
        assert held_out == [f"{metrics[f'holdout_top1_err_{s}']:.2f}" for s in SIZES], key


def test_row_reader_reads_the_bold_size_and_stops_at_the_table_end():
    text = ("Fair-recipe runs in so far:\n\n| model | seed | val | held-out | min |\n|---|---:|---|---|---:|\n"
            "| resnet18 | 0 | 23.59 / **21.68** / 22.75 / 28.69 | 23.60 / 21.40 / 22.50 / 29.40 | 57 |\n"
            "| resnet18_se | 1 | 1.00 / **2.00** / 3.00 / 4.00 | 5.00 / 6.00 / 7.00 / 8.00 | ~66 ⁵ |\n\n"
            "| resnet18 | 2 | 1.00 / 2.00 / 3.00 / 4.00 | 5.00 / 6.00 / 7.00 / 8.00 | 1 |\n")
    assert _rows(text) == {("resnet18", 0): (["23.59", "21.68", "22.75", "28.69"], ["23.60", "21.40", "22.50", "29.40"]),
                           ("resnet18_se", 1): (["1.00", "2.00", "3.00", "4.00"], ["5.00", "6.00", "7.00", "8.00"])}
