"""Where a cell's process runs: here (a bounded pool of subprocesses) or on Slurm through submitit.

A cell is always the same command, `python -m detector.run CELL_DIR` (ARCHITECTURE.md, "the one
door"), or `python -m torch.distributed.run --standalone --nproc-per-node N -m detector.run CELL_DIR`
for `--nproc-per-cell N`, or one torchrun agent per node for `--nnodes N` (c10d rendezvous); its stdout
and stderr go to `CELL_DIR/stdout.txt` (other nodes: `stdout.node<k>.txt`). Executors only decide
where that command runs:

- `local`: a subprocess per cell, in its own session so that a Ctrl-C of the harness can stop the
  whole tree (torchrun and its workers) and nothing else.
- `submitit`: one submitit job per cell (`AutoExecutor`: Slurm when `sbatch` is there, else its
  `LocalExecutor`). The job runs the same command; it is checkpointable, so a Slurm timeout or
  preemption requeues it and `detector.run` resumes from `checkpoints/latest.pt`.

The only scheduling is `run_pool`, a bounded in-flight set (submitit's LocalExecutor has no
parallelism cap of its own, ecosystem_anchors section 3.2). No home-made queue beyond that.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from harness.errors import UserError

T = TypeVar("T")

STDOUT_FILE = "stdout.txt"
# Seconds a cell gets between SIGTERM and SIGKILL when the harness is interrupted: long enough for
# detector.run to finish an atomic checkpoint write, short enough for a user holding Ctrl-C.
KILL_GRACE_S = 10.0
# Seconds a preempted cell gets to checkpoint and stop: submitit has Slurm signal the job 90 s before
# its end (`slurm_signal_delay_s`), and the requeue itself needs a few of them.
PREEMPT_GRACE_S = 75.0
# detector.train.engine.STOP_FILE: the cell folder file that asks a running cell to checkpoint and
# stop (a name, not an import: the harness reaches the detector only through its process and files).
STOP_FILE = "STOP"


# In a multi-node cell's argv, the rendezvous address: only the executor knows it (this host for
# local agents, the job's first node on Slurm), so it fills it in when the nodes start.
RDZV_ENDPOINT = "{rdzv_endpoint}"


@dataclass(frozen=True, kw_only=True)
class CellCommand:
    """One cell's process: argv (no shell), extra environment, where its output goes. With `nnodes`
    > 1 the argv is one torchrun agent's, started once per node with `RDZV_ENDPOINT` filled in."""

    cell_dir: Path
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    nnodes: int = 1

    @property
    def stdout_path(self) -> Path:
        return self.cell_dir / STDOUT_FILE

    def node_stdout(self, node: int) -> Path:
        """Node 0 writes `stdout.txt`; the other agents `stdout.node<k>.txt` beside it."""
        return self.stdout_path if node == 0 else self.cell_dir / f"stdout.node{node}.txt"

    def node_argv(self, endpoint: str) -> tuple[str, ...]:
        return tuple(endpoint if a == RDZV_ENDPOINT else a for a in self.argv)


def cell_argv(cell_dir: Path, *, nproc_per_cell: int = 1, nnodes: int = 1, python: str | None = None) -> tuple[str, ...]:
    """The command that runs one cell: detector.run alone, under torchrun for N processes, or, for
    `nnodes` > 1, one torchrun agent per node meeting through a c10d rendezvous."""
    exe = python or sys.executable
    if nproc_per_cell < 1:
        raise UserError(f"--nproc-per-cell: must be >= 1, got {nproc_per_cell}")
    if nnodes < 1:
        raise UserError(f"--nnodes: must be >= 1, got {nnodes}")
    if nnodes > 1:
        # The rendezvous id only has to be the same for the agents of one cell and differ between
        # cells that could meet on one endpoint.
        rdzv_id = f"{cell_dir.name[:40]}-{zlib.crc32(str(cell_dir).encode()):08x}"
        return (
            exe, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_cell),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", RDZV_ENDPOINT, "--rdzv-id", rdzv_id,
            "-m", "detector.run", str(cell_dir),
        )  # fmt: skip
    if nproc_per_cell == 1:
        return (exe, "-m", "detector.run", str(cell_dir))
    return (
        exe, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc_per_cell),
        "-m", "detector.run", str(cell_dir),
    )  # fmt: skip


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


class Handle(Protocol):
    """A started cell: `poll()` is None while it runs, then its exit code; `cancel()` stops it."""

    def poll(self) -> int | None: ...

    def cancel(self) -> None: ...


class Executor(Protocol):
    def submit(self, command: CellCommand, *, keep_fds: Sequence[int] = ()) -> Handle: ...


# --------------------------------------------------------------------------------------------------
# local


def _spawn(command: CellCommand, *, keep_fds: Sequence[int] = (), node: int = 0, endpoint: str | None = None
           ) -> subprocess.Popen[bytes]:
    command.cell_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **command.env}
    argv = command.node_argv(endpoint) if endpoint is not None else command.argv
    # Appended: a resumed or requeued cell keeps the output of its earlier attempts.
    with open(command.node_stdout(node), "ab") as out:
        # start_new_session: the cell and its torchrun workers form their own process group, which
        # `_stop` can terminate as one; a terminal Ctrl-C reaches the harness only, which then
        # stops every cell it started (and only those).
        return subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            pass_fds=tuple(keep_fds),
            preexec_fn=_die_with_parent,
        )


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the harness dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so that a killed harness never leaves a cell training as an orphan that holds
    its lock. The cell's own SIGTERM handling then ends it like a Ctrl-C; its checkpoints stay."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace_s` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class LocalHandle:
    def __init__(self, proc: subprocess.Popen[bytes], grace_s: float) -> None:
        self.proc = proc
        self.grace_s = grace_s

    def poll(self) -> int | None:
        return self.proc.poll()

    def cancel(self) -> None:
        _stop(self.proc, self.grace_s)


