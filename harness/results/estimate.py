"""`harness estimate`: what reproducing a matrix's full recipes costs, from measured training throughput.

For each cell: GPU-hours = real epochs x training images / (measured images per second per GPU) /
3600, where the throughput is the `train_images_per_s` of the cell's run (normally the `hardware`
profile: full-scale images, the recipe's 2 images per GPU, data loading included). The recipe's
total batch of 16 on 8 GPUs keeps 2 images per GPU, so with linear data-parallel scaling the
GPU-hours do not depend on the number of GPUs; the wall-clock time on N GPUs is GPU-hours / N
(cells one after another; an optimistic bound: no evaluation, no checkpoint or start-up time, no
scaling loss).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import UserError
from harness.matrix.spec import MatrixSpec
from harness.results.collect import collect
from harness.text import num, table

# COCO train2017 images with at least one annotation: what mmdet trains on (filter_empty_gt=True).
COCO_TRAIN_IMAGES = 117_266
# Smaller training sets of the class subsets (images of train2017 holding the classes); None: unknown,
# the full set is used and the estimate is marked an upper bound.
SUBSET_TRAIN_IMAGES: dict[str, int | None] = {"coco": COCO_TRAIN_IMAGES}


def gpu_hours(*, epochs: int, images: int, images_per_s: float) -> float:
    """GPU-hours of `epochs` passes over `images` at `images_per_s` per GPU."""
    if images_per_s <= 0:
        raise ValueError(f"images_per_s must be positive, got {images_per_s}")
    return epochs * images / images_per_s / 3600.0


def estimate(matrix: MatrixSpec, profile: str, runs_dir: Path, *, gpus: int = 8) -> pd.DataFrame:
    """One row per cell: epochs, training images, measured images/s, GPU-hours, wall hours on `gpus`."""
    return estimate_frame(matrix, collect(matrix, profile, Path(runs_dir)), gpus=gpus)


def estimate_frame(matrix: MatrixSpec, runs: pd.DataFrame, *, gpus: int = 8) -> pd.DataFrame:
    """`estimate` from a `collect()` frame already in hand (the page passes its own). Only runs that
    train as the full recipe does count (its image scale, uncapped proposal counts): a smoke run's
    160x128 images say nothing about a 1333x800 epoch. `left_out` says why a cell's runs did not."""
    ok = runs[(runs["status"] == "ok") & runs["train_images_per_s"].notna()]
    why_not = ok.apply(_not_the_recipe, axis=1) if len(ok) else pd.Series(dtype=object)
    rows: list[dict[str, Any]] = []
    for cell in matrix.cells:
        runs_of_cell = ok[ok["name"] == cell.name]
        mine = runs_of_cell[why_not[runs_of_cell.index].isna()] if len(runs_of_cell) else runs_of_cell
        rate = float(mine["train_images_per_s"].mean()) if len(mine) else math.nan
        per_gpu = rate / float(mine["world_size"].fillna(1).mean()) if len(mine) else math.nan
        classes = dict(cell.axes).get("classes", "coco")
        images = SUBSET_TRAIN_IMAGES.get(classes)
        epochs = cell.epochs
        hours = gpu_hours(epochs=epochs, images=images or COCO_TRAIN_IMAGES, images_per_s=per_gpu) if per_gpu > 0 else math.nan
        rows.append({
            "name": cell.name, "epochs": epochs, "train_images": images or COCO_TRAIN_IMAGES,
            "upper_bound": images is None, "images_per_s_per_gpu": per_gpu, "gpu_hours": hours,
            "wall_hours": hours / gpus if not math.isnan(hours) else math.nan,
            "device": str(mine["device"].iloc[0]) if len(mine) else None,
            "device_class": str(mine["device_class"].iloc[0]) if len(mine) else None,
            "left_out": str(why_not[runs_of_cell.index].iloc[0]) if len(runs_of_cell) and not len(mine) else None,
        })  # fmt: skip
    return pd.DataFrame(rows)


