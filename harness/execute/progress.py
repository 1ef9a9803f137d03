"""Live progress of a running matrix: one line per running cell now and then, with the matrix's ETA.

A cell's process appends a JSON line per logged iteration to `CELL_DIR/log.jsonl` (iteration,
`max_iters`, loss, seconds per iteration); `Progress.lines()` reads the newest line of each running
cell and says where it is, and how long the cell and the whole matrix have left. The matrix ETA is
the mean wall time of the cells finished in this run times the cells still to start, plus what the
running ones have left (before any cell finished: the running cell's own projected total).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG = "log.jsonl"


def last_log_row(log: Path, *, max_bytes: int = 8192) -> dict[str, Any] | None:
    """The last complete JSON line of a log (read from its end: logs of full runs grow large)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written, or cut by the seek
        if isinstance(row, dict) and isinstance(row.get("iter"), int):
            return row
    return None


def clock(seconds: float) -> str:
    """`h:mm:ss` or `m:ss`."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


@dataclass
class Progress:
    """Bookkeeping of one `run_jobs` call for the live lines.

    Args:
        total: cells (x seeds) in the run; every_s: seconds between two lines of one cell.
    """

    total: int
    jobs: int = 1  # cells in flight at once: the waiting ones run that many at a time
    every_s: float = 15.0
    now: Callable[[], float] = time.monotonic
    started: dict[str, tuple[Path, float]] = field(default_factory=dict)  # key -> (folder, t0); key: unique per job
    walls: list[float] = field(default_factory=list)  # wall times of cells run (not cached) to the end
    settled: int = 0  # finished, cached, skipped or busy: nothing left to do for them here
    _last: dict[str, tuple[float, int]] = field(default_factory=dict)  # label -> (time printed, iter)

    def start(self, label: str, folder: Path) -> None:
        self.started[label] = (folder, self.now())

    def finish(self, label: str, *, ran: bool) -> None:
        folder_t0 = self.started.pop(label, None)
        self._last.pop(label, None)
        if ran and folder_t0 is not None:
            self.walls.append(self.now() - folder_t0[1])
        self.settled += 1

    def lines(self) -> list[tuple[str, str]]:
        """(label, text) for the running cells that logged a new iteration and were not shown for `every_s`."""
        out: list[tuple[str, str]] = []
        for label, (folder, t0) in list(self.started.items()):
            row = last_log_row(folder / LOG)
            if row is None:
                continue
            printed_at, printed_iter = self._last.get(label, (-1e18, -1))
            if row["iter"] == printed_iter or self.now() - printed_at < self.every_s:
                continue
            self._last[label] = (self.now(), row["iter"])
            out.append((label, f"{self._cell_text(row, t0)} | matrix ETA {self._matrix_eta()}"))
        return out

    def _cell_text(self, row: dict[str, Any], t0: float) -> str:
        it, total = row["iter"], row.get("max_iters")
        parts = [f"iter {it}/{total}" if isinstance(total, int) else f"iter {it}"]
        if isinstance(row.get("loss"), (int, float)):
            parts.append(f"loss {row['loss']:.3f}")
        per_iter = row.get("time")
        if isinstance(per_iter, (int, float)) and per_iter > 0:
            batch = row.get("total_batch")
            if isinstance(batch, int):
                parts.append(f"{batch / per_iter:.1f} img/s")
            else:
                parts.append(f"{per_iter:.2f} s/iter")
            if isinstance(total, int):
                parts.append(f"ETA {clock((total - it) * per_iter)}")
        parts.append(f"elapsed {clock(self.now() - t0)}")
        return ", ".join(parts)

    def _projected_total(self, label: str) -> float | None:
        folder, t0 = self.started[label]
        row = last_log_row(folder / LOG)
        if row is None or not isinstance(row.get("max_iters"), int) or not isinstance(row.get("time"), (int, float)):
            return None
        return (self.now() - t0) + (row["max_iters"] - row["iter"]) * float(row["time"])

    def _matrix_eta(self) -> str:
        running = list(self.started)
        waiting = max(0, self.total - self.settled - len(running))
        if self.walls:
            per_cell = sum(self.walls) / len(self.walls)
        else:
            projected = [p for p in (self._projected_total(label) for label in running) if p is not None]
            if not projected:
                return "unknown"
            per_cell = sum(projected) / len(projected)
        left = sum(max(0.0, per_cell - (self.now() - t0)) for _folder, t0 in self.started.values())
        left = left / max(1, min(self.jobs, len(running) or 1))
        return f"~{clock(left + waiting * per_cell / max(1, self.jobs))} ({waiting} to start)"


__all__ = ["Progress", "clock", "last_log_row"]
