from __future__ import annotations

from dataclasses import replace

import pytest

from detector.errors import ConfigError
from detector.recipes import CAFFE2_NORM, CAFFE_NORM, MS_CHOICE, MS_RANGE, resolve


def test_caffe_fpn_freezes_bn_and_uses_bgr_std_1() -> None:
    cfg = resolve({"style": "caffe"})
    assert cfg.backbone.style == "caffe" and cfg.backbone.norm == "frozen"
    assert cfg.normalize == CAFFE_NORM and cfg.pretrained == "open-mmlab://detectron2/resnet50_caffe"


def test_c4_and_dc5_follow_reference_section_1_6() -> None:
    c4 = resolve({"style": "caffe", "neck": "c4"})
    assert c4.backbone.num_stages == 3 and c4.backbone.out_indices == (2,)
    assert c4.rpn.anchor_scales == (2, 4, 8, 16, 32) and c4.rpn.anchor_strides == (16,)
    assert c4.roi_head.kind == "res5" and c4.roi_head.roi_size == 14 and c4.rpn.allowed_border == -1
    assert (c4.rpn.train.nms_pre, c4.rpn.train.max_per_img, c4.rpn.test.nms_pre) == (12000, 2000, 6000)
    dc5 = resolve({"style": "caffe", "neck": "dc5"})
    assert dc5.backbone.strides == (1, 2, 2, 1) and dc5.backbone.dilations == (1, 1, 1, 2)
    assert dc5.rpn.allowed_border == 0 and dc5.roi_head.in_channels == 2048 and dc5.neck.kind == "none"


def test_iou_losses_decode_boxes_with_weight_10() -> None:
    for loss in ("iou", "giou", "bounded-iou"):
        cfg = resolve({"loss": loss})
        assert cfg.roi_head.reg_decoded_bbox and cfg.roi_head.loss_bbox_weight == 10.0
        assert cfg.rpn.loss_bbox == "l1"  # the RPN stays on L1
    assert not resolve({"loss": "l1"}).roi_head.reg_decoded_bbox


def test_schedules_and_quirk_q1() -> None:
    assert resolve({"schedule": "2x"}).schedule.milestones == (16, 22)
    ms2x = resolve({"style": "caffe", "schedule": "2x", "train_scale": "ms-choice"})
    assert ms2x.schedule.milestones == (16, 23) and any(n.startswith("Q1") for n in ms2x.notes)
    assert ms2x.data.ms_short_sides == MS_CHOICE
    ms3x = resolve({"schedule": "3x", "train_scale": "ms-range"})
    assert (ms3x.schedule.repeat_times, ms3x.schedule.max_epochs, ms3x.schedule.milestones) == (3, 12, (9, 11))
    assert ms3x.data.ms_short_sides == MS_RANGE
    dc5_3x = resolve({"style": "caffe", "neck": "dc5", "schedule": "3x", "train_scale": "ms-choice"})
    assert dc5_3x.schedule.max_epochs == 36 and dc5_3x.schedule.milestones == (28, 34)


def test_x101_32x8d_uses_caffe2_normalisation_and_frozen_bn() -> None:
    cfg = resolve({"backbone": "x101-32x8d", "schedule": "3x", "train_scale": "ms-range"})
    assert cfg.normalize == CAFFE2_NORM and cfg.backbone.norm == "frozen"
    assert (cfg.backbone.groups, cfg.backbone.base_width) == (32, 8)


def test_tnr_uses_adamw_without_norm_decay() -> None:
    cfg = resolve({"pretrain": "tnr"})
    s = cfg.schedule
    assert (s.optimizer, s.lr, s.weight_decay, s.norm_decay_mult) == ("adamw", 1e-4, 0.1, 0.0)


