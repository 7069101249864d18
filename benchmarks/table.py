"""The like-for-like table: time and peak memory of each pair in `pairs.ROWS`, measured honestly.

Memory first, each implementation in a fresh Python process of its own
(`python run.py --memory-of NAME`): it builds its cases, makes one warm-up call
per case, then measures the next call with `measure.peak_rss_mib` (the rise of
the process's resident memory, peak over the call, after malloc_trim), with
glibc's mmap threshold held at a fixed value (`MMAP_THRESHOLD_BYTES`) so that
the figure does not depend on the holes earlier calls left in the heap. Resident
memory counts whatever any library allocates, NumPy, PyTorch or TensorFlow
alike, and a fresh process keeps one library's leftovers (heap holes, caches,
threads) out of another's figure. Resident memory does not depend on the load
of the machine.

Then time, in this one process: every implementation built once, one untimed
warm-up call each (which also checks that the two sides of a row agree), then
`rounds` rounds. A round runs every implementation of a case once, in an order
rotated each round, each timed call preceded by a pause (`measure.PAUSE_S`:
the spinning-threads trap) and, below T = 4096, by one untimed call of the same
implementation, so the timed one finds its own threads awake as in a loop of
calls. The median of the rounds is kept, with the load average over them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

import numpy as np

import pairs
from measure import load_average, peak_rss_mib, seconds

RUN = pairs.__file__.replace("pairs.py", "run.py")


def case_arg(case: pairs.Case) -> str:
    return f"{case.b},{case.t},{int(case.causal)}"


def parse_case(text: str) -> pairs.Case:
    b, t, causal = (int(n) for n in text.split(","))
    return pairs.Case(b, t, bool(causal))


def memory_of(name: str, cases: list[pairs.Case]) -> dict[str, float]:
    """In this process: MiB added at the peak of one call of `name` on each case, after one warm-up call."""
    maker, _ = pairs.IMPLEMENTATIONS[name]
    peaks = {}
    for case in cases:
        call = maker(case)
        call()  # warm-up: one-off set-up (kernels, thread pools, Keras's build) is not the forward's memory
        peaks[case.label] = peak_rss_mib(call)
        del call
    return peaks


# glibc serves a block of at least this many bytes with mmap and unmaps it when it is freed. Left to
# itself it raises the threshold after each such free (up to 32 MiB), and the figure then counts the
# holes earlier calls left in its heap; benchmarks/README.md gives the figures measured both ways.
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, M_MMAP_THRESHOLD


def memory_in_fresh_processes(names: list[str], cases_of: dict, log) -> dict[tuple[str, str], float]:
    """{(name, case label): MiB}, each implementation measured in a new Python process."""
    peaks = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}  # fixed: see above
    for name in names:
        start = time.perf_counter()
        cmd = [sys.executable, RUN, "--memory-of", name, "--cases", *map(case_arg, cases_of[name])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        for label, mib in json.loads(done.stdout.strip().splitlines()[-1]).items():
            peaks[name, label] = mib
        log(f"  memory of {name:<32} in its own process: {time.perf_counter() - start:5.1f} s")
    return peaks


def _torch_fast_path():
    """A counter of torch._native_multi_head_attention calls (nn.MultiheadAttention's fused path)."""
    import torch

    return mock.patch.object(torch, "_native_multi_head_attention", wraps=torch._native_multi_head_attention)


def times_in_this_process(names: list[str], cases_of: dict, rounds: int, log):
    """({(name, label): median s}, {(name, label): [arrays of its warm-up result]}, {label: load}, notes)."""
    calls, results, notes = {}, {}, {}
    for name in names:
        maker, _ = pairs.IMPLEMENTATIONS[name]
        for case in cases_of[name]:
            call = calls[name, case.label] = maker(case)
            if name == "nn.MultiheadAttention":
                with _torch_fast_path() as native:
                    result = call()
                notes[name, case.label] = (
                    "fast path: torch._native_multi_head_attention" if native.call_count else "its Python path")
            else:
                result = call()
            results[name, case.label] = pairs.to_numpy(result)
    cases = list(dict.fromkeys(c for name in names for c in cases_of[name]))
    times = {key: [] for key in calls}
    load = {}
    for r in range(rounds):
        start = time.perf_counter()
        for case in cases:
            here = [name for name in names if (name, case.label) in calls]
            order = here[r % len(here):] + here[: r % len(here)]  # rotate who goes first
            for name in order:
                times[name, case.label].append(seconds(calls[name, case.label], warm=case.t < 4096))
            load.setdefault(case.label, []).append(load_average())
        log(f"  round {r + 1}/{rounds} done in {time.perf_counter() - start:5.1f} s (load {load_average():.2f})")
    medians = {key: statistics.median(ts) for key, ts in times.items()}
    return medians, results, {label: statistics.mean(ls) for label, ls in load.items()}, notes


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The largest |a - b| over what both return (out, and the weights where both return them)."""
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def computes_the_layer(name: str) -> bool:
    """False for a floor that only times products in buffers: no output to check, no memory of its own."""
    return pairs.FLOORS.get(name, True)


def build_table(rows, names, cases_of, peaks, medians, results, load, notes) -> list[dict]:
    table = []
    diff = lambda ours, ref: max_diff(results[ours, label], results[ref, label])  # noqa: E731

    def verdict(value, limit):
        return "" if limit is None else ("met" if value <= limit else "NOT MET")

    for row in rows:
        for case in cases_of[row.ours]:
            label = case.label
            if (row.reference, label) not in medians:
                continue
            ours_s, ref_s = medians[row.ours, label], medians[row.reference, label]
            ours_mib, ref_mib = peaks.get((row.ours, label), float("nan")), peaks[row.reference, label]
            if row.beyond_output:
                out_mib = pairs.output_mib(case)
                memory, memory_unit = ours_mib - out_mib, "MiB beyond the output"
                ref_note = f"reference {ref_mib - out_mib:.1f} MiB beyond the output"
            else:
                memory, memory_unit = ours_mib / ref_mib, "ratio of peaks"
                ref_note = ""
            if not computes_the_layer(row.ours):  # its buffers were allocated before: no memory to compare
                memory, memory_unit = float("nan"), ""
            limits = (row.time_limit, row.memory_limit)
            table.append({
                "ours": row.ours, "reference": row.reference, "case": label,
                "ours_ms": f"{ours_s * 1e3:.1f}", "reference_ms": f"{ref_s * 1e3:.1f}",
                "time_ratio": f"{ours_s / ref_s:.2f}", "time_limit": limits[0] or "",
                "time_verdict": verdict(ours_s / ref_s, limits[0]),
                "ours_peak_mib": "" if ours_mib != ours_mib else f"{ours_mib:.1f}",  # NaN: a floor
                "reference_peak_mib": f"{ref_mib:.1f}",
                "memory": "" if memory != memory else f"{memory:.2f}", "memory_unit": memory_unit,
                "memory_limit": limits[1] or "",
                "memory_verdict": verdict(memory, limits[1]),
                "max_abs_diff": f"{diff(row.ours, row.reference):.1e}" if computes_the_layer(row.ours) else "",
                "load_avg": f"{load[label]:.2f}",
                "note": "; ".join(n for n in (notes.get((row.reference, label), ""), ref_note) if n),
            })
    return table


def markdown(table: list[dict]) -> str:
    head = ("| ours | reference | case | ours ms | ref. ms | time ratio (limit) | ours MiB | ref. MiB "
            "| memory (limit) | max abs diff | load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        tv = f" {r['time_verdict']}" if r["time_verdict"] == "NOT MET" else ""
        mv = f" {r['memory_verdict']}" if r["memory_verdict"] == "NOT MET" else ""
        time_limit = f" (<= {r['time_limit']}){tv}" if r["time_limit"] else ""
        unit = {"": "", "ratio of peaks": "x"}.get(r["memory_unit"], " MiB beyond out")
        mem_limit = f" (<= {r['memory_limit']}){mv}" if r["memory_limit"] else ""
        lines.append(
            f"| {r['ours']} | {r['reference']} | {r['case']} | {r['ours_ms']} | {r['reference_ms']} "
            f"| {r['time_ratio']}x{time_limit} | {r['ours_peak_mib']} | {r['reference_peak_mib']} "
            f"| {r['memory']}{unit}{mem_limit} | {r['max_abs_diff']} | {r['load_avg']} |")
    return "\n".join(lines)


def like_for_like(rounds: int, log, rows=None, names=None, cases_of=None) -> list[dict]:
    """Memory (fresh processes), then time (this process); returns the table's rows."""
    rows = rows or pairs.ROWS
    names = names or list(pairs.IMPLEMENTATIONS)
    cases_of = cases_of or {name: cases for name, (_, cases) in pairs.IMPLEMENTATIONS.items()}
    floors = [pairs.Row(f, "nn.MultiheadAttention", None, None) for f in pairs.FLOORS if f in names]
    log("Peak memory, each implementation in a fresh process:")
    peaks = memory_in_fresh_processes([n for n in names if computes_the_layer(n)], cases_of, log)
    log(f"Time, every implementation in this process, {rounds} interleaved rounds:")
    medians, results, load, notes = times_in_this_process(names, cases_of, rounds, log)
    return build_table(list(rows) + floors, names, cases_of, peaks, medians, results, load, notes)
