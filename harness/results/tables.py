"""One profile's results, read once and handed on: the page, results.csv, the metafile and the
terminal summary of `harness reproduce` / `harness report` all take the same `Results`.

Reading is the expensive part (every result.json, spec.json and log.jsonl of the profile), and
computing a frame twice invites two answers; `gather` does each step once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.matrix.spec import MatrixSpec
from harness.results.collect import collect, load_loss_curves, loss_trends
from harness.results.compare import compare_frame


@dataclass(frozen=True, kw_only=True)
class Results:
    matrix: MatrixSpec
    profile: str
    runs_dir: Path
    runs: pd.DataFrame  # `collect()`: one row per (cell, seed)
    compared: pd.DataFrame  # `compare_frame()`: one row per cell, with its verdict
    curves: pd.DataFrame  # `load_loss_curves()`: the training-loss points of every run
    trends: pd.DataFrame  # `loss_trends()`: whether each run's loss fell


def gather(matrix: MatrixSpec, profile: str, runs_dir: Path) -> Results:
    """Read the runs of `profile` under `runs_dir` and derive every table from them, once each."""
    runs = collect(matrix, profile, Path(runs_dir))
    curves = load_loss_curves(runs)
    return Results(matrix=matrix, profile=profile, runs_dir=Path(runs_dir), runs=runs,
                   compared=compare_frame(runs, matrix, profile), curves=curves, trends=loss_trends(curves))  # fmt: skip


__all__ = ["Results", "gather"]
