"""Timing and memory measurement in the running process.

Peak memory is the rise of the process's resident set (RSS) during one call,
read from Linux's /proc: writing 5 to /proc/self/clear_refs resets the peak
(VmHWM) to the current RSS, and malloc_trim first hands freed heap memory back,
so the rise counts what the call itself touches, whichever framework allocates
it. For NumPy, tracemalloc (which sees NumPy's buffers) gives the same figures
to within a few MiB; `traced_peak_mib` is kept for the tiled-attention target.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
import tracemalloc

MIB = 2**20

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: no trimming, the RSS figures are then upper bounds of the truth
    _LIBC = None


# After a call, OpenBLAS (NumPy) keeps its worker threads spinning for a while: 0.10-0.11 s on the machine
# of 2026-12-08, PyTorch's for at most 0.01 s (benchmarks/README.md). On 2 cores, a call from another
# library made in that window shares the cores with the idle spinners and can take about twice as long;
# that would be measuring the previous call, not this one. Timed calls therefore start after this pause.
PAUSE_S = 0.25


def seconds(fn, pause: float = PAUSE_S, warm: bool = False) -> float:
    """Wall-clock seconds of one call of fn(), made after `pause` seconds of quiet.

    With `warm`, an untimed call of fn() comes first, so the timed one finds its own library's
    threads awake and its data in cache, as in a loop of such calls (worth it for short calls).
    """
    time.sleep(pause)
    if warm:
        fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def peak_rss_mib(fn) -> float:
    """MiB of resident memory the call fn() added at its peak, or NaN where /proc cannot say."""
    try:
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter to the current RSS
        before = _status_mib("VmRSS")
    except OSError:
        fn()
        return float("nan")
    fn()
    return _status_mib("VmHWM") - before


def traced_peak_mib(fn) -> tuple[float, object]:
    """(MiB NumPy allocated at the peak of fn(), fn's result), by tracemalloc."""
    tracemalloc.start()
    try:
        result = fn()
        return tracemalloc.get_traced_memory()[1] / MIB, result
    finally:
        tracemalloc.stop()


def exp_microseconds() -> tuple[float, float]:
    """(np.exp, np.exp2) microseconds on a 512 x 512 float32 block in this process, fastest of 5 x 20 calls.

    On the book's AVX-512 machine of 2026-12-04, about one fresh process in four ran float32 np.exp2 about
    three times as slowly as the others, on every call, decided by the address it loaded NumPy's core library
    at (README.md), and fixed_shift_attention (whose exps are exp2's), as it was then, fell behind SDPA. The
    bench prints these two figures for its own process.
    """
    import timeit

    import numpy as np

    block = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32) - 4
    out = np.empty_like(block)
    best = lambda f: min(timeit.repeat(lambda: f(block, out=out), number=20, repeat=5)) / 20e-6  # noqa: E731
    return best(np.exp), best(np.exp2)


def load_average() -> float:
    """The machine's 1-minute load average: above the core count, timings are shared with others."""
    return os.getloadavg()[0]
