"""Our R-50-FPN Faster R-CNN and torchvision's `fasterrcnn_resnet50_fpn`, built alike for
`detector.bench.vs_torchvision`.

Alike means: the same random weights (ours are copied into theirs, class rows reordered: mmdet puts
background last, torchvision first), the same proposal counts, classes, thresholds and anchors, the
same image (ours gets RGB in [0, 255], theirs the same pixels / 255 at the size its transform keeps)
and the same targets. What cannot be alike is listed in `DIFFERENCES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from detector.config import DetectorConfig
from detector.model.faster_rcnn import FasterRCNN, build_detector

# What stays different between the two models; each is the recipe (mmdet) against torchvision.
DIFFERENCES: tuple[str, ...] = (
    "RoIAlign: ours sampling_ratio=0 (adaptive, ceil(roi_size / 7) samples per bin side) and "
    "aligned=True (mmcv defaults); torchvision sampling_ratio=2, aligned=False",
    "backbone norm: ours nn.BatchNorm2d with frozen statistics and a trainable affine in res3-res5 "
    "(mmdet norm_eval=True, requires_grad=True); torchvision FrozenBatchNorm2d (affine not trained)",
    "box losses: ours L1 (RPN and RoI head); torchvision smooth L1 with beta 1/9",
    "anchors: torchvision rounds its base anchors to integers; mmdet does not",
    "proposals: torchvision also drops boxes under 1e-3 px (RPN) and 1e-2 px (detections); mmdet does not",
    "input: torchvision's transform normalises and bilinearly resizes (a 1.0 scale here) inside the "
    "call; ours normalises and pads inside the call, the data pipeline resizes",
    "init: fc6/fc7, FPN and RPN weights are ours copied over (Xavier, mmdet's), not torchvision's own init",
)


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """One benchmark run. `size` is (h, w) of the image both models see unchanged."""

    size: tuple[int, int] = (800, 1333)
    pairs: int = 7
    train_pairs: int = 5
    warmup: int = 1
    threads: int = 2
    train_images: int = 2
    gt_per_image: int = 8
    seed: int = 0
    # Detections from random weights: both classifiers get +`det_bias` on these foreground classes
    # (the other logits are ~0), so their softmax score passes the 0.05 threshold in both models.
    det_classes: int = 2
    det_bias: float = 4.0
    memory: bool = True



def our_config() -> DetectorConfig:
    """faster-rcnn_r50_fpn_1x_coco (the `DetectorConfig` defaults), 80 classes."""
    return DetectorConfig()


def torchvision_kwargs(cfg: DetectorConfig, size: tuple[int, int]) -> dict[str, Any]:
    """`torchvision.models.detection.FasterRCNN` keyword arguments equal to `cfg` (reference 1.2).

    `min_size` / `max_size` are the short / long side of `size`, so torchvision's transform keeps a
    `size` image at scale 1.0 (800 x 1333 -> 800, 1333, as for ours).
    """
    rpn, roi, norm = cfg.rpn, cfg.roi_head, cfg.normalize
    if rpn.train.nms_iou != rpn.test.nms_iou:
        raise ValueError("torchvision has one rpn_nms_thresh for train and test")
    return {
        "min_size": min(size),
        "max_size": max(size),
        "image_mean": [m / 255 for m in norm.mean],
        "image_std": [s / 255 for s in norm.std],
        "rpn_pre_nms_top_n_train": rpn.train.nms_pre,
        "rpn_pre_nms_top_n_test": rpn.test.nms_pre,
        "rpn_post_nms_top_n_train": rpn.train.max_per_img,
        "rpn_post_nms_top_n_test": rpn.test.max_per_img,
        "rpn_nms_thresh": rpn.test.nms_iou,
        "rpn_fg_iou_thresh": rpn.pos_iou_thr,
        "rpn_bg_iou_thresh": rpn.neg_iou_thr,
        "rpn_batch_size_per_image": rpn.num_samples,
        "rpn_positive_fraction": rpn.pos_fraction,
        "rpn_score_thresh": 0.0,
        "box_score_thresh": roi.score_thr,
        "box_nms_thresh": roi.nms_iou,
        "box_detections_per_img": roi.max_per_img,
        "box_fg_iou_thresh": roi.pos_iou_thr,
        "box_bg_iou_thresh": roi.neg_iou_thr,
        "box_batch_size_per_image": roi.num_samples,
        "box_positive_fraction": roi.pos_fraction,
    }


def has_torchvision_counterpart(cfg: DetectorConfig) -> bool:
    """Whether torchvision builds this cell's model: ResNet-50 (not ResNeXt), pytorch style, FPN."""
    bb = cfg.backbone
    return bb.depth == 50 and bb.groups == 1 and bb.style == "pytorch" and cfg.neck.kind == "fpn"


