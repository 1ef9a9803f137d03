"""Fake cell folders for the results tests: result.json, spec.json and log.jsonl as the runner writes them.

Shapes follow ARCHITECTURE.md ("Cell folder", `metrics.json`, `result.json`). Nothing is trained:
the numbers are whatever a test asks for, so each verdict rule can be reached on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MATRIX = "faster_rcnn"
R50 = "faster-rcnn_r50_fpn_1x_coco"  # published: Mem 4.0, fps 21.4, box AP 37.4


def write_run(
    runs_dir: Path,
    cell: str,
    *,
    profile: str = "full",
    seed: int = 0,
    status: str = "ok",
    box_ap: float = 37.4,
    mem_gb: float = 4.0,
    mem_kind: str = "cuda_max_allocated",
    fps: float = 21.4,
    device_class: str = "V100",
    eval_split: str = "val2017",
    data_root: str | None = None,
    notes: list[str] | None = None,
    error: str | None = None,
    losses: list[float] | None = None,
    deviations: list[str] | None = None,
    finished_at: str = "2025-01-02T03:04:05+00:00",
    checkpoint: bool = False,
    framework_mem_gb: float | None = None,
    categories: list[str] | None = None,
    eval_images: int | None = None,
    category_ap: dict[str, float | None] | None = None,
) -> Path:
    """Write one fake cell folder under `runs_dir` and return it."""
    folder = Path(runs_dir) / MATRIX / profile / cell
    if seed:
        folder = folder / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    device = {"V100": "Tesla V100-SXM2-32GB", "H200": "NVIDIA H200", "cpu": "cpu"}.get(device_class, device_class)
    metrics: dict[str, Any] = {
        "coco": {"bbox_mAP": box_ap / 100},
        "box_ap": box_ap, "mem_gb": mem_gb, "mem_kind": mem_kind, "fps": fps, "fps_images": 10,
        "fps_precision": "fp32", "iters": 6 if profile == "smoke" else 90000, "epochs": 0.75 if profile == "smoke" else 12.0,
        "train_time_s": 1.0, "eval_time_s": 1.0, "final_loss": 1.0, "first_loss": 2.0, "world_size": 1,
        "images_per_gpu": 2, "total_batch": 2, "lr": 0.0025, "base_lr": 0.02, "lr_rescaled": True,
        "resumed_from_iter": 0, "eval_split": eval_split, "eval_images": eval_images, "device": device, "device_class": device_class,
        "deviations": deviations or [], "failed_at_iter": None, "loss_terms": None, "framework_mem_gb": framework_mem_gb,
        "category_ap": category_ap,
    }
    result = {
        "name": cell, "matrix": MATRIX, "profile": profile, "seed": seed, "status": status,
        "error": error, "reason": "no data" if status == "skipped" else None, "config_hash": "0" * 64, "axes": {},
        "metrics": metrics if status != "skipped" else {},
        "provenance": {
            "git_commit": "0123456789abcdef0123", "git_dirty": False,
            "versions": {"python": "3.12.1", "torch": "2.14.0", "torchvision": "0.29.0", "pycocotools": "2.0.8", "harness": "0.1.0"},
            "device": device, "device_class": device_class, "seed": seed, "world_size": 1, "images_per_gpu": 2,
            "lr_rescaled": True, "resumed_from_iter": 0, "started_at": "2025-01-02T03:00:00+00:00",
            "finished_at": finished_at, "wall_time_s": 245.0,
        },
    }
    if notes is not None:
        result["notes"] = notes
    if categories is not None:
        result["categories"] = categories
    (folder / "result.json").write_text(json.dumps(result), encoding="utf-8")
    if data_root is not None:
        (folder / "spec.json").write_text(json.dumps({"config": {}, "run": {"data_root": data_root, "image_scale": [160, 128]}}), encoding="utf-8")
    if losses is not None:
        with (folder / "log.jsonl").open("w", encoding="utf-8") as fh:
            for i, loss in enumerate(losses, start=1):
                fh.write(json.dumps({"iter": i, "loss": loss, "lr": 0.01}) + "\n")
            fh.write(json.dumps({"event": "eval", "box_ap": box_ap}) + "\n")
            fh.write('{"iter": 99, "lo')  # a line cut short by a kill
    if checkpoint:
        (folder / "checkpoints").mkdir(exist_ok=True)
        (folder / "checkpoints" / "latest.pt").write_bytes(b"not a real checkpoint")
    return folder


def write_synthetic_root(root: Path) -> Path:
    """A data root whose train annotation starts like detector.data.synth's (only the head is read)."""
    ann = Path(root) / "annotations" / "instances_train2017.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"info": {"description": "detector.synth synthetic COCO-style set"}, "images": []}))
    return Path(root)


def empty_coco_root(tmp_path: Path, *, val: bool) -> Path:
    """The COCO-2017 layout with empty files: what the root checks look at, nothing more."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text("{}")
    if val:
        (root / "val2017").mkdir()
        (root / "annotations" / "instances_val2017.json").write_text("{}")
    return root
