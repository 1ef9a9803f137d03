"""Typed, frozen, keyword-only configuration of the bundled Faster R-CNN.

Every default equals `faster-rcnn_r50_fpn_1x_coco` as resolved in
`shared/reference/mmdet_faster_rcnn_recipes.md` section 1.2 (model), 1.3 (data) and 1.4 (schedule).
Variants (caffe style, C4, DC5, other losses, ...) are built by `detector.recipes` with
`dataclasses.replace`, never by editing these defaults.

Naming follows MMDetection's config fields (`frozen_stages`, `nms_pre`, `max_per_img`, `score_thr`,
`pos_iou_thr`, `loss_weight`, `milestones`, ...) so a reader can hold a cell's config next to the
MMDetection file it claims to be.

`DetectorConfig.from_dict` is strict: an unknown key or a value outside an enum is a `ConfigError`
that names the field path and the allowed values.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from detector.errors import ConfigError

Style = Literal["pytorch", "caffe"]
NormMode = Literal["bn_eval", "frozen"]  # BN statistics frozen; affine trainable ("bn_eval") or not
NeckKind = Literal["fpn", "none"]
HeadKind = Literal["shared2fc", "res5"]
BoxLoss = Literal["l1", "smooth_l1", "iou", "giou", "bounded_iou"]
Precision = Literal["fp32", "amp_fp16", "bf16"]
Optimizer = Literal["sgd", "adamw"]
TrainScale = Literal["single", "ms_range", "ms_choice"]


@dataclass(frozen=True, kw_only=True)
class NormalizeConfig:
    """Input normalisation, applied after loading an RGB image as float in [0, 255].

    `to_bgr=True` flips RGB -> BGR before subtracting `mean` (caffe / Caffe2 weights expect BGR).
    Default: pytorch-style ImageNet statistics in RGB (reference 1.2, `data_preprocessor`).
    """

    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    to_bgr: bool = False


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    """ResNet / ResNeXt (reference 1.2, 1.5, 1.6).

    `groups=1, base_width=64` is ResNet; ResNeXt-101 32x4d is `groups=32, base_width=4`.
    `style` decides where the stride-2 sits in a bottleneck: "pytorch" on the 3x3 conv,
    "caffe" on the first 1x1. `num_stages=3` with `out_indices=(2,)` is the C4 trunk;
    `strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)` is DC5.
    """

    depth: Literal[50, 101] = 50
    groups: int = 1
    base_width: int = 64
    style: Style = "pytorch"
    num_stages: int = 4
    strides: tuple[int, ...] = (1, 2, 2, 2)
    dilations: tuple[int, ...] = (1, 1, 1, 1)
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    frozen_stages: int = 1
    norm: NormMode = "bn_eval"


@dataclass(frozen=True, kw_only=True)
class NeckConfig:
    """FPN P2-P6 (P6 by stride-2 max-pool of P5, Xavier-uniform convs), or none for C4 / DC5."""

    kind: NeckKind = "fpn"
    in_channels: tuple[int, ...] = (256, 512, 1024, 2048)
    out_channels: int = 256
    num_outs: int = 5


@dataclass(frozen=True, kw_only=True)
class ProposalConfig:
    """RPN proposal selection for one phase (train or test): per-level top-k, then NMS."""

    nms_pre: int = 1000
    max_per_img: int = 1000
    nms_iou: float = 0.7
    min_bbox_size: float = 0.0


@dataclass(frozen=True, kw_only=True)
class RPNConfig:
    """RPN head, anchors, assigner, sampler and proposal settings (reference 1.2, 1.6)."""

    in_channels: int = 256
    feat_channels: int = 256
    anchor_scales: tuple[float, ...] = (8.0,)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    # mmdet AnchorGenerator(center_offset=0): anchor centres sit on the top-left of each stride cell
    # and base anchors are not rounded (torchvision rounds them; reference "torchvision gaps").
    center_offset: float = 0.0
    target_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    pos_iou_thr: float = 0.7
    neg_iou_thr: float = 0.3
    min_pos_iou: float = 0.3
    match_low_quality: bool = True
    num_samples: int = 256
    pos_fraction: float = 0.5
    # -1: anchors crossing the border still get targets (FPN, C4 since PR #7435); 0 for DC5.
    allowed_border: float = -1.0
    loss_bbox: BoxLoss = "l1"
    loss_bbox_weight: float = 1.0
    loss_bbox_beta: float = 1.0  # smooth-L1 only: 1/9 in the pre-#2410 RPN (reference 1.8)
    train: ProposalConfig = ProposalConfig(nms_pre=2000, max_per_img=1000)
    test: ProposalConfig = ProposalConfig(nms_pre=1000, max_per_img=1000)


@dataclass(frozen=True, kw_only=True)
class RoIHeadConfig:
    """RoI extractor, box head, assigner/sampler, box loss and test post-processing."""

    kind: HeadKind = "shared2fc"
    in_channels: int = 256
    roi_size: int = 7  # 14 for C4 (the res5 head then strides it to 7)
    sampling_ratio: int = 0  # mmcv RoIAlign adaptive sampling
    aligned: bool = True  # mmcv RoIAlign default (half-pixel offset)
    featmap_strides: tuple[int, ...] = (4, 8, 16, 32)
    finest_scale: int = 56  # level = floor(log2(sqrt(wh) / 56 + 1e-6)), clamped
    fc_channels: int = 1024
    target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    reg_class_agnostic: bool = False
    # With an IoU-family loss the head decodes deltas into boxes before the loss (reference 1.5).
    reg_decoded_bbox: bool = False
    loss_bbox: BoxLoss = "l1"
    loss_bbox_weight: float = 1.0
    loss_bbox_beta: float = 1.0  # smooth-L1 only (mmdet SmoothL1Loss beta)
    pos_iou_thr: float = 0.5
    neg_iou_thr: float = 0.5
    min_pos_iou: float = 0.5
    match_low_quality: bool = False
    num_samples: int = 512
    pos_fraction: float = 0.25
    add_gt_as_proposals: bool = True
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Training / test image pipeline (reference 1.3, 1.4, 1.5).

    `scale` is (long side, short side) as MMDetection writes it: (1333, 800).
    `train_scale="ms_range"` draws the short side uniformly in [min, max] of `ms_short_sides`;
    "ms_choice" picks one of `ms_short_sides`.
    """

    scale: tuple[int, int] = (1333, 800)
    train_scale: TrainScale = "single"
    ms_short_sides: tuple[int, ...] = ()
    flip_prob: float = 0.5
    pad_divisor: int = 32
    filter_empty_gt: bool = True
    min_size: int = 32
    classes: tuple[str, ...] = ()  # empty: every category of the annotation file


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Optimiser and learning-rate schedule (reference 1.4).

    `lr` is for `base_batch_size` images per iteration; the engine rescales it linearly to the real
    total batch and records that it did. `repeat_times` is mmdet's RepeatDataset (ms-3x: 3 x 12
    "epochs" = 36 real epochs, milestones [9, 11] = real epochs 27 and 33).
    """

    optimizer: Optimizer = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_decay_mult: float = 1.0  # 0.0 for the TNR AdamW recipe: no decay on norm layers
    base_batch_size: int = 16
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    max_epochs: int = 12
    milestones: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    repeat_times: int = 1
    grad_clip: float | None = None


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """One resolved cell: everything needed to build, train and test the detector."""

    name: str = "faster-rcnn_r50_fpn_1x_coco"
    num_classes: int = 80
    normalize: NormalizeConfig = NormalizeConfig()
    backbone: BackboneConfig = BackboneConfig()
    neck: NeckConfig = NeckConfig()
    rpn: RPNConfig = RPNConfig()
    roi_head: RoIHeadConfig = RoIHeadConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    precision: Precision = "fp32"
    loss_scale: float | Literal["dynamic"] = "dynamic"
    # Names of the published initialisations (e.g. "torchvision://resnet50"); the user maps them to
    # local files: nothing is downloaded.
    pretrained: str | None = "torchvision://resnet50"
    load_from: str | None = None
    # Recipe deviations this cell carries (quirk ids from the reference, with a sentence each).
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        return _from_dict(cls, data, "config")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How one cell is run: data, budget and measurement. The profile (smoke / ci / full) fills it.

    `None` budgets mean "the recipe's own": `max_iters=None` trains `schedule.max_epochs` epochs;
    a set `max_iters` scales the epoch milestones to the same fractions of the iteration budget.
    `image_scale` replaces `DataConfig.scale` (and scales the multi-scale short sides with it) for
    the small profiles; the engine records every such deviation in `metrics.json`.
    """

    data_root: str
    train_ann: str = "annotations/instances_train2017.json"
    train_images: str = "train2017"
    val_ann: str | None = "annotations/instances_val2017.json"  # None or missing file: evaluate on train
    val_images: str | None = "val2017"
    device: str = "cpu"
    seed: int = 0
    deterministic: bool = False
    images_per_gpu: int = 2
    workers: int = 2
    max_iters: int | None = None
    warmup_iters: int | None = None  # None: the recipe's 500, capped at a third of max_iters
    image_scale: tuple[int, int] | None = None  # (long, short) override for small profiles
    # Caps every proposal / RoI count of the recipe (RPN nms_pre and max_per_img, RoI samples) for the
    # toy profiles: a C4 cell's res5 head runs once per RoI, so 1000 RoIs per image cannot fit a
    # smoke budget on CPU. None: the recipe's counts. Recorded as a deviation when it changes anything.
    proposal_cap: int | None = None
    eval_max_images: int | None = None
    # Iterations between checkpoints, plus one at the end (what a crash in evaluation resumes from).
    # None: no checkpoints at all, for toy profiles whose cells re-run in seconds (the smoke matrix
    # would otherwise write ~16 GB of final checkpoints).
    checkpoint_interval: int | None = 1000
    log_interval: int = 50
    # fps measured with detections like a trained model's (`detector.bench.pair.set_detection_bias`
    # after evaluation): random or briefly trained weights give next to no detections, which makes
    # post-processing look free.
    bench_detections: bool = False
    # Also measure torchvision's `fasterrcnn_resnet50_fpn`, built alike, training on the same image
    # size in this process (R-50-FPN cells on CUDA only): what the framework alone does to Mem.
    framework_memory: bool = False
    bench_images: int = 0  # fps over this many images after warm-up; 0: no fps measurement
    bench_warmup: int = 5
    pretrained_path: str | None = None  # a local file for `DetectorConfig.pretrained`
    load_from_path: str | None = None  # a local file for `DetectorConfig.load_from`
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _from_dict(cls, data, "run")


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        if value is None and type(None) in get_args(tp):
            return None
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{path}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 loads `1e-4` as a string; accept numeric strings so users need not write 1.0e-4.
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


__all__ = [
    "BackboneConfig",
    "ConfigError",
    "DataConfig",
    "DetectorConfig",
    "NeckConfig",
    "NormalizeConfig",
    "ProposalConfig",
    "RPNConfig",
    "RoIHeadConfig",
    "RunConfig",
    "ScheduleConfig",
]
