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
from torchvision.ops import batched_nms, nms

from detector.config import ProposalConfig, RPNConfig
from detector.errors import ConfigError
from detector.model.anchors import AnchorGenerator, inside_flags
from detector.model.box_ops import BoxCoder, count_ids, stack_padded
from detector.model.losses import DECODED_LOSSES, box_loss, check_box_loss
from detector.model.nms import grouped_nms
from detector.model.sampling import max_iou_assign, random_sample


def topk_per_image(keep: Tensor, image_ids: Tensor, num_images: int, k: int, usable: Tensor | None = None) -> Tensor:
    """From `keep` (indices sorted by decreasing score, any image order) the first `k` of each image,
    grouped by image id (ascending), score order preserved within an image; indices where `usable`
    is False are dropped first. One host sync (the final boolean index), whatever the batch."""
    if usable is not None:
        # Unusable rows (scored -inf by `nms_per_level`) come last within their image: they take
        # no rank before a usable one, so one mask drops them with the rows beyond k.
        keep_usable = usable[keep]
    img = image_ids[keep]
    order = torch.sort(img, stable=True).indices
    keep, img = keep[order], img[order]
    counts = count_ids(img, num_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(img.numel(), device=img.device) - starts[img]
    selected = rank < k
    if usable is not None:
        selected &= keep_usable[order]
    return keep[selected]


# torchvision's `batched_nms` runs one NMS over all groups (boxes offset apart per group) up to
# this many box coordinates on CUDA, and one NMS per group, each a host sync, above it.
TORCHVISION_ONE_CALL_NUMEL_CUDA = 100_000


def nms_per_level(boxes: Tensor, scores: Tensor, image_ids: Tensor, num_images: int, level_sizes: list[int], iou: float) -> Tensor:
    """NMS per (image, level) as one NMS call per level over all images.

    `boxes [N * M, 4]`, `scores [N * M]`, `image_ids [N * M]`: each image's M candidates, level
    blocks of `level_sizes` in order (the layout `RPNHead.proposals` builds). Boxes mmdet would
    drop before NMS carry score -inf: the lowest, they suppress nothing that counts. The groups of
    a level are kept apart by offsetting each image's boxes (torchvision's own `batched_nms` trick).
    Returns the kept indices by decreasing score (ties in index order), -inf ones included.
    No sync but the NMS calls, one per level: torchvision's `batched_nms` falls back to one call
    per group above `TORCHVISION_ONE_CALL_NUMEL_CUDA` (5 x N calls and syncs for N images).
    """
    m = sum(level_sizes)
    rows = torch.arange(num_images, device=boxes.device)[:, None] * m
    kept, start = [], 0
    for size in level_sizes:
        idx = (rows + torch.arange(start, start + size, device=boxes.device)[None, :]).reshape(-1)
        b = boxes[idx]
        offsets = image_ids[idx].to(b) * (b.max() + 1)
        kept.append(idx[nms(b + offsets[:, None], scores[idx], iou)])
        start += size
    # Index order first, then a stable sort by score: equal scores (anchors over padding score
    # exactly alike) come in index order, as batched_nms's per-group path returns them.
    keep = torch.cat(kept).sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def grouped_nms_per_level(boxes: Tensor, scores: Tensor, num_images: int, level_sizes: list[int], iou: float) -> Tensor:
    """NMS per (image, level), all groups decided at once (`nms.grouped_nms`).

    Same layout and return as `nms_per_level`, except that candidates scored -inf (mmdet drops
    them before NMS) take no part and are not returned. The groups are padded to the largest level.
    """
    device = boxes.device
    m, width = sum(level_sizes), max(level_sizes)
    idx = torch.full((num_images, len(level_sizes), width), -1, dtype=torch.long, device=device)
    start = 0
    for lvl, size in enumerate(level_sizes):
        idx[:, lvl, :size] = torch.arange(num_images, device=device)[:, None] * m + torch.arange(start, start + size, device=device)
        start += size
    idx = idx.reshape(-1, width)  # [G, width], G = images x levels
    flat = idx.clamp(min=0)
    group_scores = scores[flat].masked_fill(idx < 0, float("-inf"))
    keep = grouped_nms(boxes[flat], group_scores, iou)
    kept = flat[keep].sort().values  # the one sync: how many were kept
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


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
        # One NMS per FPN level (each over all images) instead of one over every (image, level)
        # group: on CUDA torchvision's NMS is quadratic in the boxes of a call and its keep pass
        # is sequential, so 5 calls of 4,000 boxes may cost less than one of 20,000. Same groups,
        # same kept boxes. Taken anyway on CUDA where torchvision would run one NMS per group (more
        # than 25,000 candidates: 3 or more images per GPU); below that a candidate, off until
        # measured on a GPU (`python -m detector.bench.gpu --ablation`).
        self.nms_per_level = False
        # All (image, level) groups decided side by side with tensor operations (`nms.grouped_nms`)
        # instead of torchvision's NMS, whose keep pass walks every box of a call in one thread
        # block. Same kept boxes; a candidate, off until measured on a GPU.
        self.grouped_nms = False

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
        *,
        head_out: tuple[list[Tensor], list[Tensor]] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`image_sizes`, `pad_shapes`: `Tensor[N, 2]` (h, w) of each resized image and of it padded
        to the size divisor. `head_out`: `self.head(feats)` when the caller ran it already (the
        detector's `dense` part, replayed from a CUDA graph in inference)."""
        if len(feats) != len(self.anchor_generator.strides):
            raise ConfigError(f"rpn.anchor_strides: {len(self.anchor_generator.strides)} strides for {len(feats)} feature levels")
        logits, deltas = self.head(feats) if head_out is None else head_out
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
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        wh = boxes[:, 2:] - boxes[:, :2]
        usable = (wh > cfg.min_bbox_size).all(dim=1)  # mmdet drops the others before NMS
        # Boxes mmdet drops before NMS are scored -inf rather than selected out (a nonzero, a host
        # sync on CUDA): the lowest of their group, they suppress nothing that is kept, and the
        # top-k below drops them.
        nms_scores = scores.masked_fill(~usable, float("-inf"))
        if self.grouped_nms:
            sizes = [s.shape[1] for s in top_scores]
            keep = grouped_nms_per_level(boxes, nms_scores, n, sizes, cfg.nms_iou)
        elif self.nms_per_level or (boxes.is_cuda and boxes.numel() > TORCHVISION_ONE_CALL_NUMEL_CUDA):
            sizes = [s.shape[1] for s in top_scores]
            keep = nms_per_level(boxes, nms_scores, image_ids, n, sizes, cfg.nms_iou)
        else:
            groups = image_ids * len(anchors) + torch.cat(levels).repeat(n)
            keep = batched_nms(boxes, nms_scores, groups, cfg.nms_iou)
        keep = topk_per_image(keep, image_ids, n, cfg.max_per_img, usable)
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
        gts = stack_padded([t["boxes"].to(anchors.device, torch.float32) for t in targets])  # [N, G_max, 4]
        gt_inds = []
        for i, target in enumerate(targets):
            assigned, _ = max_iou_assign(
                anchors,
                gts[i, : target["boxes"].shape[0]],
                pos_iou_thr=c.pos_iou_thr,
                neg_iou_thr=c.neg_iou_thr,
                min_pos_iou=c.min_pos_iou,
                match_low_quality=c.match_low_quality,
                prior_valid=inside_flags(anchors, valid[i], image_sizes[i], c.allowed_border),
            )
            gt_inds.append(assigned)
        assigned = torch.stack(gt_inds)  # [N, K]
        s = random_sample(assigned, num=c.num_samples, pos_fraction=c.pos_fraction)  # [N, num] slots
        rows = torch.arange(len(targets), device=anchors.device)[:, None]
        cls_pred = logits.gather(1, s.picked).float()
        sample_anchors = anchors[s.picked]  # [N, num, 4]
        matched = gts[rows, (assigned.gather(1, s.picked) - 1).clamp(min=0)]
        # A slot that holds no positive regresses its anchor onto itself: finite, and weighted out.
        box_target = self.coder.encode(sample_anchors, torch.where(s.positive[..., None], matched, sample_anchors))
        # mmdet's avg_factor: the sampled anchors (positives and negatives) of the whole batch.
        avg_factor = s.valid.sum().clamp(min=1)
        bce = F.binary_cross_entropy_with_logits(cls_pred, s.positive.float(), reduction="none")
        loss_cls = torch.where(s.valid, bce, 0.0).sum() / avg_factor
        loss_bbox = box_loss(
            c.loss_bbox, deltas[rows, s.picked].flatten(0, 1), box_target.flatten(0, 1), weight=s.positive.flatten(),
            avg_factor=avg_factor, loss_weight=c.loss_bbox_weight, smooth_l1_beta=c.loss_bbox_beta,
        )
        return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}


__all__ = ["TORCHVISION_ONE_CALL_NUMEL_CUDA", "RPNHead", "grouped_nms_per_level", "nms_per_level", "topk_per_image"]
