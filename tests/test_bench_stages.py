"""The per-stage benchmark (bench/bench_stages.py) runs on the CPU (eager timings, no CUDA graphs)
and writes one CSV row per (case, stage) with positive times, and its markdown table."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_stages  # noqa: E402


def test_dry_run_on_cpu_writes_every_stage(tmp_path, capsys):
    bench_stages.main(["--device", "cpu", "--shapes", "4x3x5x5", "--dtypes", "float32",
                       "--layouts", "contiguous,channels_last", "--repeats", "3", "--calls", "2",
                       "--out", str(tmp_path)])
    with (tmp_path / "stages.csv").open() as f:
        rows = list(csv.DictReader(f))
    cases = {(r["shape"], r["dtype"], r["layout"]) for r in rows}
    assert cases == {("4x3x5x5", "float32", "contiguous"), ("4x3x5x5", "float32", "channels_last")}
    for case in cases:
        stages = [r["stage"] for r in rows if (r["shape"], r["dtype"], r["layout"]) == case]
        assert stages == list(bench_stages.STAGES)
    for r in rows:
        assert not r["error"], r["error"]
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]) and float(r["median_ms"]) > 0
        assert float(r["gbps"]) > 0 and float(r["frac_of_copy"]) > 0 and r["calls_per_graph"] == "2"
    assert {r["bytes"] for r in rows if r["stage"] == "bwd_all"} == {str(3 * 4 * 3 * 5 * 5 * 4)}
    table = (tmp_path / "stages.md").read_text()
    assert all(name in table for name in bench_stages.DERIVED)
    assert table.count("| 4x3x5x5 | float32 |") == 2
    assert "us/call" in capsys.readouterr().out
