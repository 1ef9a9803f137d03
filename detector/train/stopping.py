"""A stop on request: checkpoint the iteration reached and exit, so running the cell again resumes there.

Two ways in, both read by `detector.train.engine.train` once per iteration and reduced over ranks so
that every rank stops at the same iteration: the stop file in the cell folder (`STOP_FILE`, how the
harness's Slurm preemption hook reaches every rank of every node) and `STOP_SIGNALS` while training.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Stopped(Exception):
    """Training stopped on request (the stop file or `STOP_SIGNALS`: Slurm's preemption signal) after a
    checkpoint of the iteration it reached: run the cell again to resume exactly there."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"stopped on request at iteration {iteration}; checkpoint saved, run again to resume")
        self.iteration = iteration


# A file in the cell folder that asks a running cell to checkpoint and stop: how submitit's
# preemption hook (harness.execute.slurm.SubmititCell.checkpoint) reaches every rank of every
# node, whatever the process tree (torchrun agents, DataLoader workers) between them.
STOP_FILE = "STOP"


class StopRequest:
    """Set from a signal handler (`STOP_SIGNALS` while training); read by `train` once per
    iteration with the stop file, reduced over ranks, so every rank stops at the same iteration."""

    def __init__(self) -> None:
        self.requested = False

    def set(self, *_args: Any) -> None:
        self.requested = True


STOP = StopRequest()


# SIGUSR2 too: the signal submitit asks Slurm to send before a preemption or the time limit, which
# Slurm delivers to every process of the job step, this one included (seen on the real Slurm of
# `nox -s slurm`: without a handler it killed the cell before submitit could ask it to checkpoint).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While training, `STOP_SIGNALS` request a checkpoint and a stop instead of killing the process
    (outside training they keep their default: nothing to save there). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, STOP.set) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["STOP", "STOP_FILE", "STOP_SIGNALS", "StopRequest", "Stopped", "stop_on_signals"]
