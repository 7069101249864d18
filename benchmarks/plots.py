"""Time and peak memory against sequence length, log-log, one line per implementation."""

from __future__ import annotations

import csv
import os
import pathlib
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only: no window, works on a server
import matplotlib.pyplot as plt  # noqa: E402

from contestants import CONTESTANTS  # noqa: E402

PANELS = {  # column -> (file name, y label, title, how it was measured)
    "time_median_s": ("time.png", "seconds per forward (median)", "Time of one forward",
                      "median of {runs} interleaved runs"),
    "peak_rss_mib": ("memory.png", "peak extra memory (MiB)", "Peak memory of one forward",
                     "rise of the process's resident memory during one run"),
}


def read(csv_path: pathlib.Path) -> dict[str, list[dict]]:
    rows = defaultdict(list)
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            rows[row["implementation"]].append(row)
    return rows


def _reference_slope(ax, lengths, values, label):
    """A dashed grey line growing like T^2, through the largest measured value at the largest T."""
    t_max, y_max = lengths[-1], max(values)
    ax.plot(lengths, [y_max * (t / t_max) ** 2 for t in lengths], color="0.6", lw=1, ls=(0, (4, 3)), label=label)


def plot(csv_path: pathlib.Path, out_dir: pathlib.Path, machine: str = "", runs: int = 5) -> list[pathlib.Path]:
    rows = read(csv_path)
    written = []
    for column, (file_name, ylabel, title, how) in PANELS.items():
        fig, ax = plt.subplots(figsize=(8.5, 5.2))
        biggest = []
        for name, (_, _, colour, marker, style) in CONTESTANTS.items():
            points = [(int(r["T"]), float(r[column])) for r in rows.get(name, []) if float(r[column]) > 0]
            if points:
                ts, ys = zip(*sorted(points))
                ax.plot(ts, ys, color=colour, marker=marker, ls=style, lw=1.8, ms=5, label=name)
                biggest.append((ts, ys))
        ts, ys = max(biggest, key=lambda p: p[1][-1])  # the steepest line sets the T^2 guide
        _reference_slope(ax, ts, ys, "grows like $T^2$")
        ax.set(xscale="log", yscale="log", xlabel="sequence length T (B=1, H=8, D=64, E=512)", ylabel=ylabel)
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(f"{title}\n{machine}, {how.format(runs=runs)}", fontsize=11)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
        path = out_dir / file_name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    here = pathlib.Path(__file__).resolve().parent / "results"
    print(*plot(here / "attention.csv", here, f"{os.cpu_count()}-core CPU, float32"), sep="\n")
