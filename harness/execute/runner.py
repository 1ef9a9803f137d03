"""Running a list of cell jobs: lock, skip what is finished, start each cell in its own process, record.

The store it reads and writes (cell folders, the ledger, locks, atomic JSON) is `harness.execute.cells`.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from detector.api import Metrics
from harness.execute.cells import (
    METRICS,
    RESULT,
    SPEC,
    STDOUT,
    CellLock,
    archive_outputs,
    canonical_json,
    cell_dir,
    check_name,
    config_hash,
    finished_result,
    iter_results,
    profile_dir,
    read_json,
    tail,
    write_json_atomic,
)
from harness.execute.executors import CellCommand, Executor, Handle, cell_argv, run_pool
from harness.execute.progress import Progress
from harness.execute.provenance import cell_provenance, now_iso


@dataclass(frozen=True, kw_only=True)
class CellJob:
    """One (cell, seed) to run: where, what, and whether the detector can build it at all."""

    name: str
    matrix: str
    profile: str
    seed: int
    folder: Path
    spec: dict[str, Any]  # {"config": DetectorConfig.to_dict() or None, "run": RunConfig.to_dict()}
    axes: dict[str, str]
    notes: tuple[str, ...] = ()
    # The category names the cell trains, in label order (the file's when the recipe names none);
    # empty when the data was not checked before planning. Judged against the recipe's at compare time.
    categories: tuple[str, ...] = ()
    skip_reason: str | None = None  # set: record `skipped` with this reason, run nothing

    @property
    def label(self) -> str:
        return self.name if self.seed == 0 else f"{self.name} (seed {self.seed})"

    @property
    def config_hash(self) -> str:
        return config_hash(self.spec)


@dataclass(kw_only=True)
class RunSummary:
    """What a `run_jobs` call did, cell label -> status ("ok", "failed", "skipped")."""

    statuses: dict[str, str] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)  # finished before, not run again

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses.values() if s == status)


@dataclass(kw_only=True)
class _Attempt:
    job: CellJob
    lock: CellLock
    started_at: str
    t0: float


def make_result(
    job: CellJob,
    *,
    status: str,
    metrics: dict[str, Any],
    provenance: dict[str, Any],
    error: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """A result.json object (ARCHITECTURE.md schema)."""
    return {
        "name": job.name,
        "matrix": job.matrix,
        "profile": job.profile,
        "seed": job.seed,
        "status": status,
        "error": error,
        "reason": reason,
        "config_hash": job.config_hash,
        "axes": dict(job.axes),
        "metrics": {k: v for k, v in metrics.items() if k not in ("status", "error")},
        "provenance": provenance,
        "notes": list(job.notes),
        "categories": list(job.categories),
    }


def outcome(code: int, metrics: dict[str, Any] | None, stdout: Path) -> tuple[str, str | None]:
    """(status, error) of a finished cell process from its exit code and metrics.json.

    Exit 0 with an ok metrics.json is ok; exit 3 (non-finite loss) carries its error in
    metrics.json; any other exit is a crash whose error is the tail of stdout.txt.
    """
    rec = Metrics.from_dict(metrics) if metrics is not None else None
    if code == 0 and rec is not None and rec.status == "ok":
        return "ok", None
    if rec is not None and rec.status == "failed" and rec.error:
        return "failed", rec.error
    if code == 0:
        what = "metrics.json missing" if metrics is None else f"metrics.json status {rec.status if rec else None!r}"
        return "failed", f"detector.run exited 0 but {what}\n{tail(stdout)}".rstrip()
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit code {code}"
    return "failed", f"detector.run {how}\n{tail(stdout)}".rstrip()


def run_jobs(
    jobs: list[CellJob],
    *,
    executor: Executor,
    base_provenance: dict[str, Any],
    nproc_per_cell: int = 1,
    nnodes: int = 1,
    max_in_flight: int = 1,
    force: bool = False,
    env: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
    argv: Callable[[Path], tuple[str, ...]] | None = None,
    progress_s: float = 15.0,
) -> RunSummary:
    """Run cells through `executor`, at most `max_in_flight` at once, writing each result.json.

    Finished cells (same config hash, ok / skipped) are not run again unless `force`. A cell that
    fails is recorded and the others go on. Cells held by another runner are skipped at first, then
    waited for at the end and their result taken as it is. SIGTERM is handled like Ctrl-C: running
    cells are stopped, finished results stay, and KeyboardInterrupt propagates to the caller.

    Args:
        argv: the command of a cell folder; default `cell_argv(folder, nproc_per_cell=..., nnodes=...)`.
        progress_s: seconds between two live progress lines of a running cell (`harness.execute.progress`).
    """
    summary = RunSummary()
    width = len(str(len(jobs)))
    number = {id(job): i + 1 for i, job in enumerate(jobs)}
    make_argv = argv or (lambda folder: cell_argv(folder, nproc_per_cell=nproc_per_cell, nnodes=nnodes))
    active: dict[int, tuple[_Attempt, Handle]] = {}
    busy: list[CellJob] = []
    progress = Progress(total=len(jobs), jobs=max_in_flight, every_s=progress_s)
    by_key = {str(job.folder): job for job in jobs}  # folders are unique; labels are not (regression suites)

    def tick() -> None:
        for key, text in progress.lines():
            say(by_key[key], "train", text)

    def say(job: CellJob, what: str, text: str = "") -> None:
        log(f"[{number[id(job)]:>{width}}/{len(jobs)}] {what:<7} {job.label}" + (f": {text}" if text else ""))

    def provenance(job: CellJob, metrics: dict[str, Any], started_at: str, wall: float, start: str = "new process"
                   ) -> dict[str, Any]:  # fmt: skip
        run = job.spec.get("run") or {}
        return cell_provenance(
            base_provenance, metrics=metrics, run=run, nproc=nproc_per_cell * nnodes,
            started_at=started_at, finished_at=now_iso(), wall_time_s=wall, start=start,
        )  # fmt: skip

    def start(job: CellJob, *, after_wait: bool = False) -> Handle | None:
        lock = CellLock(job.folder)
        if not lock.acquire(blocking=after_wait):
            who = lock.holder()
            say(job, "busy", f"another runner ({who or 'unknown'}) holds it; waiting for it at the end")
            busy.append(job)
            return None
        try:
            handle = prepare(job, lock, after_wait)
        except BaseException:
            lock.release()
            raise
        if handle is None:
            lock.release()
        return handle

    def prepare(job: CellJob, lock: CellLock, after_wait: bool) -> Handle | None:
        done = finished_result(job.folder, job.config_hash)
        if after_wait and done is None:
            # Another runner just finished this cell; take its result (even failed), never run twice.
            other = read_json(job.folder / RESULT)
            done = other if other and other.get("config_hash") == job.config_hash else None
        # A cell skipped because the detector could not build it runs once the detector can.
        now_buildable = done is not None and done.get("status") == "skipped" and job.skip_reason is None
        if done is not None and not force and not now_buildable:
            summary.statuses[job.label] = str(done.get("status"))
            summary.cached.append(job.label)
            say(job, "done", f"{done.get('status')} before under the same config {job.config_hash[:12]}")
            progress.finish(str(job.folder), ran=False)
            return None
        old = read_json(job.folder / SPEC)
        if force or (old is not None and config_hash(old) != job.config_hash):
            archive_outputs(job.folder)  # never resume a checkpoint of another config
        for name in (RESULT, METRICS):
            (job.folder / name).unlink(missing_ok=True)  # a crash must not leave an old attempt's numbers
        write_json_atomic(job.folder / SPEC, job.spec)
        if job.skip_reason is not None:
            prov = provenance(job, {}, now_iso(), 0.0)
            result = make_result(job, status="skipped", metrics={}, provenance=prov, reason=job.skip_reason)
            write_json_atomic(job.folder / RESULT, result)
            summary.statuses[job.label] = "skipped"
            say(job, "skipped", job.skip_reason)
            progress.finish(str(job.folder), ran=False)
            return None
        say(job, "start")
        attempt = _Attempt(job=job, lock=lock, started_at=now_iso(), t0=time.monotonic())
        command = CellCommand(cell_dir=job.folder, argv=make_argv(job.folder), env=dict(env or {}), nnodes=nnodes)
        handle = executor.submit(command, keep_fds=() if lock.fd is None else (lock.fd,))
        active[id(job)] = (attempt, handle)
        progress.start(str(job.folder), job.folder)
        return handle

    def finish(job: CellJob, code: int) -> None:
        attempt, handle = active.pop(id(job))
        try:
            wall = time.monotonic() - attempt.t0
            metrics = read_json(job.folder / METRICS)
            status, error = outcome(code, metrics, job.folder / STDOUT)
            job_error = getattr(handle, "error", None)
            if status == "failed" and job_error and metrics is None:
                error = f"{job_error}\n{error}"
            prov = provenance(job, metrics or {}, attempt.started_at, wall, getattr(handle, "start", "new process"))
            result = make_result(job, status=status, metrics=metrics or {}, provenance=prov, error=error)
            write_json_atomic(job.folder / RESULT, result)
            summary.statuses[job.label] = status
            if status == "ok":
                detail = f"box AP {(metrics or {}).get('box_ap')}"
            else:
                # The last line of a traceback tail is the exception; of a metrics error, the error.
                detail = (error or "").strip().splitlines()[-1] if error and error.strip() else ""
            progress.finish(str(job.folder), ran=True)
            say(job, status, f"{wall:.1f} s" + (f", {detail}" if detail else ""))
        finally:
            attempt.lock.release()

    previous = _sigterm_as_interrupt()
    try:
        run_pool(jobs, start=start, finish=finish, max_in_flight=max_in_flight, tick=tick)
        waiting = list(busy)
        busy.clear()
        run_pool(waiting, start=lambda job: start(job, after_wait=True), finish=finish, max_in_flight=max_in_flight,
                 tick=tick)  # fmt: skip
    finally:
        # run_pool has cancelled whatever still ran; their folders get no result.json (they resume).
        for attempt, _handle in active.values():
            attempt.lock.release()
        active.clear()
        _restore_sigterm(previous)
    return summary


def _sigterm_as_interrupt() -> Any:
    """Turn SIGTERM into KeyboardInterrupt (main thread only) so both take the same cleanup path."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


__all__ = [
    "CellJob",
    "CellLock",
    "RunSummary",
    "archive_outputs",
    "canonical_json",
    "cell_dir",
    "check_name",
    "config_hash",
    "finished_result",
    "iter_results",
    "make_result",
    "outcome",
    "profile_dir",
    "read_json",
    "run_jobs",
    "tail",
    "write_json_atomic",
]
