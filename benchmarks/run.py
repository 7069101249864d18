"""`make bench`: time and memory of eight attention forwards over T, then the book's speed targets.

    python benchmarks/run.py                  # the full run: T = 128 ... 8192, then the targets
    python benchmarks/run.py --lengths 128 512 --runs 3 --no-targets   # a quick look

Everything runs in this one process. At each T every implementation runs once
untimed (it warms up, has its peak memory measured, and its output checked
against mha.numpy), then the timed runs interleave: round r runs each
implementation once, in an order rotated every round, so a burst of load from
elsewhere on the machine hits them all alike. The median of the rounds is kept.
Each timed call starts after a quarter-second pause (see measure.PAUSE_S): without
it, a PyTorch call made right after a NumPy one shares the two cores with OpenBLAS's
still-spinning idle threads, and the other way round. Up to T = 2048 an untimed call
of the same implementation comes between the pause and the timed call, so the timed
one finds its own threads awake, as in a loop of calls.
Writes results/attention.csv, results/targets.csv, results/time.png, results/memory.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

import mha  # noqa: E402
from contestants import CONTESTANTS, build, make_numpy_lower_bound  # noqa: E402
from measure import PAUSE_S, load_average, peak_rss_mib, seconds, traced_peak_mib  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
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


def interleaved_medians(fns: dict, runs: int, pause: float = PAUSE_S, warm: bool = True) -> dict[str, float]:
    """Median seconds of each function over `runs` interleaved rounds, after one untimed call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(seconds(fn, pause, warm))
    return {name: statistics.median(ts) for name, ts in times.items()}


def gemm_gflops(n: int = 2048, runs: int = 7) -> float:
    """The machine's float32 matrix-product throughput: one large np.matmul, median of `runs`."""
    a, b = (np.random.default_rng(i).standard_normal((n, n)).astype(np.float32) for i in (0, 1))
    return 2 * n**3 / interleaved_medians({"gemm": lambda: a @ b}, runs, pause=0)["gemm"] / 1e9


