"""Cells on Slurm through submitit: one checkpointable job per cell (`--executor submitit`).

`AutoExecutor` picks Slurm when `sbatch` is there, else submitit's own local executor. The job runs the
cell's usual command (`harness.execute.executors.CellCommand`); on a Slurm timeout or preemption
submitit calls `SubmititCell.checkpoint`, which asks the cell to checkpoint and stop, and requeues the
same command, which resumes from `checkpoints/latest.pt`. submitit stays an optional import (the
`cluster` extra): `make_executor` checks for it before any cell starts.
"""

from __future__ import annotations

import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.execute.executors import STOP_FILE, CellCommand, Handle, spawn_cell, stop_tree

# Seconds a preempted cell gets to checkpoint and stop: submitit has Slurm signal the job 90 s before
# its end (`slurm_signal_delay_s`), and the requeue itself needs a few of them.
PREEMPT_GRACE_S = 75.0


class SubmititCell:
    """The callable a submitit job runs: the cell's command, waited for, its exit code returned.

    It has a `checkpoint` method, so submitit requeues it on a Slurm timeout or preemption
    (`helpers.Checkpointable` protocol, duck-typed to keep submitit an optional import); the
    requeued job starts the same command and `detector.run` resumes from its latest checkpoint.
    """

    def __init__(self, command: CellCommand) -> None:
        self.command = command
        self._proc: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"command": self.command}  # a running process is not part of a (re)submission

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.command, self._proc = state["command"], None

    def __call__(self) -> int:
        if self.command.nnodes > 1:  # one task per node (the executor asks for that): this node's agent
            import submitit

            job = submitit.JobEnvironment()
            # The rendezvous lives on the job's first node; the port is derived from the job id so that
            # two cells' jobs sharing a node do not meet.
            port = 29400 + zlib.crc32(str(job.job_id).encode()) % 20000
            proc = spawn_cell(self.command, node=job.node, endpoint=f"{job.hostnames[0]}:{port}")
        else:
            proc = spawn_cell(self.command)
        self._proc = proc
        try:
            # Poll, not proc.wait(): a blocked wait() holds the Popen's waitpid lock, and `checkpoint`
            # (run by submitit's signal handler in this same thread, in the middle of that wait)
            # could then never see the cell exit.
            while (code := proc.poll()) is None:
                time.sleep(0.5)
            return code
        finally:
            # Cancel, timeout and requeue arrive as signals that raise out of `wait`: never leave
            # the cell's process tree behind.
            stop_tree(proc, grace_s=1.0)

    def checkpoint(self) -> Any:
        """submitit calls this on Slurm's preemption / timeout signal, then requeues the job with
        what it returns. First the running cell is asked to checkpoint and stop (the stop file,
        which reaches every rank on every node) and given up to `PREEMPT_GRACE_S` to do so; the
        requeued job runs the same command, which resumes from that checkpoint."""
        import submitit

        proc = self._proc
        if proc is not None and proc.poll() is None:
            (self.command.cell_dir / STOP_FILE).touch()
            t0 = time.monotonic()
            try:
                code = proc.wait(timeout=PREEMPT_GRACE_S)
                print(f"harness: preempted: the cell stopped in {time.monotonic() - t0:.0f} s (exit {code}); requeueing",
                      file=sys.stderr, flush=True)
            except subprocess.TimeoutExpired:  # the latest periodic checkpoint is what the requeued job resumes from
                print(f"harness: preempted: the cell did not stop within {PREEMPT_GRACE_S:.0f} s; requeueing",
                      file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(SubmititCell(self.command))


class SubmititHandle:
    def __init__(self, job: Any) -> None:
        self.job = job
        self.error: str | None = None

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        try:
            return int(self.job.result())
        except Exception as exc:  # noqa: BLE001 - a job that died (node failure, cancelled)
            # The cell's own error is in stdout.txt; this records why the job itself ended.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.error = f"submitit job ended without a result: {type(exc).__name__}: {first}"
            return 1

    def cancel(self) -> None:
        try:
            self.job.cancel(check=False)
        except Exception:  # noqa: BLE001 - the job may be gone already
            pass


@dataclass(kw_only=True)
class SubmititExecutor:
    """One submitit job per cell: Slurm if available, else submitit's own local executor.

    Args:
        folder: where submitit keeps its pickles and job logs (`<runs>/_submitit/<matrix>/<profile>`).
        cluster: None (auto: slurm when available, else local), "slurm", "local" or "debug".
        timeout_min: the job's time limit; submitit's default for local jobs is 2 minutes, far too
            short for a training run, so we always set it.
        gpus_per_node: GPUs the job asks for (the cell's `--nproc-per-cell` on CUDA, else 0).
        nodes: nodes per job (`--nnodes`); one task per node, each a torchrun agent.
        cpus_per_task: CPU cores for the job.
        slurm_partition: optional partition name.
    """

    folder: Path
    cluster: str | None = None
    timeout_min: int = 3 * 24 * 60
    gpus_per_node: int = 0
    nodes: int = 1
    cpus_per_task: int | None = None
    slurm_partition: str | None = None
    _executor: Any = None

    def _get(self) -> Any:
        if self._executor is None:
            try:
                import submitit
            except ImportError:
                raise UserError(
                    "--executor submitit: submitit is not installed; pip install 'frcnn-harness[cluster]'"
                ) from None
            self.folder.mkdir(parents=True, exist_ok=True)
            ex = submitit.AutoExecutor(folder=str(self.folder), cluster=self.cluster)
            params: dict[str, Any] = {"timeout_min": self.timeout_min, "nodes": self.nodes, "tasks_per_node": 1}
            if self.gpus_per_node:
                params["gpus_per_node"] = self.gpus_per_node
            if self.cpus_per_task:
                params["cpus_per_task"] = self.cpus_per_task
            if self.slurm_partition and ex.cluster == "slurm":
                params["slurm_partition"] = self.slurm_partition
            ex.update_parameters(**params)
            self._executor = ex
        return self._executor

    def submit(self, command: CellCommand, *, keep_fds: Sequence[int] = ()) -> Handle:
        executor = self._get()
        executor.update_parameters(name=command.cell_dir.name)
        return SubmititHandle(executor.submit(SubmititCell(command)))

    def close(self) -> None:
        """Nothing to release: submitted jobs belong to Slurm (or submitit's local runner)."""


__all__ = ["PREEMPT_GRACE_S", "SubmititCell", "SubmititExecutor", "SubmititHandle"]
