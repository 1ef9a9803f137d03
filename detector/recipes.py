"""From a cell's axes to its fully resolved `DetectorConfig`.

This is the only place that knows how the MMDetection Faster R-CNN configs differ from the
`faster-rcnn_r50_fpn_1x_coco` base. Every delta cites the section of
`shared/reference/mmdet_faster_rcnn_recipes.md` it comes from. Where the published checkpoint was
trained with a recipe that differs from today's config, the quirk is recorded in
`DetectorConfig.notes` so the report can show it: for Q1 (v3 milestone bugs) and Q2 (a forgotten caffe
normalisation) the cell follows the recipe *of the checkpoint*; for Q5 (the Jan-Feb 2020 checkpoints,
trained before mmdet PR #2410 changed the defaults) the cell trains today's L1 config, which its name
and the README's "L1Loss" row claim, and `era: jan-2020` trains the defaults of the checkpoint instead
(reference 1.8), so the two can be compared.

Axes (all strings, as written in `matrices/*.yaml`):

| axis        | values                                                        | default     |
|-------------|---------------------------------------------------------------|-------------|
| backbone    | r50, r101, x101-32x4d, x101-64x4d, x101-32x8d                 | r50         |
| style       | pytorch, caffe                                                | pytorch     |
| neck        | fpn, c4, dc5                                                  | fpn         |
| schedule    | 1x, 2x, 3x                                                    | 1x          |
| train_scale | single, ms-range, ms-choice                                   | single      |
| loss        | l1, smooth-l1, iou, giou, bounded-iou                         | l1          |
| precision   | fp32, amp, bf16                                               | fp32        |
| pretrain    | imagenet, tnr, coco-caffe-ms-3x                               | imagenet    |
| classes     | coco, person, person-bicycle-car, dataset                     | coco        |
| era         | current, jan-2020 (the pre-PR-#2410 defaults; FPN with L1 only)  | current     |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal, cast

from detector.config import (
    BackboneConfig,
    BoxLoss,
    ConfigError,
    DataConfig,
    DetectorConfig,
    NeckConfig,
    NormalizeConfig,
    Precision,
    ProposalConfig,
    RoIHeadConfig,
    RPNConfig,
    ScheduleConfig,
    Style,
)

AXES: dict[str, tuple[str, ...]] = {
    "backbone": ("r50", "r101", "x101-32x4d", "x101-64x4d", "x101-32x8d"),
    "style": ("pytorch", "caffe"),
    "neck": ("fpn", "c4", "dc5"),
    "schedule": ("1x", "2x", "3x"),
    "train_scale": ("single", "ms-range", "ms-choice"),
    "loss": ("l1", "smooth-l1", "iou", "giou", "bounded-iou"),
    "precision": ("fp32", "amp", "bf16"),
    "pretrain": ("imagenet", "tnr", "coco-caffe-ms-3x"),
    # dataset: every category of the annotation file, in id order; the harness reads them from the
    # data at planning time and sizes the head (`harness run --classes dataset`).
    "classes": ("coco", "person", "person-bicycle-car", "dataset"),
    "era": ("current", "jan-2020"),
}
DEFAULT_AXES: dict[str, str] = {axis: values[0] for axis, values in AXES.items()}

# Normalisations (reference 1.2, 1.5, Q9). Images are loaded RGB; caffe weights want BGR.
PYTORCH_NORM = NormalizeConfig()
CAFFE_NORM = NormalizeConfig(mean=(103.530, 116.280, 123.675), std=(1.0, 1.0, 1.0), to_bgr=True)
CAFFE2_NORM = NormalizeConfig(mean=(103.530, 116.280, 123.675), std=(57.375, 57.120, 58.395), to_bgr=True)

# (depth, groups, base_width) per backbone name (reference 1.5).
_BACKBONES: dict[str, tuple[Literal[50, 101], int, int]] = {
    "r50": (50, 1, 64),
    "r101": (101, 1, 64),
    "x101-32x4d": (101, 32, 4),
    "x101-64x4d": (101, 64, 4),
    "x101-32x8d": (101, 32, 8),
}

# The six short sides of `RandomChoiceResize` and the 640-800 range of `common/ms_3x_coco.py`.
MS_CHOICE = (640, 672, 704, 736, 768, 800)
MS_RANGE = (640, 800)

COCO_PERSON = ("person",)
COCO_PERSON_BICYCLE_CAR = ("person", "bicycle", "car")


def resolve(axes: dict[str, str], *, name: str | None = None) -> DetectorConfig:
    """Resolve a cell's axes into the config MMDetection would build for it.

    Raises:
        ConfigError: an unknown axis or value, naming it and the allowed values.
    """
    full = dict(DEFAULT_AXES)
    for axis, value in axes.items():
        if axis not in AXES:
            raise ConfigError(f"axes: unknown axis {axis!r}; allowed: {', '.join(AXES)}")
        if value not in AXES[axis]:
            raise ConfigError(f"axes.{axis}: {value!r} is not allowed; allowed: {', '.join(AXES[axis])}")
        full[axis] = value
    cfg = DetectorConfig(name=name or "faster-rcnn_custom")
    for step in _STEPS:
        cfg = step(cfg, full)
    return cfg


def _backbone(cfg: DetectorConfig, a: dict[str, str]) -> DetectorConfig:
    depth, groups, width = _BACKBONES[a["backbone"]]
    backbone = replace(cfg.backbone, depth=depth, groups=groups, base_width=width, style=cast(Style, a["style"]))
    normalize = PYTORCH_NORM
    pretrained = {
        "r50": "torchvision://resnet50",
        "r101": "torchvision://resnet101",
        "x101-32x4d": "open-mmlab://resnext101_32x4d",
        "x101-64x4d": "open-mmlab://resnext101_64x4d",
        "x101-32x8d": "open-mmlab://detectron2/resnext101_32x8d",
    }[a["backbone"]]
    if a["style"] == "caffe":
        if a["backbone"].startswith("x101"):
            raise ConfigError(f"axes.style: 'caffe' is not available for backbone {a['backbone']!r}; allowed: r50, r101")
        # Caffe-style MSRA weights: BN fully frozen (requires_grad=False), BGR input, std 1 (Q9).
        backbone = replace(backbone, norm="frozen")
        normalize = CAFFE_NORM
        pretrained = f"open-mmlab://detectron2/resnet{backbone.depth}_caffe"
    if a["backbone"] == "x101-32x8d":
        # Detectron2's ResNeXt-101 32x8d: frozen-affine BN and Caffe2 mean/std in BGR (reference 1.5).
        backbone = replace(backbone, norm="frozen")
        normalize = CAFFE2_NORM
    if a["pretrain"] == "tnr":
        if a["backbone"] != "r50" or a["style"] != "pytorch":
            raise ConfigError("axes.pretrain: 'tnr' exists only for backbone 'r50' in style 'pytorch'")
        pretrained = "torchvision://resnet50_v2"  # resnet50-11ad3fa6.pth, IMAGENET1K_V2 (Q9)
    return replace(cfg, backbone=backbone, normalize=normalize, pretrained=pretrained)


def _neck_and_heads(cfg: DetectorConfig, a: dict[str, str]) -> DetectorConfig:
    if a["neck"] == "fpn":
        return cfg
    if a["style"] != "caffe" or a["backbone"] != "r50":
        raise ConfigError(f"axes.neck: {a['neck']!r} is published only for backbone 'r50' in style 'caffe'")
    # C4 / DC5 (reference 1.6): single stride-16 feature, 15 anchors (scales 2..32 x 3 ratios),
    # 12000 -> 2000 proposals in training and 6000 -> 1000 at test.
    rpn = replace(
        cfg.rpn,
        anchor_scales=(2.0, 4.0, 8.0, 16.0, 32.0),
        anchor_strides=(16,),
        train=ProposalConfig(nms_pre=12000, max_per_img=2000),
        test=ProposalConfig(nms_pre=6000, max_per_img=1000),
    )
    if a["neck"] == "c4":
        backbone = replace(cfg.backbone, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(2,))
        rpn = replace(rpn, in_channels=1024, feat_channels=1024, allowed_border=-1.0)  # -1 since PR #7435 (Q3)
        roi = replace(cfg.roi_head, kind="res5", in_channels=1024, roi_size=14, featmap_strides=(16,))
    else:
        backbone = replace(cfg.backbone, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), out_indices=(3,))
        rpn = replace(rpn, in_channels=2048, feat_channels=2048, allowed_border=0.0)
        roi = replace(cfg.roi_head, in_channels=2048, roi_size=7, featmap_strides=(16,))
    return replace(cfg, backbone=backbone, neck=NeckConfig(kind="none", in_channels=(), num_outs=1), rpn=rpn, roi_head=roi)


def _loss(cfg: DetectorConfig, a: dict[str, str]) -> DetectorConfig:
    loss = cast(BoxLoss, a["loss"].replace("-", "_"))
    if loss in ("l1", "smooth_l1"):
        roi = replace(cfg.roi_head, loss_bbox=loss)
    else:
        # IoU-family losses act on decoded boxes with weight 10; the RPN stays on L1 (reference 1.5).
        roi = replace(cfg.roi_head, loss_bbox=loss, reg_decoded_bbox=True, loss_bbox_weight=10.0)
    return replace(cfg, roi_head=roi)


def _data_and_schedule(cfg: DetectorConfig, a: dict[str, str]) -> DetectorConfig:
    data, sched, notes = cfg.data, cfg.schedule, list(cfg.notes)
    if a["train_scale"] == "ms-range":
        data = replace(data, train_scale="ms_range", ms_short_sides=MS_RANGE)
    elif a["train_scale"] == "ms-choice":
        data = replace(data, train_scale="ms_choice", ms_short_sides=MS_CHOICE)
    if a["schedule"] == "2x":
        milestones = (16, 22)
        if a["train_scale"] == "ms-choice":
            # caffe FPN ms-2x: v2 `lr_config(step=[16, 23])`; in v3 the decay never fires (Q1).
            milestones = (16, 23)
            notes.append("Q1: trained with milestones [16, 23] as the published v2 checkpoint; the v3 config never decays the lr")
        sched = replace(sched, max_epochs=24, milestones=milestones)
    elif a["schedule"] == "3x":
        if a["train_scale"] == "ms-range":
            # common/ms_3x_coco.py: RepeatDataset(times=3), 12 "epochs", milestones [9, 11] (Q4).
            sched = replace(sched, repeat_times=3, max_epochs=12, milestones=(9, 11))
        else:
            # DC5 ms-3x: 36 epochs, milestones [28, 34] as the v2 checkpoint was trained (Q1).
            sched = replace(sched, max_epochs=36, milestones=(28, 34))
            notes.append("Q1: trained with milestones [28, 34] as the published v2 checkpoint; the v3 config never decays the lr")
    if a["pretrain"] == "tnr":
        # faster-rcnn_r50-tnr-pre_fpn_1x_coco.py: AdamW lr 1e-4, wd 0.1, no decay on norm layers.
        sched = replace(sched, optimizer="adamw", lr=1e-4, weight_decay=0.1, norm_decay_mult=0.0)
    return replace(cfg, data=data, schedule=sched, notes=tuple(notes))


def _era(cfg: DetectorConfig, a: dict[str, str]) -> DetectorConfig:
    """`jan-2020`: the defaults before mmdet commit 990412ea (PR #2410, 2020-04-11), with which the
    Jan-Feb 2020 checkpoints were most likely trained (reference 1.8; compatibility.md "Training
    Hyperparameters"): smooth-L1 in the RPN (beta 1/9) and the RoI head (beta 1.0), RoIAlign
    sample_num 2, 2000 training proposals after NMS, grad clip max_norm 35, warmup ratio 1/3."""
    if a["era"] == "current":
        return cfg
    if a["neck"] != "fpn" or a["loss"] != "l1":
        raise ConfigError(f"axes.era: {a['era']!r} recreates the 2020 FPN checkpoints' recipe (smooth-L1 losses); "
                          f"it needs neck 'fpn' and loss 'l1', got neck {a['neck']!r}, loss {a['loss']!r}")
    rpn = replace(cfg.rpn, loss_bbox="smooth_l1", loss_bbox_beta=1.0 / 9.0,
                  train=replace(cfg.rpn.train, max_per_img=2000))
    roi = replace(cfg.roi_head, loss_bbox="smooth_l1", loss_bbox_beta=1.0, sampling_ratio=2)
    schedule = replace(cfg.schedule, grad_clip=35.0, warmup_ratio=1.0 / 3.0)
    return replace(cfg, rpn=rpn, roi_head=roi, schedule=schedule)


def _classes(cfg: DetectorConfig, a: dict[str, str]) -> DetectorConfig:
    if a["classes"] in ("coco", "dataset"):  # dataset: the harness sets the classes from the data
        if a["pretrain"] == "coco-caffe-ms-3x" and a["classes"] == "coco":
            raise ConfigError("axes.pretrain: 'coco-caffe-ms-3x' is only used by the COCO-subset finetunes")
        return cfg
    classes = COCO_PERSON if a["classes"] == "person" else COCO_PERSON_BICYCLE_CAR
    # Finetunes start from the 2020 caffe ms-3x COCO checkpoint; fc_cls / fc_reg do not fit and are
    # re-initialised (reference 1.5, "COCO-subset finetunes").
    load_from = "faster_rcnn_r50_caffe_fpn_mstrain_3x_coco_bbox_mAP-0.398_20200504_163323-30042637.pth"
    return replace(
        cfg,
        num_classes=len(classes),
        data=replace(cfg.data, classes=classes),
        load_from=load_from if a["pretrain"] == "coco-caffe-ms-3x" else cfg.load_from,
    )


def _precision(cfg: DetectorConfig, a: dict[str, str]) -> DetectorConfig:
    precision: Precision = {"fp32": "fp32", "amp": "amp_fp16", "bf16": "bf16"}[a["precision"]]  # type: ignore[assignment]
    return replace(cfg, precision=precision)


def _quirk_notes(cfg: DetectorConfig, a: dict[str, str]) -> DetectorConfig:
    notes = list(cfg.notes)
    if a["backbone"] == "r101" and a["style"] == "caffe" and a["schedule"] == "3x":
        # v3 faster-rcnn_r101-caffe_fpn_ms-3x_coco.py forgets the caffe data_preprocessor; the
        # published checkpoint was trained with caffe normalisation, which we keep (Q2).
        notes.append("Q2: caffe normalisation as the v2 checkpoint was trained; the v3 config uses pytorch mean/std")
    jan_2020 = a["backbone"] in ("r50", "r101", "x101-32x4d", "x101-64x4d") and a["style"] == "pytorch"
    jan_2020_row = (jan_2020 and a["neck"] == "fpn" and a["schedule"] == "1x" and a["train_scale"] == "single"
                    and a["loss"] == "l1" and a["pretrain"] == "imagenet")  # fmt: skip
    # The Jan-Feb 2020 checkpoints predate PR #2410 (Q5, reference 1.8). Any `era: jan-2020` cell
    # says so, whichever row it is: it does not train today's config of its name.
    if a["era"] == "jan-2020":
        notes.append("Q5: trains mmdet's defaults from before PR #2410 (smooth-L1 with RPN beta 1/9, grad clip 35, 2000 "
                     "training proposals, RoIAlign sampling 2, warmup ratio 1/3), with which the Jan-Feb 2020 1x checkpoints "
                     "were most likely trained, inferred from their dates: confirm from a checkpoint's log.json (reference 1.8)")
    elif jan_2020_row:
        notes.append("Q5: the published checkpoint predates the April-2020 defaults (smooth-L1 with RPN beta 1/9, grad clip 35, "
                     "2000 training proposals, RoIAlign sampling 2, warmup ratio 1/3); this cell trains today's L1 recipe "
                     "(era jan-2020 trains the old defaults)")
    if a["precision"] == "amp":
        # The 2020 FP16 checkpoint used mmdet's FP16 hook with a static loss scale of 512 (reference 1.7).
        notes.append("FP16: published checkpoint trained with a static loss scale of 512; v3 AmpOptimWrapper (dynamic) is used here")
    return replace(cfg, notes=tuple(notes))


def cap_proposals(cfg: DetectorConfig, cap: int | None) -> tuple[DetectorConfig, str | None]:
    """`cfg` with every proposal / RoI count at most `cap`, and the deviation sentence (or None)."""
    if cap is None:
        return cfg, None

    def capped(p: ProposalConfig) -> ProposalConfig:
        return replace(p, nms_pre=min(p.nms_pre, cap), max_per_img=min(p.max_per_img, cap))

    rpn = replace(cfg.rpn, train=capped(cfg.rpn.train), test=capped(cfg.rpn.test), num_samples=min(cfg.rpn.num_samples, cap))
    roi = replace(cfg.roi_head, num_samples=min(cfg.roi_head.num_samples, cap))
    new = replace(cfg, rpn=rpn, roi_head=roi)
    if new == cfg:
        return cfg, None
    return new, (f"proposal counts capped at {cap} (RPN train {cfg.rpn.train.nms_pre}/{cfg.rpn.train.max_per_img}, "
                 f"test {cfg.rpn.test.nms_pre}/{cfg.rpn.test.max_per_img}, RoI samples {cfg.roi_head.num_samples} in the recipe)")


_STEPS: tuple[Callable[[DetectorConfig, dict[str, str]], DetectorConfig], ...] = (
    _backbone,
    _neck_and_heads,
    _loss,
    _data_and_schedule,
    _era,
    _classes,
    _precision,
    _quirk_notes,
)

__all__ = ["AXES", "DEFAULT_AXES", "cap_proposals", "resolve", "BackboneConfig", "DataConfig", "RoIHeadConfig", "RPNConfig", "ScheduleConfig"]
