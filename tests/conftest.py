"""Test-wide settings that keep the suite on this machine."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_real_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's AutoExecutor picks Slurm whenever `srun` is on PATH: a test must never submit real
    jobs from a cluster login node, so every `--executor submitit` in the tests uses submitit's own
    local cluster unless a test names another."""
    monkeypatch.setenv("HARNESS_SUBMITIT_CLUSTER", "local")
