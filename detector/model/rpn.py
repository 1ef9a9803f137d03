"""Region proposal network: MMDetection's `RPNHead` with its anchor targets, losses and proposals.

Shorthand: N images, L feature levels, A anchors per location, K_l = H_l * W_l * A anchors of level l,
K = sum_l K_l, G ground-truth boxes of one image. Proposals leave this module as RoIs `Tensor[R, 5]`
(batch index, x1, y1, x2, y2), grouped by image in ascending batch index, each image's rows sorted by
decreasing objectness: the layout `torchvision.ops.roi_align` takes, so no per-image lists are built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detector.config import ProposalConfig, RPNConfig
from detector.errors import ConfigError
from detector.model.anchors import AnchorGenerator, inside_flags
from detector.model.box_ops import BoxCoder
from detector.model.losses import DECODED_LOSSES, box_loss, check_box_loss
from detector.model.sampling import max_iou_assign, random_sample


def topk_per_image(keep: Tensor, image_ids: Tensor, num_images: int, k: int) -> Tensor:
    """From `keep` (indices sorted by decreasing score, any image order) the first `k` of each image,
    grouped by image id (ascending), score order preserved within an image. No host sync."""
    img = image_ids[keep]
    order = torch.sort(img, stable=True).indices
    keep, img = keep[order], img[order]
    counts = torch.bincount(img, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(img.numel(), device=img.device) - starts[img]
    return keep[rank < k]


def nms_per_level(boxes: Tensor, scores: Tensor, groups: Tensor, num_levels: int, iou: float) -> Tensor:
    """`batched_nms(boxes, scores, groups, iou)` with groups `image * num_levels + level`, run as one
    call per level: the kept indices, by decreasing score (as batched_nms returns them)."""
    levels = groups % num_levels
    kept = []
    for lvl in range(num_levels):
        idx = torch.nonzero(levels == lvl).squeeze(1)
        kept.append(idx[batched_nms(boxes[idx], scores[idx], groups[idx], iou)])
    # Index order first, then a stable sort by score: equal scores (anchors over padding score
    # exactly alike) come in index order, as batched_nms's per-group path returns them.
    keep = torch.cat(kept).sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


class RPNHead(nn.Module):
    """mmdet `RPNHead` (`num_convs=1`): shared 3x3 conv + ReLU, sigmoid objectness `rpn_cls` (A
    channels) and `rpn_reg` (4A channels), all Normal(0, 0.01) with zero bias (reference 1.2).

    `forward(feats, image_sizes, pad_shapes, targets=None) -> (rois Tensor[R, 5], losses dict)`;
    losses are `{}` unless `targets` is given.
    """

    def __init__(self, cfg: RPNConfig) -> None:
        super().__init__()
        check_box_loss(cfg.loss_bbox, field="rpn.loss_bbox")
        if cfg.loss_bbox in DECODED_LOSSES:
            raise ConfigError(f"rpn.loss_bbox: {cfg.loss_bbox!r} needs decoded boxes; allowed for the RPN: 'l1', 'smooth_l1'")
        self.cfg = cfg
        self.anchor_generator = AnchorGenerator(
            strides=cfg.anchor_strides, scales=cfg.anchor_scales, ratios=cfg.anchor_ratios, center_offset=cfg.center_offset
        )
        a = self.anchor_generator.num_anchors
        self.rpn_conv = nn.Conv2d(cfg.in_channels, cfg.feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(cfg.feat_channels, a, 1)
        self.rpn_reg = nn.Conv2d(cfg.feat_channels, 4 * a, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.coder = BoxCoder(cfg.target_stds)
        # One `batched_nms` per FPN level (each over all images) instead of one over every (image,
        # level) group: on CUDA torchvision's NMS is quadratic in the boxes of a call and its keep
        # pass is sequential, so 5 calls of 4,000 boxes cost far less than one of 20,000, for 4 more
        # host syncs. Same groups, same kept boxes. A candidate, off until measured on a GPU
        # (`python -m detector.bench.gpu --ablation`).
        self.nms_per_level = False

    def head(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness logits `Tensor[N, K_l]` and deltas `Tensor[N, K_l, 4]`, in anchor order."""
        logits, deltas = [], []
        for f in feats:
            x = F.relu(self.rpn_conv(f), inplace=True)  # in place: the conv's backward does not need its output
            n = x.shape[0]
            logits.append(self.rpn_cls(x).permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(self.rpn_reg(x).permute(0, 2, 3, 1).reshape(n, -1, 4))
        return logits, deltas

    def forward(
        self,
        feats: list[Tensor],
        image_sizes: Tensor,
        pad_shapes: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`image_sizes`, `pad_shapes`: `Tensor[N, 2]` (h, w) of each resized image and of it padded
        to the size divisor."""
        if len(feats) != len(self.anchor_generator.strides):
            raise ConfigError(f"rpn.anchor_strides: {len(self.anchor_generator.strides)} strides for {len(feats)} feature levels")
        logits, deltas = self.head(feats)
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]
        anchors = self.anchor_generator.grid_anchors(sizes, feats[0].device)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            valid = self.anchor_generator.valid_flags(sizes, pad_shapes)
            losses = self.loss(torch.cat(anchors), valid, torch.cat(logits, 1), torch.cat(deltas, 1), image_sizes, targets)
        phase = self.cfg.train if targets is not None else self.cfg.test
        with torch.no_grad():  # mmdet detaches scores and deltas before proposing (`select_single_mlvl`)
            rois = self.proposals(anchors, [x.detach() for x in logits], [x.detach() for x in deltas], image_sizes, phase)
        return rois, losses

    def proposals(
        self, anchors: list[Tensor], logits: list[Tensor], deltas: list[Tensor], image_sizes: Tensor, cfg: ProposalConfig
    ) -> Tensor:
        """mmdet `RPNHead._predict_by_feat_single`, batched over images: per level the `nms_pre`
        highest-scoring anchors, decode + clip to the image, drop boxes with w or h <= min_bbox_size,
        NMS per (image, level) with `batched_nms`, then the best `max_per_img` per image."""
        n = image_sizes.shape[0]
        top_scores, top_deltas, top_anchors, levels = [], [], [], []
        for lvl, (a, s, d) in enumerate(zip(anchors, logits, deltas)):
            # Rank sigmoid scores with `sort`, exactly mmdet's call, not logits with `topk`: distinct
            # float32 logits can share one sigmoid value (and anchors over padding score exactly
            # alike), and topk cuts such ties elsewhere than mmdet's sort (parity, D2a). On CPU a
            # row of this batched sort orders ties as the same sort of that row alone (tested).
            s = s.float().sigmoid()
            if 0 < cfg.nms_pre < s.shape[1]:
                s, idx = s.sort(dim=1, descending=True)
                s, idx = s[:, : cfg.nms_pre], idx[:, : cfg.nms_pre]
                d = d.gather(1, idx[..., None].expand(-1, -1, 4))
                a = a[idx]
            else:
                a = a[None].expand(n, -1, -1)
            top_scores.append(s)
            top_deltas.append(d)
            top_anchors.append(a)
            levels.append(torch.full((s.shape[1],), lvl, dtype=torch.long, device=s.device))
        scores = torch.cat(top_scores, 1)  # [N, M]
        m = scores.shape[1]
        boxes = self.coder.decode(torch.cat(top_anchors, 1), torch.cat(top_deltas, 1), image_sizes[:, None, :])
        image_ids = torch.arange(n, device=scores.device)[:, None].expand(n, m).reshape(-1)
        groups = image_ids * len(anchors) + torch.cat(levels).repeat(n)
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        wh = boxes[:, 2:] - boxes[:, :2]
        # One nonzero (a host sync on CUDA) for the four tensors, not one per boolean index.
        ok = torch.nonzero((wh > cfg.min_bbox_size).all(dim=1)).squeeze(1)
        boxes, scores, image_ids, groups = boxes[ok], scores[ok], image_ids[ok], groups[ok]
        if self.nms_per_level:
            keep = nms_per_level(boxes, scores, groups, len(anchors), cfg.nms_iou)
        else:
            keep = batched_nms(boxes, scores, groups, cfg.nms_iou)
        keep = topk_per_image(keep, image_ids, n, cfg.max_per_img)
        return torch.cat([image_ids[keep, None].to(boxes.dtype), boxes[keep]], dim=1)

    def loss(
        self,
        anchors: Tensor,
        valid: Tensor,
        logits: Tensor,
        deltas: Tensor,
        image_sizes: Tensor,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Objectness BCE and box loss over the sampled anchors of the batch (mmdet `AnchorHead.loss`).

        `anchors`: `Tensor[K, 4]`; `valid`: `Tensor[N, K]`; `logits`: `Tensor[N, K]`; `deltas`:
        `Tensor[N, K, 4]`. Both terms are divided by the number of sampled anchors (positives and
        negatives) over the batch, mmdet's `avg_factor` for a `RandomSampler`.
        """
        c = self.cfg
        sizes = image_sizes.tolist()
        cls_pred, cls_target, box_pred, box_target = [], [], [], []
        for i, target in enumerate(targets):
            gt = target["boxes"].to(anchors.device, torch.float32)
            inside = torch.nonzero(inside_flags(anchors, valid[i], sizes[i], c.allowed_border)).squeeze(1)
            gt_inds, _ = max_iou_assign(
                anchors[inside],
                gt,
                pos_iou_thr=c.pos_iou_thr,
                neg_iou_thr=c.neg_iou_thr,
                min_pos_iou=c.min_pos_iou,
                match_low_quality=c.match_low_quality,
            )
            pos, neg = random_sample(gt_inds, num=c.num_samples, pos_fraction=c.pos_fraction)
            pos_anchor_ids, neg_anchor_ids = inside[pos], inside[neg]
            cls_pred.append(torch.cat([logits[i, pos_anchor_ids], logits[i, neg_anchor_ids]]))
            cls_target.append(torch.cat([logits.new_ones(pos.numel()), logits.new_zeros(neg.numel())]))
            box_pred.append(deltas[i, pos_anchor_ids])
            box_target.append(self.coder.encode(anchors[pos_anchor_ids], gt[gt_inds[pos] - 1]))
        cls_pred_t, cls_target_t = torch.cat(cls_pred).float(), torch.cat(cls_target).float()
        avg_factor = max(cls_pred_t.numel(), 1)
        loss_cls = F.binary_cross_entropy_with_logits(cls_pred_t, cls_target_t, reduction="sum") / avg_factor
        loss_bbox = box_loss(
            c.loss_bbox, torch.cat(box_pred), torch.cat(box_target), avg_factor=avg_factor, loss_weight=c.loss_bbox_weight,
            smooth_l1_beta=c.loss_bbox_beta,
        )
        return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}


__all__ = ["RPNHead", "nms_per_level", "topk_per_image"]
