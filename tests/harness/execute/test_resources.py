"""harness.execute.resources: cores, threads per cell process, and `--jobs auto`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.execute import resources
from harness.execute.resources import resolve_jobs, thread_env, usable_cores


def test_thread_env_splits_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(resources, "usable_cores", lambda: 16)
    assert thread_env(jobs=1, nproc_per_cell=1) == {}
    assert thread_env(jobs=2, nproc_per_cell=2) == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert thread_env(jobs=32, nproc_per_cell=1)["OMP_NUM_THREADS"] == "1"
    assert thread_env(jobs=1, nproc_per_cell=2, nodes_here=2)["OMP_NUM_THREADS"] == "4"  # local --nnodes 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_env(jobs=2, nproc_per_cell=1) == {}


def test_usable_cores_follow_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == affinity  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == affinity  # no quota
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cores(tmp_path) == 1  # half a core still runs one thread
    (tmp_path / "cpu.max").write_text(f"{100000 * (affinity + 8)} 100000\n")
    assert usable_cores(tmp_path) == affinity  # a quota above the mask does not add cores
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1, one core
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(tmp_path) == affinity


def test_resolve_jobs_auto_is_one_cell_per_core_on_local_cpu_only() -> None:
    auto = {"device": "cpu", "executor": "local", "nproc_per_cell": 1, "cells": 30, "cores": 2, "available_gib": 20.0}
    assert resolve_jobs("auto", **auto) == 2
    assert resolve_jobs("auto", **{**auto, "cores": 16}) == 6  # 20 GiB / 3 GiB per cell
    assert resolve_jobs("auto", **{**auto, "cores": 16, "available_gib": 100.0}) == 16
    assert resolve_jobs("auto", **{**auto, "cores": 16, "nproc_per_cell": 4, "available_gib": 100.0}) == 4
    assert resolve_jobs("auto", **{**auto, "cells": 1}) == 1
    assert resolve_jobs("auto", **{**auto, "available_gib": 1.0}) == 1
    assert resolve_jobs("auto", **{**auto, "device": "cuda"}) == 1  # cells would share the GPU they time
    assert resolve_jobs("auto", **{**auto, "executor": "submitit"}) == 1
    assert resolve_jobs(3, **{**auto, "device": "cuda"}) == 3  # a number is what it says
