"""Second stage: MMDetection's `StandardRoIHead` with a `Shared2FCBBoxHead` (FPN, DC5) or the C4
shared res5 head + `BBoxHead(with_avg_pool=True)`.

Shorthand: R RoIs `Tensor[R, 5]` (batch index, x1y1x2y2), C foreground classes, C + 1 logits with
background LAST (mmdet v2 convention, reference 1.8), class-specific regression `Tensor[R, 4C]`
laid out class-major (class c owns columns 4c..4c+3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detector.config import BackboneConfig, RoIHeadConfig
from detector.errors import ConfigError
from detector.model.backbones import ResLayerHead
from detector.model.box_ops import BoxCoder, count_ids, pad_per_image, stack_padded
from detector.model.losses import DECODED_LOSSES, box_loss, check_box_loss
from detector.model.poolers import RoIPooler
from detector.model.rpn import topk_per_image
from detector.model.sampling import max_iou_assign, random_sample


def _init_predictors(fc_cls: nn.Linear, fc_reg: nn.Linear) -> None:
    # mmdet BBoxHead init_cfg: fc_cls Normal(0, 0.01), fc_reg Normal(0, 0.001), zero bias.
    nn.init.normal_(fc_cls.weight, std=0.01)
    nn.init.normal_(fc_reg.weight, std=0.001)
    nn.init.zeros_(fc_cls.bias)
    nn.init.zeros_(fc_reg.bias)


class Shared2FCBBoxHead(nn.Module):
    """`forward(x: Tensor[R, C_in, S, S]) -> (cls Tensor[R, C+1], reg Tensor[R, 4C or 4])`.

    Two shared FC + ReLU layers (Xavier-uniform, zero bias), then `fc_cls` and `fc_reg`.
    """

    def __init__(self, *, in_channels: int, roi_size: int, fc_channels: int, num_classes: int, reg_dim: int) -> None:
        super().__init__()
        fcs = [nn.Linear(in_channels * roi_size * roi_size, fc_channels), nn.Linear(fc_channels, fc_channels)]
        for fc in fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.shared_fcs = nn.ModuleList(fcs)
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, reg_dim)
        _init_predictors(self.fc_cls, self.fc_reg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class AvgPoolBBoxHead(nn.Module):
    """C4's `BBoxHead(with_avg_pool=True)`: global average pool of the res5 output, then fc_cls /
    fc_reg. `forward(x: Tensor[R, 2048, 7, 7]) -> (Tensor[R, C+1], Tensor[R, 4C])`."""

    def __init__(self, *, in_channels: int, num_classes: int, reg_dim: int) -> None:
        super().__init__()
        self.fc_cls = nn.Linear(in_channels, num_classes + 1)
        self.fc_reg = nn.Linear(in_channels, reg_dim)
        _init_predictors(self.fc_cls, self.fc_reg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.mean(dim=(2, 3))
        return self.fc_cls(x), self.fc_reg(x)


class StandardRoIHead(nn.Module):
    """RoI sampling, box head, losses and test-time post-processing.

    `loss(feats, rois, targets) -> {"loss_cls", "loss_bbox"}`;
    `predict(feats, rois, image_sizes, scale_factors) -> list[dict(boxes, scores, labels)]`.
    """

    def __init__(self, cfg: RoIHeadConfig, *, num_classes: int, backbone: BackboneConfig) -> None:
        super().__init__()
        check_box_loss(cfg.loss_bbox, field="roi_head.loss_bbox")
        if cfg.loss_bbox in DECODED_LOSSES and not cfg.reg_decoded_bbox:
            raise ConfigError(f"roi_head.reg_decoded_bbox: must be true for loss_bbox {cfg.loss_bbox!r}; allowed: true")
        self.cfg = cfg
        self.num_classes = num_classes
        self.bbox_roi_extractor = RoIPooler(
            output_size=cfg.roi_size,
            featmap_strides=cfg.featmap_strides,
            sampling_ratio=cfg.sampling_ratio,
            aligned=cfg.aligned,
            finest_scale=cfg.finest_scale,
        )
        reg_dim = 4 if cfg.reg_class_agnostic else 4 * num_classes
        self.shared_head: ResLayerHead | None = None
        if cfg.kind == "res5":
            self.shared_head = ResLayerHead(backbone)
            self.bbox_head: nn.Module = AvgPoolBBoxHead(in_channels=self.shared_head.out_channels, num_classes=num_classes, reg_dim=reg_dim)
        elif cfg.kind == "shared2fc":
            self.bbox_head = Shared2FCBBoxHead(
                in_channels=cfg.in_channels, roi_size=cfg.roi_size, fc_channels=cfg.fc_channels, num_classes=num_classes, reg_dim=reg_dim
            )
        else:
            raise ConfigError(f"roi_head.kind: {cfg.kind!r} is not allowed; allowed: 'shared2fc', 'res5'")
        self.coder = BoxCoder(cfg.target_stds)

    def forward_box(self, feats: list[Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        """RoIAlign -> (res5) -> box head: float32 `(cls [R, C+1], reg [R, 4C])`."""
        x = self.bbox_roi_extractor(feats, rois)
        if self.shared_head is not None:
            x = self.shared_head(x)
        cls, reg = self.bbox_head(x)
        return cls.float(), reg.float()

    def _class_deltas(self, reg: Tensor, labels: Tensor) -> Tensor:
        """The 4 regression outputs of each RoI's own class: `Tensor[R, 4]`."""
        if self.cfg.reg_class_agnostic:
            return reg
        return reg.view(reg.shape[0], reg.shape[1] // 4, 4)[torch.arange(reg.shape[0], device=reg.device), labels]

    def sample(self, rois: Tensor, targets: list[dict[str, Tensor]], *, max_rois_per_image: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """mmdet `MaxIoUAssigner` + `RandomSampler(add_gt_as_proposals=True)`, in fixed-size slots.

        `rois [R, 5]` grouped by image (the RPN's layout), at most `max_rois_per_image` each (the
        RPN's `max_per_img`; default R). Returns, flattened over `N x num_samples` slots, the sampled
        `rois [S, 5]`, `labels [S]` (C = background), matched `gt_boxes [S, 4]` (the RoI itself
        where the slot holds no positive) and `valid [S]` (a slot holds a sample). Positives come
        first within each image, as mmdet orders them.
        """
        c, n = self.cfg, len(targets)
        device = rois.device
        props, prop_valid = pad_per_image(rois, n, max_rois_per_image or rois.shape[0])  # [N, P, 4], [N, P]
        gts = stack_padded([t["boxes"].to(device, torch.float32) for t in targets])  # [N, G, 4]
        gt_labels = stack_padded([t["labels"].to(device, torch.long) for t in targets], gts.shape[1])
        num_gts = torch.tensor([t["boxes"].shape[0] for t in targets]).to(device, non_blocking=True)[:, None]
        gt_slot = torch.arange(1, gts.shape[1] + 1, device=device)[None, :]
        assigned = [
            max_iou_assign(props[i], gts[i, : t["boxes"].shape[0]], pos_iou_thr=c.pos_iou_thr, neg_iou_thr=c.neg_iou_thr,
                           min_pos_iou=c.min_pos_iou, match_low_quality=c.match_low_quality, prior_valid=prop_valid[i])[0]
            for i, t in enumerate(targets)
        ]  # fmt: skip
        # mmdet adds the gts in front of the proposals after assignment, each matched to itself
        # (padding rows of images with fewer gts stay out: -1).
        gt_inds = torch.where(gt_slot <= num_gts, gt_slot, -1) if c.add_gt_as_proposals else torch.full_like(gt_slot, -1).expand(n, -1)
        gt_inds = torch.cat([gt_inds, torch.stack(assigned)], dim=1)  # [N, G + P]
        candidates = torch.cat([gts, props], dim=1)
        s = random_sample(gt_inds, num=c.num_samples, pos_fraction=c.pos_fraction)
        rows = torch.arange(n, device=device)[:, None]
        boxes = candidates[rows, s.picked]  # [N, num, 4]
        matched = (gt_inds.gather(1, s.picked) - 1).clamp(min=0)
        labels = torch.where(s.positive, gt_labels[rows, matched], self.num_classes)
        gt_boxes = torch.where(s.positive[..., None], gts[rows, matched], boxes)
        image_ids = rows.expand_as(s.picked).to(boxes.dtype)[..., None]
        return torch.cat([image_ids, boxes], dim=2).flatten(0, 1), labels.flatten(), gt_boxes.flatten(0, 1), s.valid.flatten()

    def loss(self, feats: list[Tensor], rois: Tensor, targets: list[dict[str, Tensor]], *,
             max_rois_per_image: int | None = None) -> dict[str, Tensor]:  # fmt: skip
        """Softmax CE over all sampled RoIs and the box loss of the positives, both divided by the
        number of sampled RoIs in the batch (mmdet `BBoxHead.loss`, `avg_factor=bbox_targets.size(0)`)."""
        rois, labels, gt_boxes, valid = self.sample(rois.detach(), targets, max_rois_per_image=max_rois_per_image)
        cls, reg = self.forward_box(feats, rois)
        avg_factor = valid.sum().clamp(min=1)
        loss_cls = torch.where(valid, F.cross_entropy(cls, labels, reduction="none"), 0.0).sum() / avg_factor
        positive = labels < self.num_classes
        pred = self._class_deltas(reg, labels.clamp(max=self.num_classes - 1))
        if self.cfg.reg_decoded_bbox:
            # IoU-family losses compare boxes: decode (no clipping, as mmdet's loss does) first.
            pred, target = self.coder.decode(rois[:, 1:], pred), gt_boxes
        else:
            target = self.coder.encode(rois[:, 1:], gt_boxes)
        loss_bbox = box_loss(self.cfg.loss_bbox, pred, target, weight=positive, avg_factor=avg_factor,
                             loss_weight=self.cfg.loss_bbox_weight, smooth_l1_beta=self.cfg.loss_bbox_beta)  # fmt: skip
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}

    @torch.no_grad()
    def predict(
        self, feats: list[Tensor], rois: Tensor, image_sizes: Tensor, scale_factors: Tensor | None = None
    ) -> list[dict[str, Tensor]]:
        """mmdet `BBoxHead.predict_by_feat` + `multiclass_nms`, batched over images.

        Softmax scores, class-specific decode clipped to each resized image, optional rescale by
        `scale_factors [N, 2]` (x, y) to original pixels (before NMS, as mmdet), keep scores >
        `score_thr`, NMS per (image, class), best `max_per_img` per image.
        """
        c, n, k = self.cfg, image_sizes.shape[0], self.num_classes
        cls, reg = self.forward_box(feats, rois)
        scores = F.softmax(cls, dim=1)[:, :k]  # background (last) dropped
        img = rois[:, 0].long()
        deltas = reg.view(reg.shape[0], reg.shape[1] // 4, 4).expand(-1, k, -1)
        boxes = self.coder.decode(rois[:, None, 1:], deltas, image_sizes[img][:, None, :])  # [R, C, 4]
        if scale_factors is not None:
            boxes = boxes * scale_factors[img].repeat(1, 2)[:, None, :]
        r_idx, c_idx = torch.nonzero(scores > c.score_thr, as_tuple=True)
        boxes, scores, img = boxes[r_idx, c_idx], scores[r_idx, c_idx], img[r_idx]
        keep = batched_nms(boxes, scores, img * k + c_idx, c.nms_iou)
        keep = topk_per_image(keep, img, n, c.max_per_img)
        counts = count_ids(img[keep], n).tolist()  # the one sync: the host splits the detections
        return [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(boxes[keep].split(counts), scores[keep].split(counts), c_idx[keep].split(counts))
        ]


__all__ = ["AvgPoolBBoxHead", "Shared2FCBBoxHead", "StandardRoIHead"]
