"""Timing helpers of the benchmarks: rotating rounds, paired ratios, and the machine they ran on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision


def time_rounds(fns: dict[str, Callable[[], Any]], *, rounds: int, warmup: int,
                setup: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[float]]:
    """`warmup` untimed calls of each, then `rounds` rounds timing each once, the order rotated by
    one every round (for two: alternating) so drift from other load hits all of them alike.
    `setup[name]`, where given, runs untimed before each call of `name` (a variant's switches).
    Returns the wall-clock seconds of each call, per name."""
    if rounds < 1:
        raise ValueError(f"--pairs: {rounds} must be >= 1")
    setup = setup or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            if name in setup:
                setup[name]()
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            if name in setup:
                setup[name]()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_summary(ours_s: list[float], theirs_s: list[float]) -> dict[str, Any]:
    """Medians and the median of the per-round ratios ours / theirs."""
    ratios = [a / b for a, b in zip(ours_s, theirs_s)]
    return {
        "ratio": round(statistics.median(ratios), 4),
        "ours_median_s": round(statistics.median(ours_s), 4),
        "theirs_median_s": round(statistics.median(theirs_s), 4),
        "ours_s": [round(t, 4) for t in ours_s],
        "theirs_s": [round(t, 4) for t in theirs_s],
        "ratios": [round(r, 4) for r in ratios],
    }


def machine() -> dict[str, Any]:
    """The machine and software the numbers were measured on."""
    model_name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        model_name = names[0] if names else model_name
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "cpu": model_name,
        "cpus_usable": usable,
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_1_5_15": load,
    }


__all__ = ["machine", "paired_summary", "time_rounds"]
