"""`metrics.json`, typed: what a cell's run writes (`detector.run`) and the harness reads back.

The schema is ARCHITECTURE.md's "metrics.json". `from_dict` is lenient on purpose: a result.json
copies the record without `status` / `error`, and files written by older versions lack the newer
fields; a field that is missing reads as its default, an unknown key is ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Metrics:
    status: str | None = None  # "ok" | "failed"; absent in a result.json's copy
    error: str | None = None
    coco: dict[str, float] | None = None  # the 12 pycocotools stats under mmdet CocoMetric keys, fractions
    # AP@[.5:.95] per evaluated category name, a fraction (mmdet's classwise `<name>_precision`);
    # None for a category without ground truth among the evaluated images.
    category_ap: dict[str, float | None] | None = None
    box_ap: float | None = None  # percentage points, one decimal
    mem_gb: float | None = None
    mem_kind: str | None = None  # "cuda_max_allocated" | "cpu_peak_rss"
    # torchvision's fasterrcnn_resnet50_fpn on the same image size in the same process, GB
    # (RunConfig.framework_memory; R-50-FPN cells on CUDA), else None.
    framework_mem_gb: float | None = None
    fps: float | None = None
    fps_images: int = 0
    fps_precision: str | None = None
    iters: int | None = None
    epochs: float | None = None
    train_time_s: float | None = None
    eval_time_s: float | None = None
    final_loss: float | None = None
    first_loss: float | None = None
    # Training throughput, data loading included (the whole loop), over all ranks.
    train_images_per_s: float | None = None
    s_per_iter: float | None = None
    threads: int | None = None
    world_size: int | None = None
    images_per_gpu: int | None = None
    total_batch: int | None = None
    lr: float | None = None
    base_lr: float | None = None
    lr_rescaled: bool | None = None
    resumed_from_iter: int | None = None
    eval_split: str | None = None
    eval_images: int | None = None  # images evaluated (COCO val2017: 5,000 when all of it)
    device: str | None = None
    device_class: str | None = None
    deviations: tuple[str, ...] = field(default_factory=tuple)
    failed_at_iter: int | None = None
    loss_terms: dict[str, float] | None = None
    # Where the cell's wall time went, seconds (rank 0): start-up (interpreter and imports, before
    # run_cell), build (model + initialisation + to device), data (datasets and loaders), train,
    # eval, fps. What makes a short cell cheap or dear (the hardware profile on a GPU).
    phase_s: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["deviations"] = list(self.deviations)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Metrics:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in (data or {}).items() if k in known}
        if "deviations" in values:
            values["deviations"] = tuple(values["deviations"] or ())
        return cls(**values)


__all__ = ["Metrics"]
