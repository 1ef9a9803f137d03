"""Runs -> one tidy pandas DataFrame: a row per (cell, seed), published numbers beside measured ones.

Reads every `result.json` of `runs/<matrix>/<profile>/` (through `harness.execute.cells.iter_results`), joins
it with the matrix cell (published Mem / fps / box AP, axes, section), and adds the per-run delta
and verdict (`harness.results.verdicts`). Cells of the matrix without any result appear once, with status
"not run", so that a page or a CSV built from the frame always has every row of the seed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from detector.api import COCO_CATEGORIES, Metrics
from harness.errors import UserError
from harness.execute.cells import cell_dir, iter_results, profile_dir
from harness.matrix.spec import Cell, MatrixSpec
from harness.metrics import METRICS, Measured, finite
from harness.results.verdicts import Scope, judge, other_categories_of, precedence, quirk_ids, scope_of

# Columns of `collect()`, in order (axes columns follow). DESIGN.md's results.csv columns are a subset.
COLUMNS: tuple[str, ...] = (
    "name", "section", "profile", "seed", "status", "error", "reason",
    "box_ap", "mem_gb", "mem_kind", "framework_mem_gb", "fps", "fps_precision", "device", "device_class",
    "published_box_ap", "published_mem_gb", "published_fps", "delta_box_ap", "verdict", "verdict_reason",
    "eval_split", "eval_images", "iters", "epochs", "world_size", "images_per_gpu", "total_batch", "lr_rescaled",
    "resumed_from_iter", "train_time_s", "eval_time_s", "wall_time_s", "train_images_per_s", "s_per_iter",
    "data_root", "image_scale", "proposal_cap", "other_categories", "category_ap", "deviations", "notes", "quirks", "cpu", "cores", "threads", "load_1m",
    "cells_at_once", "start", "git_commit", "git_dirty", "python_version", "torch_version", "torchvision_version",
    "pycocotools_version", "harness_version", "finished_at", "run_dir",
)
RESULTS_CSV_COLUMNS: tuple[str, ...] = (
    "name", "profile", "seed", "status", "box_ap", "mem_gb", "mem_kind", "fps", "device_class",
    "published_box_ap", "published_mem_gb", "published_fps", "delta_box_ap", "verdict", "verdict_reason",
    "eval_split", "quirks", "train_time_s", "eval_time_s", "wall_time_s", "train_images_per_s", "s_per_iter",
    "git_commit", "finished_at",
)


def require_runs(matrix: MatrixSpec, profile: str, runs_dir: Path, *, flag: str = "--runs-dir") -> None:
    """UserError unless `runs_dir` holds at least one run of (matrix, profile): a page, table or
    estimate of nothing but "not run" rows is almost always a mistyped --runs-dir or --profile."""
    matrix.profile(profile)
    if next(iter_results(Path(runs_dir), matrix.name, profile), None) is None:
        where = profile_dir(Path(runs_dir), matrix.name, profile)
        raise UserError(f"{flag} {runs_dir}: no run of {matrix.name} / {profile} (no result.json under {where}); "
                        f"run it first (`harness run {matrix.name} --profile {profile}`) or name the runs root that holds it")


def collect(matrix: MatrixSpec, profile: str, runs_dir: Path) -> pd.DataFrame:
    """One row per (cell, seed) of `profile`, in matrix order then seed order.

    Args:
        matrix: the loaded matrix; profile: a profile name of it (UserError if unknown);
        runs_dir: the runs root (`<repo>/runs` by default), holding `<matrix>/<profile>/<cell>/`.

    Returns:
        A DataFrame with `COLUMNS` plus one column per axis. `notes` and `deviations` hold tuples
        of strings; `seed` is a nullable integer (NA on the "not run" placeholder rows).
    """
    prof = matrix.profile(profile)
    scope = scope_of(prof)
    by_cell: dict[str, list[dict[str, Any]]] = {c.name: [] for c in matrix.cells}
    for result in iter_results(Path(runs_dir), matrix.name, profile):
        name = str(result.get("name", ""))
        try:
            cell = matrix.cell(name)
        except UserError:
            continue  # a folder left from a cell since removed from the matrix: not part of this table
        by_cell[cell.name].append(result)

    rows: list[dict[str, Any]] = []
    selected = {c.name for c in matrix.select(prof.cells)} if prof.cells else None
    for cell in matrix.cells:
        results = sorted(by_cell[cell.name], key=lambda r: int(r.get("seed", 0)))
        if not results:
            why = "no result.json yet" if selected is None or cell.name in selected else f"not in profile {profile}"
            rows.append(_placeholder(cell, profile, why))
            continue
        for result in results:
            seed = int(result.get("seed", 0))
            run_dir = cell_dir(Path(runs_dir), matrix.name, profile, cell.name, seed)
            rows.append(_row(cell, profile, result, run_dir, scope, matrix))
    frame = pd.DataFrame(rows)
    axes = sorted({a for c in matrix.cells for a in c.axes})
    for col in (*COLUMNS, *axes):
        if col not in frame:
            frame[col] = None
    frame = frame[[*COLUMNS, *axes]]
    frame["seed"] = frame["seed"].astype("Int64")
    for col in (*(m.column for m in METRICS), *(m.published_column for m in METRICS), "delta_box_ap"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    return frame


def load_loss_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Training-loss points of every run in `frame`, read from `<run_dir>/log.jsonl`.

    Returns:
        A DataFrame with columns name, seed, iter, loss (one row per logged training step). Lines
        without a numeric `iter` and `loss` (evaluation records, a line cut by a crash) are skipped.
    """
    points: list[dict[str, Any]] = []
    for rec in frame.itertuples(index=False):
        if rec.status == "not run" or not isinstance(rec.run_dir, str):
            continue
        log = Path(rec.run_dir) / "log.jsonl"
        for entry in _jsonl(log):
            it: Any = entry.get("iter")
            loss: Any = entry.get("loss")
            if finite(it) and finite(loss):
                points.append({"name": rec.name, "seed": int(rec.seed), "iter": int(it), "loss": float(loss)})
    return pd.DataFrame(points, columns=["name", "seed", "iter", "loss"])