def _not_the_recipe(run: pd.Series) -> str | None:
    """Why a run's throughput is not the full recipe's (None: it is)."""
    why = []
    scale = run.get("image_scale")
    if isinstance(scale, (tuple, list)) and len(scale) == 2:
        why.append(f"trains at {scale[0]}x{scale[1]}, not the recipe's image scale")
    cap = run.get("proposal_cap")
    if cap is not None and not (isinstance(cap, float) and math.isnan(cap)):
        why.append(f"proposal counts capped at {int(cap)}")
    return "; ".join(why) or None


def require_estimate(df: pd.DataFrame, profile: str) -> None:
    """UserError when no cell could be estimated because every measured run trains otherwise than
    the recipe (for example the smoke profile), naming why."""
    if df["gpu_hours"].notna().any():
        return
    left = df[df["left_out"].notna()]
    if len(left):
        first = left.iloc[0]
        raise UserError(f"--profile {profile}: its runs do not measure the full recipe's training throughput "
                        f"({first['name']}: {first['left_out']}); estimate from a profile that trains at the recipe's "
                        "scale: `harness run MATRIX --profile hardware --device cuda`, then `harness estimate MATRIX`")


def unit(df: pd.DataFrame) -> str:
    """"GPU", or "CPU" when every measured run ran on the CPU."""
    classes = {str(c).lower() for c in df["device_class"].dropna()}
    return "CPU" if classes == {"cpu"} else "GPU"


def total_gpu_hours(df: pd.DataFrame) -> tuple[float, int]:
    """(sum of the cells' GPU-hours that were measured, number of cells measured)."""
    measured = df["gpu_hours"].dropna()
    return float(measured.sum()), int(len(measured))


def summary_line(df: pd.DataFrame) -> str | None:
    """"Reproducing this table costs about N <device>-hours ..." or None when nothing was measured."""
    total, n = total_gpu_hours(df)
    if not n:
        return None
    devices = sorted({str(d) for d in df["device"].dropna()})
    gpu = devices[0].removeprefix("NVIDIA ") if len(devices) == 1 and unit(df) == "GPU" else unit(df)
    missing = f"; {len(df) - n} cell(s) not measured" if n < len(df) else ""
    return (f"reproducing the {n} measured cells' full recipes costs about {total:,.0f} {gpu}-hours of training "
            f"(`harness estimate`: epochs x COCO train images / measured images per second{missing})")


def format_estimate(df: pd.DataFrame, *, gpus: int) -> str:
    """A plain-text table and the totals."""
    u = unit(df)
    header = ("cell", "epochs", f"img/s/{u}", f"{u}-hours", f"wall h on {gpus}")
    rows = [header]
    for r in df.to_dict(orient="records"):
        mark = "*" if r["upper_bound"] and not math.isnan(r["gpu_hours"]) else ""
        rows.append((r["name"], str(r["epochs"]), num(r["images_per_s_per_gpu"], 1, grouped=True), num(r["gpu_hours"], 1, grouped=True) + mark,
                     num(r["wall_hours"], 1, grouped=True)))  # fmt: skip
    lines = table(rows)
    total, n = total_gpu_hours(df)
    lines.append(f"\ntotal: {total:,.1f} {u}-hours over {n} measured cell(s); about {total / gpus:,.1f} h of wall "
                 f"clock on {gpus} {u}s (cells one after another, linear scaling, no evaluation or start-up)")
    if (df["upper_bound"] & df["gpu_hours"].notna()).any():
        lines.append("*: a class subset whose training-set size is not known here; estimated with all of train2017")
    left = df[df["left_out"].notna()]
    if len(left):
        lines.append(f"left out: {len(left)} cell(s) whose runs do not train as the full recipe ({left.iloc[0]['left_out']})")
    return "\n".join(lines)


__all__ = ["COCO_TRAIN_IMAGES", "estimate", "estimate_frame", "format_estimate", "gpu_hours", "require_estimate", "summary_line", "total_gpu_hours", "unit"]
