"""How many cells run at once on this machine, and how many threads each gets.

`usable_cores` (affinity mask cut to the cgroup's CPU quota), `thread_env` (OMP / MKL threads per cell
process so that concurrent cells do not oversubscribe the cores) and `resolve_jobs` (`--jobs auto`).
"""

from __future__ import annotations

import os
from pathlib import Path


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPU cores this process may use: its affinity mask, cut to the cgroup's CPU quota (a
    container's `--cpus`, which `os.cpu_count()` does not see: it counts the host's cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = None
    try:  # cgroup v2: "max 100000" (none) or "200000 100000" (2 cores)
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1: a quota of -1 is none
            limit_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
            quota = limit_us / period_us if limit_us > 0 and period_us > 0 else None
        except (OSError, ValueError):
            pass
    return max(1, min(cores, int(quota))) if quota else max(1, cores)


def thread_env(*, jobs: int, nproc_per_cell: int, nodes_here: int = 1) -> dict[str, str]:
    """OMP/MKL threads per process so that concurrent cells do not oversubscribe the CPU cores.

    `nodes_here`: the torchrun agents of one cell on this machine (local `--nnodes`). Left alone when
    there is one process in all, or when the user set OMP_NUM_THREADS already.
    """
    procs = max(1, jobs) * max(1, nproc_per_cell) * max(1, nodes_here)
    if procs == 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    threads = str(max(1, usable_cores() // procs))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


# "auto" keeps this much available memory per concurrent cell: a smoke cell peaks at about 2.2 GB
# resident (C4), so a host with many cores and little memory does not swap.
AUTO_JOBS_GIB_PER_CELL = 3.0


def _available_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def resolve_jobs(requested: int | str, *, device: str, executor: str, nproc_per_cell: int, cells: int,
                 cores: int | None = None, available_gib: float | None = None) -> int:
    """`--jobs` (or the profile's `jobs`) as a number of cells in flight.

    "auto": on the local executor on CPU, one cell per core (`thread_env` then gives each process one
    thread: on 2 cores the smoke matrix took 545 s two one-thread cells at a time against 704 s one
    two-thread cell at a time, since its small tensors barely spread over threads), at most one per `AUTO_JOBS_GIB_PER_CELL` of
    available memory and no more than there are cells. On CUDA 1 (cells would share the one GPU they
    time), and 1 under submitit (its jobs run elsewhere: `--jobs N` says how many to keep queued).
    """
    if requested != "auto":
        return int(requested)
    if device != "cpu" or executor != "local":
        return 1
    cores = cores if cores is not None else usable_cores()
    n = min(max(1, cores // max(1, nproc_per_cell)), max(1, cells))
    gib = available_gib if available_gib is not None else _available_gib()
    if gib is not None:
        n = min(n, max(1, int(gib // AUTO_JOBS_GIB_PER_CELL)))
    return n


__all__ = ["AUTO_JOBS_GIB_PER_CELL", "resolve_jobs", "thread_env", "usable_cores"]