def build_torchvision(cfg: DetectorConfig, size: tuple[int, int]) -> TVFasterRCNN:
    """torchvision's R-50-FPN Faster R-CNN as `fasterrcnn_resnet50_fpn` builds it for a user who
    fine-tunes from ImageNet weights (FrozenBatchNorm2d, `trainable_backbone_layers=3`: stem and res2
    frozen like our `frozen_stages=1`), with `num_classes` = ours + background and random weights.

    (`fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)` would switch to training
    BatchNorm2d with batch statistics and all stages trainable: a setup nobody trains a detector in.)
    """
    if not has_torchvision_counterpart(cfg):
        raise ValueError("build_torchvision: only the R-50-FPN cell has a torchvision counterpart")
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=4 - cfg.backbone.frozen_stages)
    return TVFasterRCNN(backbone, num_classes=cfg.num_classes + 1, **torchvision_kwargs(cfg, size))


def _tv_key(key: str) -> str | None:
    """Our state-dict key -> torchvision's (None: no counterpart, e.g. `num_batches_tracked`)."""
    if key.endswith("num_batches_tracked"):
        return None
    head, _, rest = key.partition(".")
    if head == "backbone":
        return f"backbone.body.{rest}"
    renames = {
        "neck.lateral_convs.": "backbone.fpn.inner_blocks.",
        "neck.fpn_convs.": "backbone.fpn.layer_blocks.",
        "rpn_head.rpn_conv.": "rpn.head.conv.0.0.",
        "rpn_head.rpn_cls.": "rpn.head.cls_logits.",
        "rpn_head.rpn_reg.": "rpn.head.bbox_pred.",
        "roi_head.bbox_head.shared_fcs.0.": "roi_heads.box_head.fc6.",
        "roi_head.bbox_head.shared_fcs.1.": "roi_heads.box_head.fc7.",
        "roi_head.bbox_head.fc_cls.": "roi_heads.box_predictor.cls_score.",
        "roi_head.bbox_head.fc_reg.": "roi_heads.box_predictor.bbox_pred.",
    }
    for ours, theirs in renames.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :].replace("conv.", "0.", 1) if ours.startswith("neck") else theirs + key[len(ours) :]
    raise KeyError(f"no torchvision counterpart for {key!r}")


@torch.no_grad()
def copy_weights(ours: FasterRCNN, theirs: TVFasterRCNN) -> None:
    """Load our weights into torchvision's model. The classifier's background row moves from last
    (mmdet) to first (torchvision); torchvision's background regression rows (never used) get 0."""
    theirs_sd = theirs.state_dict()
    for key, value in ours.state_dict().items():
        tv = _tv_key(key)
        if tv is None:
            continue
        if tv.startswith("roi_heads.box_predictor.cls_score."):
            value = torch.cat([value[-1:], value[:-1]])
        elif tv.startswith("roi_heads.box_predictor.bbox_pred."):
            value = torch.cat([torch.zeros_like(value[:4]), value])
        if theirs_sd[tv].shape != value.shape:
            raise ValueError(f"copy_weights: {key} {tuple(value.shape)} -> {tv} {tuple(theirs_sd[tv].shape)}")
        theirs_sd[tv].copy_(value)


@torch.no_grad()
def set_detection_bias(ours: FasterRCNN, *, classes: int, bias: float) -> None:
    """Raise the classifier bias of foreground classes 0..classes-1 (ours) so random weights detect."""
    fc_cls: nn.Linear = ours.roi_head.bbox_head.fc_cls  # type: ignore[assignment]
    fc_cls.bias[:classes] = bias


def build_pair(settings: BenchSettings) -> tuple[FasterRCNN, TVFasterRCNN]:
    """Both detectors with the same random weights, in eval mode."""
    torch.manual_seed(settings.seed)
    cfg = our_config()
    ours = build_detector(cfg)
    set_detection_bias(ours, classes=settings.det_classes, bias=settings.det_bias)
    theirs = build_torchvision(cfg, settings.size)
    copy_weights(ours, theirs)
    return ours.eval(), theirs.eval()


def make_inputs(settings: BenchSettings, num_images: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """`num_images` random RGB images `[3, h, w]` in [0, 255] (integers, as decoded JPEGs are) and
    `gt_per_image` random boxes each, labels in [0, 80) (ours; torchvision's are + 1)."""
    g = torch.Generator().manual_seed(settings.seed + 1)
    h, w = settings.size
    images, targets = [], []
    for _ in range(num_images):
        images.append(torch.randint(0, 256, (3, h, w), generator=g).float())
        xy = torch.rand(settings.gt_per_image, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.1 + 0.2 * torch.rand(settings.gt_per_image, 2, generator=g)) * torch.tensor([w, h])
        labels = torch.randint(0, 80, (settings.gt_per_image,), generator=g)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
    return images, targets


def theirs_inputs(images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The same images as torchvision wants them ([0, 1] floats) and labels with background 0."""
    return [im / 255 for im in images], [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]


__all__ = ["DIFFERENCES", "BenchSettings", "build_pair", "build_torchvision", "copy_weights", "has_torchvision_counterpart",
           "make_inputs", "our_config",
           "set_detection_bias", "theirs_inputs", "torchvision_kwargs"]