class NodesHandle:
    """The torchrun agents of one multi-node cell started here: done when all are, failed as soon
    as one fails (the others are then stopped: their rendezvous would wait for it in vain)."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
        self.procs = procs
        self.grace_s = grace_s

    def poll(self) -> int | None:
        codes = [p.poll() for p in self.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            self.cancel()
            return failed[0]
        return None if None in codes else 0

    def cancel(self) -> None:
        for proc in self.procs:
            _stop(proc, self.grace_s)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(kw_only=True)
class LocalExecutor:
    """Each cell in its own subprocess on this machine; a multi-node cell as one torchrun agent per
    "node", all on this host, meeting at a free local port (how `--nnodes` is tested off a cluster)."""

    grace_s: float = KILL_GRACE_S

    def submit(self, command: CellCommand, *, keep_fds: Sequence[int] = ()) -> Handle:
        # keep_fds: the cell's lock file, so that a cell which outlives a killed harness keeps its
        # folder locked until it exits (flock belongs to the open file, shared with the child).
        if command.nnodes > 1:
            endpoint = f"127.0.0.1:{_free_port()}"
            return NodesHandle([_spawn(command, keep_fds=keep_fds, node=k, endpoint=endpoint) for k in range(command.nnodes)],
                               self.grace_s)
        return LocalHandle(_spawn(command, keep_fds=keep_fds), self.grace_s)


# --------------------------------------------------------------------------------------------------
# submitit


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
            proc = _spawn(self.command, node=job.node, endpoint=f"{job.hostnames[0]}:{port}")
        else:
            proc = _spawn(self.command)
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
            _stop(proc, grace_s=1.0)

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


# --------------------------------------------------------------------------------------------------
# the pool


def run_pool(
    items: Iterable[T],
    *,
    start: Callable[[T], Handle | None],
    finish: Callable[[T, int], None],
    max_in_flight: int = 1,
    poll_s: float = 0.2,
    tick: Callable[[], None] | None = None,
) -> None:
    """Start items while fewer than `max_in_flight` run; call `finish(item, exit_code)` for each.

    `start` prepares an item and returns its handle, or None when there is nothing to run (already
    done, skipped, held by another runner). An exception from `finish` is the caller's to report;
    the pool itself never stops because one cell failed. On KeyboardInterrupt (Ctrl-C, or SIGTERM
    turned into one by the caller) every running item is cancelled and the interrupt re-raised;
    items that finished before keep their results.
    """
    if max_in_flight < 1:
        raise UserError(f"--jobs: must be >= 1, got {max_in_flight}")
    todo = iter(items)
    running: list[tuple[T, Handle]] = []
    exhausted = False
    try:
        while True:
            while not exhausted and len(running) < max_in_flight:
                item = next(todo, None)
                if item is None:
                    exhausted = True
                    break
                handle = start(item)
                if handle is not None:
                    running.append((item, handle))
            if not running:
                if exhausted:
                    return
                continue
            still: list[tuple[T, Handle]] = []
            for item, handle in running:
                code = handle.poll()
                if code is None:
                    still.append((item, handle))
                else:
                    finish(item, code)
            if len(still) == len(running):
                if tick is not None:
                    tick()  # e.g. the live progress line of the running cells
                time.sleep(poll_s)
            running = still
    except BaseException:
        for _item, handle in running:
            handle.cancel()
        raise


def make_executor(
    kind: str,
    *,
    folder: Path,
    nproc_per_cell: int = 1,
    nnodes: int = 1,
    device: str = "cpu",
    timeout_min: int | None = None,
    slurm_partition: str | None = None,
    cluster: str | None = None,
) -> Executor:
    """`local` or `submitit` by name (the `--executor` flag)."""
    if kind == "local":
        return LocalExecutor()
    if kind == "submitit":
        import importlib.util

        if importlib.util.find_spec("submitit") is None:
            raise UserError(
                "--executor submitit: submitit is not installed here; pip install 'frcnn-harness[cluster]' "
                "(nox -s reproduce installs it)"
            )
        return SubmititExecutor(
            folder=folder,
            cluster=cluster or os.environ.get("HARNESS_SUBMITIT_CLUSTER") or None,
            timeout_min=timeout_min or 3 * 24 * 60,
            gpus_per_node=nproc_per_cell if device.startswith("cuda") else 0,
            nodes=nnodes,
            cpus_per_task=None,
            slurm_partition=slurm_partition,
        )
    raise UserError(f"--executor: {kind!r} is not allowed; allowed: {', '.join(EXECUTORS)}")


EXECUTORS = ("local", "submitit")

__all__ = [
    "CellCommand",
    "EXECUTORS",
    "Executor",
    "Handle",
    "LocalExecutor",
    "NodesHandle",
    "RDZV_ENDPOINT",
    "SubmititCell",
    "SubmititExecutor",
    "cell_argv",
    "make_executor",
    "resolve_jobs",
    "run_pool",
    "thread_env",
    "usable_cores",
]
