"""Reading results.csv files of bench_batchless.py."""

from __future__ import annotations


def preferred_timing(rows) -> list[dict]:
    """The rows of one timing: the CUDA-graph replays (device time) where the file has timings of
    them, else the eager calls. Files written before the timing column hold eager timings only."""
    graphs = any(r.get("timing") == "cuda-graph" and r.get("median_ms") not in (None, "") for r in rows)
    timing = "cuda-graph" if graphs else "eager"
    return [r for r in rows if (r.get("timing") or "eager") == timing]