def target_rows() -> list[dict]:
    """The book's three targets, each measured here and now."""
    from mha import numpy as mnp

    rows = []

    def add(target, measured, unit, limit=None, met=None, note=""):
        """One row; `limit` and `met` only for the book's targets, the other rows are context."""
        verdict = "" if met is None else ("met" if met else "NOT MET")
        rows.append({"target": target, "measured": f"{measured:.4g}", "unit": unit, "limit": limit or "",
                     "verdict": verdict, "load_avg_1min": f"{load_average():.2f}", "note": note})
        bound = f"(limit {limit}) {verdict}" if limit else ""
        log(f"  {target:<56} {measured:10.4g} {unit:<8} {bound:<20} {note}")

    # 1. mha.numpy's layer against the SDPA-based torch forward, on the same weights and input.
    b, t, e, h = 4, 512, 512, 8
    w = mha.Weights.random(e, h, seed=0)
    x = np.random.default_rng(0).standard_normal((b, t, e)).astype(np.float32)
    fns = {name: (lambda f=f, xi=xi: f(xi)) for name in ("mha.numpy", "torch SDPA", "torch.nn.MultiheadAttention")
           for f, xi in [build(name, w, x)]}
    fns["products only"] = lambda f=make_numpy_lower_bound(w): f(x)
    fns["products, exp, sum"] = lambda f=make_numpy_lower_bound(w, exp_and_sum=True): f(x)
    med = interleaved_medians(fns, runs=15)
    ratio = med["mha.numpy"] / med["torch SDPA"]
    add("mha.numpy / torch SDPA forward time, B=4 T=512 E=512", ratio, "ratio", "1.3", ratio <= 1.3,
        f"{med['mha.numpy'] * 1e3:.1f} ms vs {med['torch SDPA'] * 1e3:.1f} ms")
    for name, what in (("products only", "the 6 matrix products alone"),
                       ("products, exp, sum", "the same plus exp and row sums")):
        add(f"lower bound: {what} / torch SDPA", med[name] / med["torch SDPA"], "ratio",
            note=f"{med[name] * 1e3:.1f} ms, no allocation (contestants.make_numpy_lower_bound)")
    add("mha.numpy / torch.nn.MultiheadAttention time, same", med["mha.numpy"] / med["torch.nn.MultiheadAttention"],
        "ratio", note=f"{med['torch.nn.MultiheadAttention'] * 1e3:.1f} ms")
    hot = interleaved_medians({n: fns[n] for n in ("mha.numpy", "torch SDPA")}, runs=15, pause=0, warm=False)
    add("the same ratio with no pause between calls (not fair)", hot["mha.numpy"] / hot["torch SDPA"], "ratio",
        note=f"{hot['mha.numpy'] * 1e3:.1f} ms vs {hot['torch SDPA'] * 1e3:.1f} ms: "
             "torch runs among NumPy's spinning threads")
    peak = gemm_gflops()
    flops = 4 * 2 * b * t * e * e + 2 * 2 * b * h * t * t * (e // h)  # projections + the two attention products
    achieved = flops / med["mha.numpy"] / 1e9
    add("float32 GEMM throughput, np.matmul 2048x2048", peak, "GFLOP/s")
    add("mha.numpy forward throughput", achieved, "GFLOP/s", note=f"{flops / 1e9:.2f} GFLOP per forward")
    add("fraction of GEMM throughput reached by mha.numpy", achieved / peak, "fraction")

    # 2. tiled_attention at T = 8192: memory beyond its output, agreement, time against the naive path.
    t = 8192
    q, k, v = (np.random.default_rng(i).standard_normal((1, 8, t, 64)).astype(np.float32) for i in range(3))
    tiled_mib, tiled_out = traced_peak_mib(lambda: mnp.tiled_attention(q, k, v))
    out_mib = tiled_out.nbytes / 2**20
    naive_mib, (naive_out, _) = traced_peak_mib(lambda: mnp.scaled_dot_product_attention(q, k, v))
    diff = float(np.max(np.abs(tiled_out - naive_out)))
    del naive_out
    add("tiled_attention peak memory beyond its output, T=8192", tiled_mib - out_mib, "MiB", "64",
        tiled_mib - out_mib <= 64, f"naive path: {naive_mib - out_mib:.0f} MiB beyond its output")
    add("tiled_attention max abs difference from naive, T=8192", diff, "float32", "1e-05", diff <= 1e-5)
    med = interleaved_medians({"tiled": lambda: mnp.tiled_attention(q, k, v),
                               "naive": lambda: mnp.scaled_dot_product_attention(q, k, v)}, runs=5, warm=False)
    add("tiled_attention / naive time, T=8192", med["tiled"] / med["naive"], "ratio", "1.0",
        med["tiled"] <= med["naive"], f"{med['tiled']:.2f} s vs {med['naive']:.2f} s")
    return rows


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2**i for i in range(7, 14)])
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per length (median kept)")
    parser.add_argument("--only", nargs="+", choices=list(CONTESTANTS), default=list(CONTESTANTS))
    parser.add_argument("--no-targets", action="store_true", help="skip the targets measured after the sweep")
    parser.add_argument("--only-targets", action="store_true", help="measure the targets only, no sweep")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    start = time.perf_counter()
    log(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); load average {load_average():.2f}")
    lengths = [] if args.only_targets else args.lengths
    if lengths:
        log(f"Sweep: B={B}, H={H}, D={D}, E={E}, self-attention, no mask; T in {lengths}; "
            f"{args.runs} interleaved rounds each")
    w = mha.Weights.random(E, H, seed=0)
    rows = []
    for t in lengths:
        log(f"T={t} ({time.perf_counter() - start:.0f} s so far)")
        rows += sweep_one_length(t, args.runs, args.only, w)
        write_csv(args.out / "attention.csv", rows)  # written as it goes: an interrupted run keeps its data
    if rows:
        from plots import plot

        for path in plot(args.out / "attention.csv", args.out, f"{os.cpu_count()}-core CPU, float32", args.runs):
            log(f"wrote {path}")
    if not args.no_targets:
        log("Targets:")
        write_csv(args.out / "targets.csv", target_rows())
        log(f"wrote {args.out / 'targets.csv'}")
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
