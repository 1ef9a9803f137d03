"""The training recipe of a cell against MMDetection's config: the numbers the model check cannot see.

The model stages prove the network, its losses and its test pipeline; this compares what turns
them into a published number: the train-time resize (fixed, a choice of scales or a range) and
flip, the optimiser, AMP and its loss scale, gradient clipping, warmup, the step schedule, the
epochs (with mmdet's RepeatDataset) and the batch the lr is written for. Exact equality.
"""

from __future__ import annotations

from typing import Any

from detector.config import DetectorConfig
from detector.parity.stages import StageResult


def _train_pipeline(mcfg: Any) -> list[dict[str, Any]]:
    dataset = mcfg.train_dataloader.dataset
    return list(dataset.get("dataset", dataset).pipeline)


def _their_resize(pipeline: list[dict[str, Any]]) -> tuple[str, tuple[int, ...], int]:
    """(kind, short sides, long side) of the train resize, in the form ours is written."""
    for t in pipeline:
        if t["type"] == "Resize":
            return "single", (min(t["scale"]),), max(t["scale"])
        if t["type"] == "RandomChoiceResize":
            return "ms_choice", tuple(sorted(min(s) for s in t["scales"])), max(max(s) for s in t["scales"])
        if t["type"] == "RandomResize":
            return "ms_range", tuple(sorted(min(s) for s in t["scale"])), max(max(s) for s in t["scale"])
    raise ValueError("the config's train pipeline has no resize")


def recipe_fields(cfg: DetectorConfig, mcfg: Any) -> dict[str, tuple[Any, Any]]:
    """field -> (ours, MMDetection's)."""
    data, sched = cfg.data, cfg.schedule
    pipeline = _train_pipeline(mcfg)
    ours_sides = (min(data.scale),) if data.train_scale == "single" else tuple(sorted(data.ms_short_sides))
    if data.train_scale == "ms_range":
        ours_sides = (min(ours_sides), max(ours_sides))
    flip = next((t.get("prob") for t in pipeline if t["type"] == "RandomFlip"), 0.0)
    wrapper = mcfg.optim_wrapper
    opt = wrapper.optimizer
    warmup = next(s for s in mcfg.param_scheduler if s["type"] == "LinearLR")
    steps = next(s for s in mcfg.param_scheduler if s["type"] == "MultiStepLR")
    dataset = mcfg.train_dataloader.dataset
    clip = wrapper.get("clip_grad")
    fields: dict[str, tuple[Any, Any]] = {
        "train resize": ((data.train_scale, ours_sides, max(data.scale)), _their_resize(pipeline)),
        "flip": (data.flip_prob, flip),
        "optimizer": (sched.optimizer, str(opt.type).lower()),
        "lr": (sched.lr, opt.lr),
        "weight decay": (sched.weight_decay, opt.weight_decay),
        "norm decay mult": (sched.norm_decay_mult, (wrapper.get("paramwise_cfg") or {}).get("norm_decay_mult", 1.0)),
        "amp": (cfg.precision == "amp_fp16", wrapper.type == "AmpOptimWrapper"),
        "grad clip": (sched.grad_clip, clip["max_norm"] if clip else None),
        "warmup": ((sched.warmup_iters, sched.warmup_ratio), (warmup["end"], warmup["start_factor"])),
        "milestones": ((sched.milestones, sched.gamma), (tuple(steps["milestones"]), steps["gamma"])),
        "epochs": ((sched.max_epochs, sched.repeat_times), (mcfg.train_cfg.max_epochs, dataset.get("times", 1))),
        "lr batch": (sched.base_batch_size, (mcfg.get("auto_scale_lr") or {}).get("base_batch_size", 16)),
    }
    if sched.optimizer == "sgd":
        fields["momentum"] = (sched.momentum, opt.get("momentum"))
    if cfg.precision == "amp_fp16":
        fields["loss scale"] = (cfg.loss_scale, wrapper.get("loss_scale", "dynamic"))
    return fields


def recipe_stage(cfg: DetectorConfig, mcfg: Any) -> StageResult:
    """Every field equal, or the stage fails naming each field that differs (worst = their count)."""
    fields = recipe_fields(cfg, mcfg)
    differ = [f"{name}: {ours} vs {theirs}" for name, (ours, theirs) in fields.items() if ours != theirs]
    detail = f"{len(fields)} fields equal" if not differ else "; ".join(differ)
    return StageResult(stage="recipe", worst=float(len(differ)), ok=not differ, detail=detail)
