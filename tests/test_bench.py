"""The benchmark's hygiene (bench/bench_batchless.py): a run writes into a fresh untracked folder and
says where, the committed reference results change only on request, and unreliable cases are marked."""

from __future__ import annotations

import csv
import re
import subprocess
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
    # The CPU kernels' ISA is recorded and names the folder: an AVX2 build's numbers never overwrite an AVX-512's.
    isa = bench_batchless.cpu_isa()
    assert {row["cpu_isa"] for row in rows} == {isa}
    if isa:
        assert f"-{isa.lower().replace('_', '-')}-" in runs[0].parent.parent.name
    summary = (runs[0].parent / "summary.md").read_text()
    assert summary.count("| unreliable |") == 1
    inference = summary.split("## Inference (no_grad)")[1]  # its own table: a header and a row per case
    assert inference.count("| 4x3x2x2 | float32 | contiguous |") == 1 and inference.count("\n|---") == 1

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


def test_the_ceiling_is_the_faster_copy_of_each_timing():
    rows = [{"impl": "copy", "pass": "copy", "timing": "eager", "gbps": 40.0},
            {"impl": "alloc+copy", "pass": "copy", "timing": "eager", "gbps": 70.0},
            {"impl": "copy", "pass": "copy", "timing": "cuda-graph", "gbps": 3000.0},
            {"impl": "alloc+copy", "pass": "copy", "timing": "cuda-graph", "error": "RuntimeError"},
            {"impl": "batchless-cpu", "pass": "fwd", "timing": "eager", "gbps": 90.0}]
    assert bench_batchless.copy_ceilings(rows) == {"eager": 70.0, "cuda-graph": 3000.0}
    assert bench_batchless.copy_ceilings(rows[:1]) == {"eager": 40.0}


def test_preferred_timing_takes_graph_replays_only_where_they_were_timed():
    from _results import preferred_timing

    eager = {"timing": "eager", "median_ms": "1.0"}
    graph = {"timing": "cuda-graph", "median_ms": "0.5"}
    failed_graph = {"timing": "cuda-graph", "median_ms": "", "error": "RuntimeError: capture"}
    old = {"median_ms": "2.0"}  # a file written before the timing column
    assert preferred_timing([eager, graph]) == [graph]
    assert preferred_timing([eager, failed_graph]) == [eager]
    assert preferred_timing([old]) == [old]


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(SystemExit, match="--cuda-graphs"):
        bench_batchless.main([*TINY, "--cuda-graphs"])


def test_ncu_summary_tabulates_one_row_per_launch(tmp_path, capsys):
    import ncu_summary

    header = '"ID","Kernel Name","Grid Size","Block Size","Metric Name","Metric Unit","Metric Value"\n'
    rows = [
        ('1', "void batchless_kernels::<unnamed>::reduce_partials_kernel<float>(const float *)", "Duration", "ns", "3,072"),
        ('0', "void batchless_kernels::<unnamed>::channels_first_kernel<ForwardOp<c10::BFloat16, 1>, 8, 1>(int)",
         "Duration", "ns", "96,320"),
        ('0', "void batchless_kernels::<unnamed>::channels_first_kernel<ForwardOp<c10::BFloat16, 1>, 8, 1>(int)",
         "DRAM Throughput", "%", "40.23"),
        ('0', "void batchless_kernels::<unnamed>::channels_first_kernel<ForwardOp<c10::BFloat16, 1>, 8, 1>(int)",
         "Block Limit Registers", "block", "3"),  # a metric the table leaves out
    ]
    text = "==PROF== Connected to process 1\n" + header + "".join(
        f'"{i}","{name}","(1664, 1, 1)","(256, 1, 1)","{metric}","{unit}","{value}"\n'
        for i, name, metric, unit, value in rows)
    path = tmp_path / "ncu.csv"
    path.write_text(text)
    launches = ncu_summary.kernels(path)
    assert [k["name"] for k in launches] == ["channels_first_kernel<ForwardOp<BFloat16, 1>, 8, 1>",
                                             "reduce_partials_kernel<float>"]
    assert launches[0]["duration"] == "96,320 ns" and launches[0]["DRAM %"] == "40.23 %"
    ncu_summary.main([str(path)])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 2 and table[2].startswith("| 0 | channels_first_kernel")


@pytest.mark.parametrize("script, argv, match", [
    ("bench_batchless", ["--shapes", "0x3"], "argument --shapes: '0x3' is not a shape"),
    ("bench_batchless", ["--shapes", "abc"], "argument --shapes: 'abc' is not a shape"),
    ("bench_batchless", ["--shapes", "4"], "argument --shapes: '4' is not a shape"),
    ("bench_batchless", ["--budget", "-1"], "argument --budget: '-1' is not a positive float"),
    ("bench_stages", ["--dtypes", "int8"], "argument --dtypes: each one of"),
    ("bench_stages", ["--shapes", "0x3"], "argument --shapes: '0x3' is not a shape"),
    ("bench_stages", ["--calls", "0"], "argument --calls: '0' is not a positive int"),
    ("bench_stages", ["--repeats", "-1"], "argument --repeats: '-1' is not a positive int"),
    # _allocator.py re-executes unless --default-allocator is spelled out: an abbreviation ran with the
    # tuned allocator the option turns off
    ("bench_batchless", ["--default-alloc"], "unrecognized arguments: --default-alloc"),
    ("bench_models", ["--default-alloc"], "unrecognized arguments: --default-alloc"),
    # ran: a StatisticsError recorded as a failed case, duplicate micro-batch series, 0 images/s
    ("bench_models", ["--min-steps", "0"], "argument --min-steps: '0' is not a positive int"),
    ("bench_models", ["--micro-batch", "0"], "argument --micro-batch: '0' is not a positive int"),
    ("bench_models", ["--batch-size", "0"], "argument --batch-size: '0' is not a positive int"),
    ("bench_models", ["--memory-batches", "0"], "argument --memory-batches: '0' is not a positive int"),
])
def test_bad_arguments_are_usage_errors(script, argv, match, capsys):
    """A shape of 0 raised ZeroDivisionError mid-run, --budget -1 and --calls 0 ran and wrote nonsense."""
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_info:
        (module.main if script == "bench_stages" else module.parse_args)(["--device", "cpu", *argv])
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize("script, argv, match", [
    # measured nothing, wrote a header-only results.csv and exited 0 (with --update-reference: over the reference)
    ("bench_batchless", ["--shapes", "32x256", "--layouts", "channels_last"], "no case to measure"),
    ("bench_batchless", ["--update-reference", "--out", "/tmp/x"], "it takes no --out"),
    ("bench_models", ["--variants", "batchles"], "--variants: unknown or unavailable here: ['batchles']"),
])
def test_runs_that_would_measure_nothing_are_refused(script, argv, match, tmp_path, monkeypatch):
    module = __import__(script)
    monkeypatch.setattr(module, "BENCH_DIR", tmp_path)
    with pytest.raises(SystemExit, match=re.escape(match)):
        module.main(["--device", "cpu", *argv])
    assert not list(tmp_path.rglob("results.csv"))


def test_busy_seconds_count_the_children_as_our_own():
    """torch.compile's compiler processes counted as other load, and marked compiled rows unreliable."""
    before = bench_batchless.busy_seconds()
    if before is None:
        pytest.skip("no /proc/stat")
    subprocess.run([sys.executable, "-c", "sum(range(3 * 10 ** 7))"], check=True)
    after = bench_batchless.busy_seconds()
    assert after[1] - before[1] > 0.2