def loss_trends(curves: pd.DataFrame) -> pd.DataFrame:
    """Did training lower the loss? One row per (name, seed) of `load_loss_curves` output.

    A single logged step is noisy (one batch of two images in the smoke profile), so `loss_start`
    and `loss_end` are the means over the first and the last quarter of the logged points (at least
    one point each); `fell` is `loss_end < loss_start`. Runs with fewer than two points have no trend
    and are left out.
    """
    rows: list[dict[str, Any]] = []
    for (name, seed), group in curves.sort_values("iter").groupby(["name", "seed"], sort=False):
        losses = group["loss"].to_numpy()
        if len(losses) < 2:
            continue
        k = max(1, len(losses) // 4)
        start, end = float(losses[:k].mean()), float(losses[-k:].mean())
        rows.append({"name": name, "seed": int(seed), "loss_start": start, "loss_end": end, "fell": end < start})
    return pd.DataFrame(rows, columns=["name", "seed", "loss_start", "loss_end", "fell"])


def results_csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` reduced to the results.csv columns (DESIGN.md's, then a few that explain them)."""
    return frame[list(RESULTS_CSV_COLUMNS)].copy()


def _placeholder(cell: Cell, profile: str, why: str) -> dict[str, Any]:
    notes = cell.recipe_notes
    return {
        **_cell_fields(cell, profile),
        "seed": None, "status": "not run", "reason": why, "verdict": "not run", "verdict_reason": why,
        "notes": notes, "quirks": " ".join(quirk_ids(notes)), "deviations": (),
    }


def _row(cell: Cell, profile: str, result: dict[str, Any], run_dir: Path, scope: Scope, matrix: MatrixSpec) -> dict[str, Any]:
    rec = Metrics.from_dict(result.get("metrics"))  # metrics.json as result.json copied it
    prov: dict[str, Any] = result.get("provenance") or {}
    versions: dict[str, Any] = prov.get("versions") or {}
    machine: dict[str, Any] = prov.get("machine") or {}
    spec = _read_json(run_dir / "spec.json")
    spec_run = spec.get("run") or {}
    notes = tuple(result.get("notes") or ()) or cell.recipe_notes
    status = str(result.get("status", "failed"))
    row: dict[str, Any] = {
        **_cell_fields(cell, profile),
        "seed": int(result.get("seed", 0)),
        "status": status,
        "error": result.get("error"),
        "reason": result.get("reason"),
        **{m.column: _float(getattr(rec, m.field)) if status == "ok" else None for m in METRICS},
        "mem_kind": rec.mem_kind,
        "framework_mem_gb": _float(rec.framework_mem_gb) if status == "ok" else None,
        "fps_precision": rec.fps_precision,
        "device": rec.device or prov.get("device"),
        "device_class": rec.device_class or prov.get("device_class"),
        "eval_split": rec.eval_split,
        "eval_images": rec.eval_images,
        "iters": rec.iters,
        "epochs": rec.epochs,
        "world_size": _or(rec.world_size, prov.get("world_size")),
        "images_per_gpu": _or(rec.images_per_gpu, prov.get("images_per_gpu")),
        "total_batch": rec.total_batch,
        "lr_rescaled": _or(rec.lr_rescaled, prov.get("lr_rescaled")),
        "resumed_from_iter": prov.get("resumed_from_iter", rec.resumed_from_iter),
        "train_time_s": rec.train_time_s,
        "eval_time_s": rec.eval_time_s,
        "wall_time_s": prov.get("wall_time_s"),
        **_throughput(run_dir / "log.jsonl", rec, status),
        "cpu": machine.get("cpu"),
        "cores": machine.get("cores"),
        "threads": machine.get("threads", rec.threads),
        "load_1m": machine.get("load_1m"),
        "cells_at_once": machine.get("cells_at_once"),
        "start": prov.get("start"),  # "fork server" or "new process" (None: written before it was recorded)
        "data_root": spec_run.get("data_root"),
        "image_scale": _scale(spec_run.get("image_scale")),
        "proposal_cap": spec_run.get("proposal_cap"),
        "other_categories": other_categories_of(_trained_categories(result, spec), recipe_categories(cell)),
        "category_ap": rec.category_ap if status == "ok" else None,  # name -> AP fraction (None: no ground truth)
        # The harness's data notes (repairs, drops, the categories trained) are deviations of the run too.
        "deviations": rec.deviations + tuple(n for n in notes if n.startswith("data: ")),
        "notes": notes,
        "quirks": " ".join(quirk_ids(notes)),
        "git_commit": prov.get("git_commit"),
        "git_dirty": prov.get("git_dirty"),
        "python_version": versions.get("python"),
        "torch_version": versions.get("torch"),
        "torchvision_version": versions.get("torchvision"),
        "pycocotools_version": versions.get("pycocotools"),
        "harness_version": versions.get("harness"),
        "finished_at": prov.get("finished_at"),
        "run_dir": str(run_dir),
    }
    row["verdict"], row["verdict_reason"], ap_compared = _run_verdict(row, cell, status, scope, matrix)
    # A delta only where AP is compared: -35.6 beside a 12-iteration smoke run reads like a result.
    if ap_compared and row["box_ap"] is not None and cell.published.box_ap is not None:
        row["delta_box_ap"] = round(row["box_ap"] - cell.published.box_ap, 3)
    return row


def _run_verdict(row: dict[str, Any], cell: Cell, status: str, scope: Scope, matrix: MatrixSpec) -> tuple[str, str, bool]:
    """The verdict of a single run (one seed), its reason, and whether its box AP was compared;
    `harness.results.compare` judges a cell over its seeds."""
    first = precedence(n_ok=int(status == "ok"), n_failed=int(status not in ("ok", "skipped")))
    if first == "fail":  # a crash or a non-finite loss, whatever the profile: the cell does not work
        return "fail", f"run failed: {_last_line(row['error'])}", False
    if first == "not run":
        return "not run", f"skipped: {row['reason'] or 'no reason given'}", False
    measured = {
        m.key: Measured(mean=row[m.column], low=row[m.column], high=row[m.column], context=row[m.context] if m.context else None)
        for m in METRICS if row[m.column] is not None
    }  # fmt: skip
    verdict, per_metric, reasons = judge(scope=scope, measured=measured, eval_split=row["eval_split"],
                                         published=cell.published, tolerances=matrix.tolerances,
                                         other_categories=row["other_categories"], eval_images=row["eval_images"])  # fmt: skip
    return verdict, "; ".join(reasons), per_metric["box_ap"] != "not comparable"


def _throughput(log: Path, rec: Metrics, status: str) -> dict[str, float | None]:
    """Training images / s (all ranks, data loading included) and seconds per iteration.

    From the log when it has two or more windows: the first logged window is left out, since it
    holds the one-off costs (cuDNN autotuning, CUDA context, data-worker start-up) that a 10-iteration
    hardware run would otherwise spread over every iteration (on the H200: 1.38 s for the first
    R-50-FPN iteration, ~0.06 s for the next). Else the whole-loop rate from metrics.json.
    """
    if status != "ok":
        return {"train_images_per_s": None, "s_per_iter": None}
    rows = sorted((e for e in _jsonl(log) if finite(e.get("iter")) and finite(e.get("time"))), key=lambda e: e["iter"])
    batch = _float(rec.total_batch)
    if len(rows) >= 2 and batch is not None:
        iters = sum(b["iter"] - a["iter"] for a, b in zip(rows, rows[1:]))
        seconds = sum((b["iter"] - a["iter"]) * float(b["time"]) for a, b in zip(rows, rows[1:]))
        if iters > 0 and seconds > 0:
            return {"train_images_per_s": round(iters * batch / seconds, 2), "s_per_iter": round(seconds / iters, 4)}
    return {"train_images_per_s": _float(rec.train_images_per_s), "s_per_iter": _float(rec.s_per_iter)}


def recipe_categories(cell: Cell) -> tuple[str, ...]:
    """The category names the cell's recipe trains: its own list (the COCO-subset finetunes), else COCO's 80."""
    return tuple(cell.config.data.classes) or tuple(name for _id, name, _super in COCO_CATEGORIES)


def _trained_categories(result: dict[str, Any], spec: dict[str, Any]) -> tuple[str, ...]:
    """What the run trained: result.json's `categories` (the planner's, from the checked data); a run
    written before they were recorded has at least its config's own list (`--classes dataset`)."""
    recorded = result.get("categories") or ((spec.get("config") or {}).get("data") or {}).get("classes") or ()
    return tuple(str(c) for c in recorded)


def _cell_fields(cell: Cell, profile: str) -> dict[str, Any]:
    return {
        "name": cell.name, "section": cell.section, "profile": profile,
        **{m.published_column: getattr(cell.published, m.column) for m in METRICS}, **dict(cell.axes),
    }


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run may be cut short
            if isinstance(entry, dict):
                yield entry


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}



def _or(value: Any, fallback: Any) -> Any:
    """`value` unless metrics.json lacks it (None), then what the runner recorded."""
    return value if value is not None else fallback


def _float(x: Any) -> float | None:
    return float(x) if finite(x) else None


def _scale(x: Any) -> tuple[int, int] | None:
    """A profile's (long, short) image-scale override from spec.json; None = the recipe's."""
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) and len(x) == 2 else None


def _last_line(text: Any) -> str:
    """The last non-empty line of an error text (a traceback ends with the exception)."""
    lines = [ln for ln in str(text or "unknown error").strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "unknown error"


__all__ = ["COLUMNS", "RESULTS_CSV_COLUMNS", "collect", "load_loss_curves", "loss_trends", "require_runs", "results_csv_frame"]
