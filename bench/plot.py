"""Bar charts of a results.csv written by bench_batchless.py: forward+backward time per impl and
case (log scale, with the time a copy of the same bytes would take), and its share of the copy
bandwidth. Writes fwd_bwd.png next to the CSV.

    python bench/plot.py bench/results/<device-slug>/results.csv
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import preferred_timing  # noqa: E402


def plot(csv_path, png_path=None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path else csv_path.with_name("fwd_bwd.png")
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    if rows and not {"pass", "median_ms", "shape", "dtype", "layout"} <= rows[0].keys():
        raise SystemExit(f"{csv_path} is not a results.csv of bench_batchless.py (no pass, shape, dtype, layout "
                         "columns): nothing to plot here")
    rows = preferred_timing(rows)
    timed = [r for r in rows if r["pass"] == "fwd+bwd" and r["median_ms"]]
    if not timed:
        print(f"{csv_path} has no forward+backward timings: no plot")
        return None

    def case(r):
        return r["shape"], r["dtype"], r["layout"]

    cases = list(dict.fromkeys(case(r) for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    by_key = {(case(r), r["impl"]): r for r in timed}

    fig, (ax_time, ax_bw) = plt.subplots(2, 1, figsize=(max(8.0, 1.1 * len(cases) + 2), 9), sharex=True)
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs, times, fracs = [], [], []
        for k, c in enumerate(cases):
            if (c, impl) in by_key:
                r = by_key[(c, impl)]
                xs.append(k + (i - (len(impls) - 1) / 2) * width)
                times.append(float(r["median_ms"]))
                fracs.append(100 * float(r["frac_of_copy"]))
        ax_time.bar(xs, times, width, label=impl, color=f"C{i}")
        ax_bw.bar(xs, fracs, width, color=f"C{i}")
    # Cases whose timings are not to be trusted (bench_batchless.unreliable_reason): hatched, and
    # their reason under the axis.
    shaky = [k for k, c in enumerate(cases) if any(by_key[(c, i)].get("unreliable") for i in impls if (c, i) in by_key)]
    for k in shaky:
        for ax in (ax_time, ax_bw):
            ax.axvspan(k - 0.5, k + 0.5, facecolor="none", edgecolor="red", hatch="//", alpha=0.4, linewidth=0)
    # The floor: fwd+bwd bytes moved at the bandwidth frac_of_copy is a share of (the case's fastest
    # copy, bench_batchless.copy_ceilings): bytes / ceiling = median * frac_of_copy, for any impl.
    floor = []
    for c in cases:
        r = next(by_key[(c, i)] for i in impls if (c, i) in by_key)
        floor.append(float(r["median_ms"]) * float(r["frac_of_copy"]))
    ax_time.hlines(floor, [k - 0.45 for k in range(len(cases))], [k + 0.45 for k in range(len(cases))],
                   colors="black", linestyles="dashed",
                   label="floor: fwd+bwd bytes (5 x size of x) at the same run's fastest copy's bandwidth")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("fwd+bwd median time (ms, log)")
    ax_time.legend(fontsize="small", ncol=min(3, len(impls) + 1), loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   frameon=False)
    ax_bw.axhline(100, color="black", linestyle="dashed", linewidth=1)
    ax_bw.set_ylabel("% of copy bandwidth")
    labels = ["\n".join(c) + ("\nUNRELIABLE" if k in shaky else "") for k, c in enumerate(cases)]
    ax_bw.set_xticks(range(len(cases)), labels, fontsize="small")
    if shaky:
        reasons = sorted({by_key[(cases[k], i)]["unreliable"] for k in shaky for i in impls if (cases[k], i) in by_key}
                         - {""})
        ax_bw.set_xlabel("hatched, UNRELIABLE: " + " | ".join(reasons), fontsize="small", color="red")
    first = rows[0]
    fig.suptitle(f"batchless_norm training fwd+bwd: {first['device_name']}, {first['num_threads']} threads, "
                      f"torch {first['torch_version']}")
    for ax in (ax_time, ax_bw):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    print(f"plot: {png_path}")
    return png_path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    plot(sys.argv[1])