def test_finetunes_and_quirk_notes() -> None:
    person = resolve({"style": "caffe", "train_scale": "ms-choice", "classes": "person", "pretrain": "coco-caffe-ms-3x"})
    assert person.num_classes == 1 and person.data.classes == ("person",) and person.load_from
    assert any(n.startswith("Q2") for n in resolve({"backbone": "r101", "style": "caffe", "schedule": "3x", "train_scale": "ms-range"}).notes)
    assert any(n.startswith("Q5") and "trains today's L1 recipe" in n for n in resolve({}).notes)
    assert not any(n.startswith("Q5") for n in resolve({"schedule": "2x"}).notes)


def test_era_jan_2020_trains_the_pre_2410_defaults() -> None:
    """Reference 1.8: what mmdet PR #2410 changed, back as the Jan-Feb 2020 checkpoints were trained."""
    today, old = resolve({}), resolve({"era": "jan-2020"})
    assert (today.rpn.loss_bbox, today.roi_head.loss_bbox, today.roi_head.sampling_ratio) == ("l1", "l1", 0)
    assert (today.rpn.train.max_per_img, today.schedule.grad_clip, today.schedule.warmup_ratio) == (1000, None, 0.001)
    assert (old.rpn.loss_bbox, old.rpn.loss_bbox_beta) == ("smooth_l1", pytest.approx(1 / 9))
    assert (old.roi_head.loss_bbox, old.roi_head.loss_bbox_beta, old.roi_head.sampling_ratio) == ("smooth_l1", 1.0, 2)
    assert (old.rpn.train.nms_pre, old.rpn.train.max_per_img, old.rpn.test) == (2000, 2000, today.rpn.test)
    assert (old.schedule.grad_clip, old.schedule.warmup_ratio) == (35.0, pytest.approx(1 / 3))
    assert any(n.startswith("Q5") and "log.json" in n for n in old.notes)
    # nothing else moves: the same model, data and optimiser otherwise
    same = ("backbone", "neck", "normalize", "data", "num_classes", "precision", "pretrained")
    assert all(getattr(today, f) == getattr(old, f) for f in same)
    assert replace(old.schedule, grad_clip=None, warmup_ratio=0.001) == today.schedule
    assert resolve({"era": "jan-2020", "backbone": "x101-64x4d", "precision": "amp"}).rpn.loss_bbox == "smooth_l1"
    # off the five published rows too, the cell says it trains the old defaults
    assert any(n.startswith("Q5") and "log.json" in n for n in resolve({"era": "jan-2020", "schedule": "2x"}).notes)


@pytest.mark.parametrize(
    "axes, message",
    [
        ({"lossy": "l1"}, "unknown axis 'lossy'"),
        ({"loss": "diou"}, r"axes.loss: 'diou' is not allowed; allowed: l1, smooth-l1"),
        ({"backbone": "x101-32x4d", "style": "caffe"}, "'caffe' is not available"),
        ({"neck": "c4"}, "published only for backbone 'r50' in style 'caffe'"),
        ({"era": "2019"}, r"axes.era: '2019' is not allowed; allowed: current, jan-2020"),
        ({"era": "jan-2020", "loss": "giou"}, r"axes.era: 'jan-2020' .* needs neck 'fpn' and loss 'l1', got neck 'fpn', loss 'giou'"),
        ({"era": "jan-2020", "style": "caffe", "neck": "dc5"}, r"axes.era: 'jan-2020' .* got neck 'dc5'"),
    ],
)
def test_impossible_cells_are_clear_errors(axes: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(axes)


def test_cap_proposals_caps_every_count_and_says_so() -> None:
    from detector.recipes import cap_proposals

    c4 = resolve({"style": "caffe", "neck": "c4"})
    capped, deviation = cap_proposals(c4, 64)
    assert (capped.rpn.train.nms_pre, capped.rpn.train.max_per_img, capped.rpn.test.max_per_img) == (64, 64, 64)
    assert capped.roi_head.num_samples == 64 and capped.rpn.num_samples == 64
    assert deviation and "12000/2000" in deviation
    assert cap_proposals(c4, None) == (c4, None)
    assert cap_proposals(c4, 100000) == (c4, None)  # nothing changes: no deviation recorded
