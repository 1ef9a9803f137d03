"""harness.execute.progress: the live line of a running cell and the matrix ETA, on a fake clock."""

from __future__ import annotations

import json
from pathlib import Path

from harness.execute.progress import Progress, clock, last_log_row


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _log(folder: Path, *rows: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.jsonl", "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def test_clock_and_last_row(tmp_path: Path) -> None:
    assert clock(5) == "0:05" and clock(3725) == "1:02:05"
    _log(tmp_path, {"iter": 1, "loss": 2.0}, {"iter": 2, "loss": 1.5})
    with open(tmp_path / "log.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"iter": 3, "lo')  # a line being written
    assert last_log_row(tmp_path / "log.jsonl") == {"iter": 2, "loss": 1.5}
    assert last_log_row(tmp_path / "missing.jsonl") is None


def test_cell_line_and_matrix_eta(tmp_path: Path) -> None:
    t = Clock()
    p = Progress(total=4, every_s=10.0, now=t)
    p.start("a", tmp_path / "a")
    assert p.lines() == []  # nothing logged yet
    t.t = 4.0
    _log(tmp_path / "a", {"iter": 2, "max_iters": 10, "total_batch": 2, "loss": 1.25, "time": 0.5})
    [(label, text)] = p.lines()
    # 8 iterations left at 0.5 s: 0:04; the cell's projected total 4 + 4 = 8 s; 3 cells waiting -> 24 s + 4 s.
    assert label == "a" and text == "iter 2/10, loss 1.250, 4.0 img/s, ETA 0:04, elapsed 0:04 | matrix ETA ~0:28 (3 to start)"
    assert p.lines() == []  # same iteration: nothing new
    t.t = 6.0
    _log(tmp_path / "a", {"iter": 6, "max_iters": 10, "total_batch": 2, "loss": 1.0, "time": 0.5})
    assert p.lines() == []  # new iteration, but shown less than every_s ago
    t.t = 9.0
    p.finish("a", ran=True)  # took 9 s: the mean of finished cells now drives the ETA
    p.finish("b", ran=False)  # cached: settled, not timed
    p.start("c", tmp_path / "c")
    t.t = 12.0
    _log(tmp_path / "c", {"iter": 1, "max_iters": 10, "total_batch": 2, "loss": 3.0, "time": 1.0})
    [(label, text)] = p.lines()
    # c has 9 - 3 = 6 s of its mean left, 1 cell waiting: 6 + 9 = 15 s.
    assert label == "c" and text.endswith("| matrix ETA ~0:15 (1 to start)")
