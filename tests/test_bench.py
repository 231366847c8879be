"""The benchmark's hygiene (bench/bench_batchless.py): a run writes into a fresh untracked folder and
says where, the committed reference results change only on request, and unreliable cases are marked."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_batchless  # noqa: E402

TINY = ["--device", "cpu", "--shapes", "4x3x2x2", "--dtypes", "float32", "--layouts", "contiguous",
        "--budget", "0.01", "--default-allocator"]


def test_a_run_writes_a_fresh_run_folder_not_the_reference(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_batchless, "BENCH_DIR", tmp_path)
    bench_batchless.main(TINY)
    runs = list((tmp_path / "runs").glob("*/*/results.csv"))
    assert len(runs) == 1 and not (tmp_path / "results").exists()
    out = capsys.readouterr().out
    assert f"results will be written to {runs[0].parent}" in out and f"results in {runs[0].parent}" in out
    with runs[0].open() as f:
        rows = list(csv.DictReader(f))
    assert rows and "unreliable" in rows[0]
    assert (runs[0].parent / "summary.md").read_text().count("| unreliable |") == 1

    bench_batchless.main([*TINY, "--update-reference"])
    assert len(list((tmp_path / "results").glob("*/results.csv"))) == 1


@pytest.mark.parametrize("load, fracs, expected", [
    (0.0, [0.5, 0.9], ""),
    (0.6, [0.5], "other load 0.60 cores"),
    (0.1, [0.5, 1.3], "130% of the copy bandwidth: the copy was slowed"),
    (0.3, [1.2], "other load 0.30 cores; 120% of the copy bandwidth: the copy was slowed"),
])
def test_unreliable_reason(load, fracs, expected):
    rows = [{"other_load": load, "frac_of_copy": f} for f in fracs]
    assert bench_batchless.unreliable_reason(rows) == expected
