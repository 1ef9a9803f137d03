"""Test-wide settings that keep the suite on this machine."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`nox -s tests` runs one worker per core, at most 8) each worker gets its
    share of the cores, and at least 2 threads: torch's default, a thread per core in every worker,
    oversubscribes a large machine (on 2 cores, 2 workers of 1 or of 2 threads each took the same
    ~4 minutes: many tests wait on subprocesses)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(2, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _no_real_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's AutoExecutor picks Slurm whenever `srun` is on PATH: a test must never submit real
    jobs from a cluster login node, so every `--executor submitit` in the tests uses submitit's own
    local cluster unless a test names another."""
    monkeypatch.setenv("HARNESS_SUBMITIT_CLUSTER", "local")
