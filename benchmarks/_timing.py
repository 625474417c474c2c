"""Timing helpers shared by the benchmarks: interleaved in-process ratios, docs/performance.md#method.

Timing helpers shared by the benchmarks: ratios measured in one process, interleaved.

Other work on the machine changes absolute times from one minute to the next, but affects two
candidates timed alternately within a few milliseconds of each other almost equally. So every
number these scripts report is a ratio to a baseline: each round times the baseline and every
candidate (a median of ``inner`` calls each), the ratio is taken per round, and the reported value
is the median over rounds.

``clock="cpu"`` times with the process's CPU time instead of the wall clock. With one torch
thread that is the robust choice on a shared machine: time spent descheduled while another job
runs does not count. (With several threads it would also count OpenMP's spin-waiting.)
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def machine() -> str:
    """CPU model, core and thread counts, torch version, and the load average right now."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}), load average {load}"
    )


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _median_time(fn: Callable[[], object], inner: int, clock: str) -> float:
    now = CLOCKS[clock]
    times = []
    for _ in range(inner):
        start = now()
        fn()
        times.append(now() - start)
    return statistics.median(times)


def compare(
    baseline: Callable[[], object],
    candidates: dict[str, Callable[[], object]],
    *,
    rounds: int = 7,
    inner: int = 5,
    warmup: int = 2,
    clock: str = "wall",
) -> tuple[float, dict[str, float]]:
    """Median seconds of ``baseline`` and the median over rounds of each candidate's time ratio to it."""
    for fn in (baseline, *candidates.values()):
        for _ in range(warmup):
            fn()
    base_times, ratios = [], {name: [] for name in candidates}
    for _ in range(rounds):
        base = _median_time(baseline, inner, clock)
        base_times.append(base)
        for name, fn in candidates.items():
            ratios[name].append(_median_time(fn, inner, clock) / base)
    return statistics.median(base_times), {name: statistics.median(r) for name, r in ratios.items()}


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
