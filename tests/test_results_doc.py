"""docs/results.md's table of fair-recipe runs, docs/results/table4.md and the README's Table 4
say what the runs' own records say.

results.md's rows are copied from ``lgam table4``'s output by hand, one run at a time as the runs
come in; each is read against ``checkpoints/runs/MODEL/seedK/metrics.json``, so a mistyped number,
a row left out or a row for a run that is not there fails. table4.md is ``lgam table4``'s own
output: it must be regenerated with every run committed, and its summary pasted into the README."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from _helpers import SHARED_DATA

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


def test_table4_doc_is_what_lgam_table4_writes_from_the_runs(tmp_path):
    """docs/results/table4.md is regenerated after each run; a run committed without it fails."""
    from lgam.cli import main

    if not _runs():
        pytest.skip(f"no runs under {RUNS}")
    out, doc = tmp_path / "table4.md", (ROOT / "docs" / "results" / "table4.md").read_text()
    data = SHARED_DATA / "imagenet20"
    by_source = ["--by", "source", "--data", str(data)] if (data / "classes.tsv").exists() else []
    schedules = _schedules(RUNS)
    assert len(schedules) <= 1, f"lgam table4 compares one other schedule length; runs have {schedules}"
    schedule = [arg for n in schedules for arg in ("--schedule", str(n))]
    assert main(["table4", str(RUNS), "--out", str(out), *by_source, *schedule]) == 0
    assert out.read_text() == (doc if by_source else _without_by_section(doc)), "regenerate: " + " ".join(
        ["lgam table4 checkpoints/runs --by source --data ../shared/data/imagenet20", *schedule,
         "--out docs/results/table4.md --figure docs/table4.png --checkpoints checkpoints"])


def _schedules(runs: Path) -> list[int]:
    """The other schedule lengths committed runs were trained for (their ``seedK-Nep`` folders)."""
    return sorted({int(m[1]) for p in runs.glob("*/seed*/metrics.json")
                   if (m := re.fullmatch(r"seed\d+-(\d+)ep", p.parent.name))})


def test_schedules_are_read_from_the_seed_folders(tmp_path):
    for folder in ("resnet18/seed0", "resnet18/seed0-40ep", "resnet18_lgam/seed1-40ep", "resnet18/seed1-x"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "metrics.json").write_text("{}")
    (tmp_path / "resnet18" / "seed1-60ep").mkdir()  # no metrics.json: not a run yet
    assert _schedules(tmp_path) == [40]


def _without_by_section(doc: str) -> str:
    """table4.md less its ``--by`` sections, the table's and the schedule test's (what ``lgam table4``
    writes without the data)."""
    start = doc.find("\nBy source")
    assert start >= 0, "docs/results/table4.md has no --by source section: regenerate it with the data"
    end = doc.find("\nSchedule test:", start)
    doc = doc[:start] + ("" if end < 0 else doc[end:])
    return re.split(r"\nThe \d+-epoch runs by source", doc)[0]


def _summary_table(text: str) -> list[str]:
    """The lines of the first Markdown table whose header starts ``| model | paper Table 4``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | paper Table 4"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_readme_table4_is_table4_docs_summary():
    """The README shows lgam table4's summary as it is: paste it again with every run committed."""
    readme = _summary_table((ROOT / "README.md").read_text())
    assert readme == _summary_table((ROOT / "docs" / "results" / "table4.md").read_text())
    assert len(readme) == 2 + 6  # header, rule, the six models
