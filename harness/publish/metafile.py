"""An OpenMMLab-style `metafile.yml` (model-index) of the measured or the published results.

Same fields as MMDetection's `configs/faster_rcnn/metafile.yml` (reference section 4.1): a
`Collections` entry and one `Models` entry per cell with Name, In Collection, Config, Metadata
{Training Memory (GB), inference time (ms/im) [value, hardware, backend, batch size, mode,
resolution], Epochs}, Results [{Task, Dataset, Metrics {box AP}}] and Weights. Built as plain dicts
and written with `yaml.safe_dump`, so the file always parses with `yaml.safe_load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness.matrix.spec import Cell, MatrixSpec
from harness.metrics import COMPARABLE_MEM_KIND, PUBLISHED_DEVICE_CLASS, finite

PUBLISHED_HARDWARE = PUBLISHED_DEVICE_CLASS
# MMDetection writes resolution as (h, w) of the test scale (reference 1.5 "Metafile" column).
RECIPE_RESOLUTION = "(800, 1333)"


def published_metafile(matrix: MatrixSpec) -> dict[str, Any]:
    """The metafile of the published table: one model per distinct cell, numbers as printed."""
    models = []
    for cell in matrix.cells:
        meta: dict[str, Any] = {}
        if cell.published.mem_gb is not None:
            meta["Training Memory (GB)"] = cell.published.mem_gb
        if cell.published.fps:
            # The metafile's ms/im are 1000 / README fps, 2 decimals (reference 1.5, main table note).
            meta["inference time (ms/im)"] = [_inference(
                1000.0 / cell.published.fps, PUBLISHED_HARDWARE, _mode(cell.axes.get("precision")), RECIPE_RESOLUTION)]
        meta["Epochs"] = cell.epochs
        model: dict[str, Any] = _model(matrix, cell, meta, cell.published.box_ap, "COCO")
        if cell.download:
            model["Weights"] = cell.download
        models.append(model)
    return {"Collections": [_collection(matrix, "COCO", "8x V100 GPUs")], "Models": models}


def measured_metafile(matrix: MatrixSpec, compared: pd.DataFrame, runs: pd.DataFrame, *, synthetic: bool, repo: Path | None = None) -> dict[str, Any]:
    """The metafile of the measured results: one model per cell with at least one ok seed.

    Args:
        compared: `harness.results.compare.compare()` (means over seeds); runs: `harness.results.collect.collect()`
            (for the device, image scale, epochs and checkpoint of each cell's first ok seed).
        synthetic: whether the runs used the generated synthetic set (then Dataset says so).
        repo: paths of checkpoints are written relative to it when inside it.
    """
    dataset = "Synthetic COCO-format" if synthetic else "COCO"
    ok = runs[runs["status"] == "ok"]
    models = []
    resources: set[str] = set()
    for row in compared.itertuples(index=False):
        if row.n_seeds == 0 or not finite(row.box_ap):
            continue
        cell = matrix.cell(row.name)
        first = ok[ok["name"] == row.name].iloc[0]
        meta: dict[str, Any] = {}
        if finite(row.mem_gb):
            meta["Training Memory (GB)"] = round(float(row.mem_gb), 1)
            if row.mem_kind != COMPARABLE_MEM_KIND:
                meta["Training Memory kind"] = str(row.mem_kind)  # e.g. CPU peak RSS: not the published kind
        if finite(row.fps) and row.fps > 0:
            meta["inference time (ms/im)"] = [_inference(
                1000.0 / float(row.fps), str(first["device_class"] or first["device"] or "unknown"),
                _mode(None, first["fps_precision"]), _resolution(first["image_scale"]))]
        if finite(first["epochs"]):
            epochs = round(float(first["epochs"]), 3)
            meta["Epochs"] = int(epochs) if epochs.is_integer() else epochs
        if finite(first["iters"]):
            meta["Iterations"] = int(first["iters"])
        if row.n_seeds > 1:
            meta["Seeds"] = int(row.n_seeds)
        model = _model(matrix, cell, meta, round(float(row.box_ap), 1), dataset)
        weights = Path(str(first["run_dir"])) / "checkpoints" / "latest.pt"
        if weights.is_file():
            model["Weights"] = _relative(weights, repo)
        models.append(model)
        if first["device"]:
            world = int(first["world_size"]) if finite(first["world_size"]) else 1
            resources.add(f"{world}x {first['device']}")
    collection = _collection(matrix, dataset, ", ".join(sorted(resources)) or "unknown")
    return {"Collections": [collection], "Models": models}


def write_metafile(data: dict[str, Any], path: Path) -> Path:
    """Write `data` as YAML (block style, keys in insertion order) and return `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
    path.write_text(text, encoding="utf-8")
    return path



def _collection(matrix: MatrixSpec, dataset: str, resources: str) -> dict[str, Any]:
    coll: dict[str, Any] = {
        "Name": matrix.title,
        "Metadata": {
            "Training Data": dataset,
            "Training Techniques": ["SGD with Momentum", "Weight Decay"],
            "Training Resources": resources,
            # RoIAlign, not the "RoIPool" of MMDetection's metafile (reference 1.9 item 7).
            "Architecture": ["FPN", "RPN", "ResNet", "RoIAlign"],
        },
        "README": f"reports/{matrix.name}/README.md",
    }
    if matrix.paper_url:
        coll["Paper"] = {"URL": matrix.paper_url, "Title": matrix.paper_title}
    return coll


def _model(matrix: MatrixSpec, cell: Cell, meta: dict[str, Any], box_ap: float | None, dataset: str) -> dict[str, Any]:
    model: dict[str, Any] = {
        "Name": cell.name,
        "In Collection": matrix.title,
        "Config": f"configs/{matrix.name}/{cell.name}.py",
        "Metadata": meta,
    }
    if box_ap is not None:
        model["Results"] = [{"Task": "Object Detection", "Dataset": dataset, "Metrics": {"box AP": box_ap}}]
    return model


def _inference(ms: float, hardware: str, mode: str, resolution: str) -> dict[str, Any]:
    return {"value": round(ms, 2), "hardware": hardware, "backend": "PyTorch", "batch size": 1,
            "mode": mode, "resolution": resolution}


def _mode(precision_axis: str | None, fps_precision: Any = None) -> str:
    if isinstance(fps_precision, str) and fps_precision:
        return fps_precision.upper()
    return "FP16" if precision_axis == "amp" else "FP32"


def _resolution(image_scale: Any) -> str:
    """`(long, short)` of a profile's image scale -> MMDetection's "(short, long)" text."""
    if isinstance(image_scale, (list, tuple)) and len(image_scale) == 2:
        return f"({image_scale[1]}, {image_scale[0]})"
    return RECIPE_RESOLUTION


def _relative(path: Path, repo: Path | None) -> str:
    if repo is not None:
        try:
            return str(path.resolve().relative_to(repo.resolve()))
        except ValueError:
            pass
    return str(path)



__all__ = ["measured_metafile", "published_metafile", "write_metafile"]
