"""`make bench`: the like-for-like table (pairs.py, table.py), and on request the sweep over T.

    python benchmarks/run.py                  # the table: every row of the book's speed targets (~4 min)
    python benchmarks/run.py --rounds 3       # the same, quicker and noisier
    python benchmarks/run.py --no-table --sweep --lengths 128 512 --runs 3   # the sweep alone, a quick look

The table pairs each of our implementations with the library one that does the
same work (table.py says how time and memory are measured) and writes
results/like_for_like.csv and like_for_like.md. The sweep (`--sweep`) times the
eight contestants of contestants.py over T in this one process: at each T every
implementation runs once untimed (it warms up, has its peak memory measured, and
its output checked against mha.numpy), then the timed runs interleave, in an
order rotated every round, each after a quarter-second pause (measure.PAUSE_S:
without it, a PyTorch call made right after a NumPy one shares the two cores with
OpenBLAS's still-spinning idle threads). It writes results/attention.csv,
results/time.png and results/memory.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's mha, not another one installed in the environment

import numpy as np  # noqa: E402

import mha  # noqa: E402
from contestants import CONTESTANTS, build  # noqa: E402
from measure import exp_microseconds, load_average, peak_rss_mib, seconds  # noqa: E402

B, H, D = 1, 8, 64
E = H * D


def log(message: str) -> None:
    print(message, flush=True)


def sweep_one_length(t: int, runs: int, names: list[str], w: mha.Weights) -> list[dict]:
    x = np.random.default_rng(t).standard_normal((B, t, E)).astype(np.float32)  # (B, T, E)
    contestants = {name: build(name, w, x) for name in names}
    reference = contestants["mha.numpy"][0](x) if "mha.numpy" in contestants else None
    memory, diffs = {}, {}
    for name, (forward, xin) in contestants.items():  # the untimed pass: warm-up, memory, agreement
        result = {}
        memory[name] = peak_rss_mib(lambda: result.setdefault("out", forward(xin)))
        diffs[name] = float("nan") if reference is None else float(np.max(np.abs(result.pop("out") - reference)))
        log(f"  T={t:<5} {name:<28} peak {memory[name]:8.1f} MiB   max |diff| vs mha.numpy {diffs[name]:.1e}")
    times = {name: [] for name in names}
    for r in range(runs):
        start = time.perf_counter()
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            forward, xin = contestants[name]
            times[name].append(seconds(lambda: forward(xin), warm=t <= 2048))  # warm-up where cheap
        elapsed = time.perf_counter() - start
        log(f"  T={t:<5} round {r + 1}/{runs} done in {elapsed:6.1f} s  (load {load_average():.2f})")
    return [
        {
            "implementation": name, "T": t, "B": B, "H": H, "D": D, "E": E,
            "time_median_s": f"{statistics.median(times[name]):.6g}",
            "time_min_s": f"{min(times[name]):.6g}", "time_max_s": f"{max(times[name]):.6g}", "runs": runs,
            "peak_rss_mib": f"{memory[name]:.1f}", "max_abs_diff_vs_numpy": f"{diffs[name]:.2e}",
            "load_avg_1min": f"{load_average():.2f}",
        }
        for name in names
    ]


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of the table (median kept)")
    parser.add_argument("--sweep", action="store_true", help="also the sweep over T (minutes more)")
    parser.add_argument("--no-table", action="store_true", help="skip the like-for-like table")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2**i for i in range(7, 14)])
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per length of the sweep")
    parser.add_argument("--only", nargs="+", choices=list(CONTESTANTS), default=list(CONTESTANTS))
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # the child process of table.memory_of
    parser.add_argument("--cases", nargs="+", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        import json

        import table

        print(json.dumps(table.memory_of(args.memory_of, [table.parse_case(c) for c in args.cases])))
        return
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    start = time.perf_counter()
    log(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); load average {load_average():.2f}")
    exp_us, exp2_us = exp_microseconds()  # fixed_shift_attention's exps are exp2's
    exps = f"np.exp {exp_us:.0f} us, np.exp2 {exp2_us:.0f} us per 512 x 512 float32 block"
    log(f"this process: {exps}")
    if not args.no_table:
        import table

        rows = table.like_for_like(args.rounds, log)
        write_csv(args.out / "like_for_like.csv", rows)
        text = table.markdown(rows)
        (args.out / "like_for_like.md").write_text(f"{text}\n\nThe timing process: {exps}.\n")
        log(text)
        log(f"wrote {args.out / 'like_for_like.csv'} and like_for_like.md ({time.perf_counter() - start:.0f} s)")
    if args.sweep:
        sweep(args, start)
    log(f"done in {time.perf_counter() - start:.0f} s")


def sweep(args, start: float) -> None:
    """The sweep over T of the eight contestants (contestants.py): attention.csv, time.png, memory.png."""
    log(f"Sweep: B={B}, H={H}, D={D}, E={E}, self-attention, no mask; T in {args.lengths}; "
        f"{args.runs} interleaved rounds each")
    w = mha.Weights.random(E, H, seed=0)
    rows = []
    for t in args.lengths:
        log(f"T={t} ({time.perf_counter() - start:.0f} s so far)")
        rows += sweep_one_length(t, args.runs, args.only, w)
        write_csv(args.out / "attention.csv", rows)  # written as it goes: an interrupted run keeps its data
    from plots import plot

    for path in plot(args.out / "attention.csv", args.out, f"{os.cpu_count()}-core CPU, float32", args.runs):
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
