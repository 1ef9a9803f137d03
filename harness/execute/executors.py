"""Where a cell's process runs: here (a bounded pool of subprocesses) or on Slurm through submitit.

A cell is always the same command, `python -m detector.run CELL_DIR` (ARCHITECTURE.md, "the one
door"), or `python -m torch.distributed.run --standalone --nproc-per-node N -m detector.run CELL_DIR`
for `--nproc-per-cell N`, or one torchrun agent per node for `--nnodes N` (c10d rendezvous); its stdout
and stderr go to `CELL_DIR/stdout.txt` (other nodes: `stdout.node<k>.txt`). Executors only decide
where that command runs:

- `local`: a process per cell, in its own session so that a Ctrl-C of the harness can stop the
  whole tree (torchrun and its workers) and nothing else. A single-process cell is forked from a
  warm `detector.forkserver` (`harness.execute.forked`: torch imported once per run, not per cell);
  any other is a new subprocess.
- `submitit`: one submitit job per cell (`harness.execute.slurm`). The job runs the same command;
  it is checkpointable, so a Slurm timeout or preemption requeues it and `detector.run` resumes
  from `checkpoints/latest.pt`.

The only scheduling is `run_pool`, a bounded in-flight set (submitit's LocalExecutor has no
parallelism cap of its own, ecosystem_anchors section 3.2). No home-made queue beyond that. How
many cells run at once, and their threads: `harness.execute.resources`.
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
from typing import Protocol, TypeVar

from harness.errors import UserError
from harness.execute.forked import ForkedHandle, ForkServer, ForkServerError

T = TypeVar("T")

STDOUT_FILE = "stdout.txt"
# Seconds a cell gets between SIGTERM and SIGKILL when the harness is interrupted: long enough for
# detector.run to finish an atomic checkpoint write, short enough for a user holding Ctrl-C.
KILL_GRACE_S = 10.0
# detector.train.stopping.STOP_FILE: the cell folder file that asks a running cell to checkpoint and
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


class Handle(Protocol):
    """A started cell: `poll()` is None while it runs, then its exit code; `cancel()` stops it."""

    def poll(self) -> int | None: ...

    def cancel(self) -> None: ...


class Executor(Protocol):
    def submit(self, command: CellCommand, *, keep_fds: Sequence[int] = ()) -> Handle: ...

    def close(self) -> None:
        """Release what the executor holds between cells (the local fork server)."""


# --------------------------------------------------------------------------------------------------
# local


def spawn_cell(command: CellCommand, *, keep_fds: Sequence[int] = (), node: int = 0, endpoint: str | None = None
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


def stop_tree(proc: subprocess.Popen[bytes], grace_s: float) -> None:
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
        stop_tree(self.proc, self.grace_s)


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
            stop_tree(proc, self.grace_s)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fork_server_wanted() -> bool:
    """`HARNESS_FORK_SERVER=0` starts every cell as a new interpreter (harness.execute.forked)."""
    return os.environ.get("HARNESS_FORK_SERVER", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(kw_only=True)
class LocalExecutor:
    """Each cell in its own process on this machine; a multi-node cell as one torchrun agent per
    "node", all on this host, meeting at a free local port (how `--nnodes` is tested off a cluster).

    A single-process `python -m <fork_modules>` cell is forked from a warm `detector.forkserver`
    (`harness.execute.forked`) when its interpreter and whole environment equal the server's, which
    starts with the first such cell; every other cell, and every cell once the server failed, is a
    new subprocess. `note` says once why forking stopped.
    """

    grace_s: float = KILL_GRACE_S
    fork: bool = field(default_factory=fork_server_wanted)
    fork_modules: tuple[str, ...] = ("detector.run",)
    note: Callable[[str], None] = field(default=lambda line: print(f"harness: {line}", file=sys.stderr, flush=True))
    _server: ForkServer | None = field(default=None, init=False, repr=False)

    def submit(self, command: CellCommand, *, keep_fds: Sequence[int] = ()) -> Handle:
        # keep_fds: the cell's lock file, so that a cell which outlives a killed harness keeps its
        # folder locked until it exits (flock belongs to the open file, shared with the child).
        if command.nnodes > 1:
            endpoint = f"127.0.0.1:{_free_port()}"
            return NodesHandle([spawn_cell(command, keep_fds=keep_fds, node=k, endpoint=endpoint) for k in range(command.nnodes)],
                               self.grace_s)
        server = self._fork_server(command)
        if server is not None:
            command.cell_dir.mkdir(parents=True, exist_ok=True)
            try:
                ident = server.start(module=command.argv[2], args=command.argv[3:], stdout=command.stdout_path,
                                     keep_fds=keep_fds)  # fmt: skip
                return ForkedHandle(server, ident, self.grace_s)
            except ForkServerError as exc:
                self._give_up(f"the fork server failed ({exc})")
        return LocalHandle(spawn_cell(command, keep_fds=keep_fds), self.grace_s)

    def _fork_server(self, command: CellCommand) -> ForkServer | None:
        """The server that may fork this cell (started now if it is the first), or None."""
        argv = command.argv
        if not self.fork or len(argv) < 3 or argv[1] != "-m" or argv[2] not in self.fork_modules:
            return None
        env = {**os.environ, **command.env}
        if self._server is None:
            try:
                self._server = ForkServer(python=argv[0], env=env, preexec_fn=_die_with_parent)
            except (ForkServerError, OSError) as exc:
                self._give_up(f"cannot start the fork server ({exc})")
                return None
        if self._server.failure is not None:
            self._give_up(f"the fork server stopped ({self._server.failure})")
            return None
        return self._server if self._server.python == argv[0] and self._server.env == env else None

    def _give_up(self, why: str) -> None:
        self.fork = False
        self.note(f"{why}; cells start as new processes")

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


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


__all__ = [
    "CellCommand",
    "Executor",
    "Handle",
    "LocalExecutor",
    "NodesHandle",
    "RDZV_ENDPOINT",
    "cell_argv",
    "fork_server_wanted",
    "run_pool",
    "spawn_cell",
    "stop_tree",
]
