"""Per-kernel table of an Nsight Compute CSV export (ncu --csv --page details, as written by the
profile step of .ci/gpu_session.sh, which profiles .ci/profile_kernels.py):

    python bench/ncu_summary.py ncu.csv[.gz] > ncu_summary.md

One row per profiled kernel launch, in launch order: duration, DRAM throughput (% of peak), bytes
read and written in DRAM, achieved occupancy, registers per thread, grid and block. The profiled
steps' order is printed by .ci/profile_kernels.py (its log), which assigns the rows to cases.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import re
from pathlib import Path

COLUMNS = {  # ncu metric name -> column
    "Duration": "duration",
    "DRAM Throughput": "DRAM %",
    "dram__bytes_read.sum": "DRAM read",
    "dram__bytes_write.sum": "DRAM write",
    "Achieved Occupancy": "occupancy %",
    "Registers Per Thread": "registers",
}


def kernels(path: Path) -> list[dict]:
    """{name, grid, block, <column>: 'value unit'} per kernel launch, in ID order."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        text = "".join(line for line in f if line.startswith('"'))  # drop ncu's ==PROF== lines
    launches: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO(text)):
        launch = launches.setdefault(row["ID"], {
            # without argument lists and namespaces, so that the template arguments fit the column
            "name": re.sub(r"\(.*|batchless_kernels::|<unnamed>::|\(anonymous namespace\)::|c10::", "",
                           row["Kernel Name"].removeprefix("void ")),
            "grid": row["Grid Size"], "block": row["Block Size"]})
        column = COLUMNS.get(row["Metric Name"])
        if column:
            launch[column] = f"{row['Metric Value']} {row['Metric Unit']}".strip()
    return [launches[k] for k in sorted(launches, key=int)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path)
    args = parser.parse_args(argv)
    header = ["#", "kernel", "grid", "block", *COLUMNS.values()]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for i, launch in enumerate(kernels(args.csv)):
        cells = [str(i), launch["name"][:90], launch["grid"], launch["block"],
                 *(launch.get(c, "") for c in COLUMNS.values())]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
