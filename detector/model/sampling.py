"""MMDetection's `MaxIoUAssigner` and `RandomSampler`, for one image at a time.

Shorthand: G ground-truth boxes, P priors (anchors or proposals). An assignment is a
`Tensor[P]` int64 of mmdet `gt_inds`: -1 ignore, 0 negative (background), i + 1 matched to gt i.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detector.model.box_ops import box_iou


def max_iou_assign(
    priors: Tensor,
    gt_boxes: Tensor,
    *,
    pos_iou_thr: float,
    neg_iou_thr: float,
    min_pos_iou: float,
    match_low_quality: bool,
) -> tuple[Tensor, Tensor]:
    """mmdet `MaxIoUAssigner.assign` (`gt_max_assign_all=True`, no ignore boxes).

    Returns `(gt_inds[P], max_overlaps[P])`. A prior is negative when its best IoU is in
    [0, neg_iou_thr), positive when >= pos_iou_thr. With `match_low_quality`, each gt whose best IoU
    is >= `min_pos_iou` also claims every prior that reaches that best IoU (ties included); when
    several gts claim a prior the later gt wins, as mmdet's loop over gts does.
    """
    num_priors, num_gts = priors.shape[0], gt_boxes.shape[0]
    if num_gts == 0 or num_priors == 0:
        # No gt: every prior is background (mmdet sets gt_inds to 0 when num_gts == 0).
        gt_inds = priors.new_zeros(num_priors, dtype=torch.long)
        return gt_inds, priors.new_zeros(num_priors, dtype=torch.float32)
    overlaps = box_iou(gt_boxes, priors)  # [G, P]
    max_overlaps, argmax = overlaps.max(dim=0)
    gt_inds = torch.full((num_priors,), -1, dtype=torch.long, device=priors.device)
    # masked_fill, not `gt_inds[mask] = 0`: torch 2.11 runs the latter as a masked index_put_, a host sync on CUDA.
    gt_inds = gt_inds.masked_fill((max_overlaps >= 0) & (max_overlaps < neg_iou_thr), 0)
    pos = max_overlaps >= pos_iou_thr
    gt_inds = torch.where(pos, argmax + 1, gt_inds)
    if match_low_quality:
        gt_max = overlaps.max(dim=1, keepdim=True).values  # [G, 1]
        claims = (overlaps == gt_max) & (gt_max >= min_pos_iou)  # [G, P]
        # Last claiming gt wins: scatter the 1-based gt index of each claim with an `amax` reduce.
        g, p = torch.nonzero(claims, as_tuple=True)
        claimed = torch.zeros(num_priors, dtype=torch.long, device=priors.device).scatter_reduce(0, p, g + 1, "amax")
        gt_inds = torch.where(claimed > 0, claimed, gt_inds)
    return gt_inds, max_overlaps


def random_sample(gt_inds: Tensor, *, num: int, pos_fraction: float) -> tuple[Tensor, Tensor]:
    """mmdet `RandomSampler` (`neg_pos_ub=-1`): up to `int(num * pos_fraction)` positives drawn
    uniformly without replacement, negatives fill the rest of `num`.

    Returns `(pos_inds, neg_inds)`, `Tensor[n_pos]`, `Tensor[n_neg]` int64 indices into the priors.
    """
    pos = torch.nonzero(gt_inds > 0).squeeze(1)
    num_pos = int(num * pos_fraction)
    if pos.numel() > num_pos:
        pos = pos[torch.randperm(pos.numel(), device=pos.device)[:num_pos]]
    neg = torch.nonzero(gt_inds == 0).squeeze(1)
    num_neg = num - pos.numel()
    if neg.numel() > num_neg:
        neg = neg[torch.randperm(neg.numel(), device=neg.device)[:num_neg]]
    return pos, neg


__all__ = ["max_iou_assign", "random_sample"]
