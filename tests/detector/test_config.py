from __future__ import annotations

import dataclasses

import pytest

from detector.config import DetectorConfig, RunConfig
from detector.errors import ConfigError


def test_defaults_are_r50_fpn_1x_recipe() -> None:
    cfg = DetectorConfig()
    # reference section 1.2 / 1.4
    assert cfg.normalize.mean == (123.675, 116.28, 103.53) and not cfg.normalize.to_bgr
    assert cfg.backbone.depth == 50 and cfg.backbone.style == "pytorch" and cfg.backbone.frozen_stages == 1
    assert cfg.rpn.train.nms_pre == 2000 and cfg.rpn.train.max_per_img == 1000
    assert cfg.rpn.test.nms_pre == 1000 and cfg.rpn.allowed_border == -1
    assert cfg.roi_head.target_stds == (0.1, 0.1, 0.2, 0.2) and cfg.roi_head.num_samples == 512
    assert (cfg.roi_head.score_thr, cfg.roi_head.nms_iou, cfg.roi_head.max_per_img) == (0.05, 0.5, 100)
    assert cfg.schedule.lr == 0.02 and cfg.schedule.milestones == (8, 11) and cfg.schedule.warmup_iters == 500


def test_configs_are_frozen_and_keyword_only() -> None:
    cfg = DetectorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_classes = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        RunConfig("root")  # type: ignore[misc]


def test_round_trip_through_dict() -> None:
    cfg = DetectorConfig(precision="bf16", loss_scale=512.0)
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    run = RunConfig(data_root="/data", image_scale=(320, 256), max_iters=10)
    assert RunConfig.from_dict(run.to_dict()) == run


def test_unknown_field_names_path_and_allowed() -> None:
    data = DetectorConfig().to_dict()
    data["roi_head"]["loss_box"] = "l1"
    with pytest.raises(ConfigError, match=r"config\.roi_head: unknown field 'loss_box'; allowed: .*loss_bbox"):
        DetectorConfig.from_dict(data)


def test_bad_enum_value_lists_allowed_values() -> None:
    data = DetectorConfig().to_dict()
    data["roi_head"]["loss_bbox"] = "diou"
    with pytest.raises(ConfigError, match=r"config\.roi_head\.loss_bbox: 'diou' is not allowed; allowed: 'l1'"):
        DetectorConfig.from_dict(data)


def test_numbers_from_yaml_strings_are_cast() -> None:
    data = DetectorConfig().to_dict()
    data["schedule"]["weight_decay"] = "1e-4"  # what YAML 1.1 makes of 1e-4
    assert DetectorConfig.from_dict(data).schedule.weight_decay == 1e-4
    data["schedule"]["max_epochs"] = "twelve"
    with pytest.raises(ConfigError, match="schedule.max_epochs: expected an integer"):
        DetectorConfig.from_dict(data)
