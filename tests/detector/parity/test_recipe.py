"""The recipe comparison, on a config shaped like MMDetection's (attribute and key access)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from detector.parity.recipe import recipe_stage
from detector.recipes import resolve


class _Cfg(dict):  # mmengine's ConfigDict: keys are attributes too
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _wrap(x: Any) -> Any:
    if isinstance(x, dict):
        return _Cfg({k: _wrap(v) for k, v in x.items()})
    return [_wrap(v) for v in x] if isinstance(x, list) else x


def _mmdet_r50_fpn_1x(**changes: Any) -> Any:
    cfg = {
        "train_dataloader": {"dataset": {"type": "CocoDataset", "pipeline": [
            {"type": "LoadImageFromFile"}, {"type": "Resize", "scale": (1333, 800), "keep_ratio": True},
            {"type": "RandomFlip", "prob": 0.5}]}},
        "optim_wrapper": {"type": "OptimWrapper", "optimizer": {"type": "SGD", "lr": 0.02, "momentum": 0.9, "weight_decay": 0.0001}},
        "param_scheduler": [{"type": "LinearLR", "start_factor": 0.001, "end": 500},
                            {"type": "MultiStepLR", "milestones": [8, 11], "gamma": 0.1}],
        "train_cfg": {"max_epochs": 12},
        "auto_scale_lr": {"base_batch_size": 16},
    }  # fmt: skip
    cfg.update(changes)
    return _wrap(cfg)


def test_the_r50_fpn_recipe_matches_field_by_field() -> None:
    result = recipe_stage(resolve({}), _mmdet_r50_fpn_1x())
    assert result.ok and result.worst == 0 and result.detail == "13 fields equal"


def test_each_differing_field_is_named() -> None:
    cfg = resolve({})
    cfg = replace(cfg, schedule=replace(cfg.schedule, lr=0.01, milestones=(9, 11)))
    result = recipe_stage(cfg, _mmdet_r50_fpn_1x())
    assert not result.ok and result.worst == 2
    assert "lr: 0.01 vs 0.02" in result.detail and "milestones: ((9, 11), 0.1) vs ((8, 11), 0.1)" in result.detail


def test_multi_scale_and_repeat_dataset_are_compared() -> None:
    ms3x = resolve({"train_scale": "ms-range", "schedule": "3x"})
    theirs = _mmdet_r50_fpn_1x(train_dataloader={"dataset": {"type": "RepeatDataset", "times": 3, "dataset": {"pipeline": [
        {"type": "RandomResize", "scale": [(1333, 640), (1333, 800)]}, {"type": "RandomFlip", "prob": 0.5}]}}})
    theirs["param_scheduler"][1]["milestones"] = [9, 11]
    assert recipe_stage(ms3x, theirs).ok
    theirs["train_dataloader"]["dataset"]["times"] = 2
    assert "epochs: (12, 3) vs (12, 2)" in recipe_stage(ms3x, theirs).detail
