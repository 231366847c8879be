"""Derives batchless_kernels/gpu_choice.json (which GPU backend `auto` runs) from benchmark results.

    python bench/derive_gpu_choice.py bench/results/<gpu>/results.csv [...] [--out PATH]

For every GPU in the files and every case key of gpu_choice.case_key (kernel layout, dtype, size
class), the rule is: the backend with the smaller geometric mean of forward+backward medians over
the shapes measured with both backends, timed as CUDA-graph replays (the kernels' device time; a
model's other layers hide the host's launch gaps) where the files have them for that GPU. The JSON
keeps the medians it came from, so the README can show the data behind the choice; an existing --out
keeps its entries for the GPUs these files do not measure. bench/run.sh runs this after a GPU
benchmark.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batchless_kernels import gpu_choice  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from _results import preferred_timing  # noqa: E402

IMPLS = {f"batchless-{name}": name for name in gpu_choice.GPU_BACKENDS}


def derive(rows) -> dict:
    """{"devices": {gpu: {key: backend}}, "evidence": {gpu: {key: {backend: [[shape, ms]...]}}}}."""
    # (gpu, key, shape, layout) -> backend -> median ms
    times: dict = defaultdict(dict)
    by_device: dict = defaultdict(list)
    for row in rows:
        by_device[row.get("device_name")].append(row)
    # The timing per GPU: a file of eager timings alone is not dropped for another GPU's graph replays.
    for row in (r for device_rows in by_device.values() for r in preferred_timing(device_rows)):
        backend = IMPLS.get(row.get("impl", ""))
        if backend is None or row.get("pass") != "fwd+bwd" or not row.get("median_ms"):
            continue
        shape = tuple(int(s) for s in row["shape"].split("x"))
        key = gpu_choice.case_key(shape, row["dtype"], row["layout"] == "contiguous")
        times[(row["device_name"], key, row["shape"], row["layout"])][backend] = float(row["median_ms"])
    evidence: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for (gpu, key, shape, layout), by_backend in times.items():
        if len(by_backend) == len(gpu_choice.GPU_BACKENDS):  # only shapes measured with both
            for backend, ms in by_backend.items():
                evidence[gpu][key][backend].append([f"{shape} {layout}", ms])
    devices = {}
    for gpu, keys in evidence.items():
        devices[gpu] = {}
        for key, by_backend in sorted(keys.items()):
            geomean = {b: math.exp(sum(math.log(ms) for _, ms in v) / len(v)) for b, v in by_backend.items()}
            devices[gpu][key] = min(geomean, key=geomean.get)
    return {"rule": "smaller geometric mean of fwd+bwd medians (CUDA-graph replays where measured) per (layout, dtype, size)",
            "devices": devices, "evidence": evidence}


def relative_to_repo(path: Path) -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path, help="results.csv files of bench_batchless.py")
    parser.add_argument("--out", type=Path, default=gpu_choice.TABLE_PATH)
    args = parser.parse_args(argv)
    rows = []
    for path in args.csv:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    table = derive(rows)
    if not table["devices"]:
        sys.exit("no GPU measured with both the cuda and the triton backend in these files: nothing to derive")
    # Relative to the repository where inside it: the table is package data, read on other machines.
    table["sources"] = [relative_to_repo(p) for p in args.csv]
    if args.out.is_file():  # the table is per GPU: the GPUs these files do not measure keep their entries
        kept = json.loads(args.out.read_text())
        for gpu in set(kept.get("devices", {})) - set(table["devices"]):
            table["devices"][gpu] = kept["devices"][gpu]
            table["evidence"][gpu] = kept.get("evidence", {}).get(gpu, {})
        table["sources"] = sorted(set(kept.get("sources", [])) | set(table["sources"]))
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    for gpu, choices in table["devices"].items():
        print(f"{gpu}: " + ", ".join(f"{k} -> {b}" for k, b in choices.items()))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
