"""The one timer of the command line and the benches: a median, which shrugs off the spikes a
shared machine adds; on CUDA, Triton's `do_bench`, which also flushes L2 between calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 1,
              device: torch.device | str = "cpu", setup: Callable[[], object] | None = None) -> float:
    """Median wall time of `fn()` in ms over `repeat` calls after `warmup` untimed ones;
    `setup()` runs untimed before each call (CPU only)."""
    if torch.device(device).type == "cuda" and setup is None:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(100, 10 * repeat), return_mode="median"))
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(max(1, repeat)):
        if setup is not None:
            setup()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3
