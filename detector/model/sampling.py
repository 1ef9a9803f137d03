"""MMDetection's `MaxIoUAssigner` and `RandomSampler`, without a host sync.

Shorthand: N images, G ground-truth boxes, P priors (anchors or proposals). An assignment is a
`Tensor[P]` int64 of mmdet `gt_inds`: -1 ignore, 0 negative (background), i + 1 matched to gt i.

Both heads assign one image at a time (the IoU matrix of a whole batch of anchors would multiply
the step's peak memory) and sample the whole batch at once into fixed-size slots: no operator here
has an output whose size depends on the data, so on CUDA nothing waits for the GPU (mmdet's
`torch.nonzero` + `randperm(n)` per image cost 2 host syncs each, 4N per training step).
"""

from __future__ import annotations

from typing import NamedTuple

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
    prior_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """mmdet `MaxIoUAssigner.assign` (`gt_max_assign_all=True`, no ignore boxes).

    Returns `(gt_inds[P], max_overlaps[P])`. A prior is negative when its best IoU is in
    [0, neg_iou_thr), positive when >= pos_iou_thr. With `match_low_quality`, each gt whose best IoU
    is >= `min_pos_iou` also claims every prior that reaches that best IoU (ties included); when
    several gts claim a prior the later gt wins, as mmdet's loop over gts does.

    `prior_valid` (`Tensor[P]` bool): priors mmdet would not pass to the assigner at all (anchors
    outside the image, padding slots); they get -1 and take no part in any max, which is the
    assignment of the valid priors alone, with no `nonzero` to select them.
    """
    num_priors, num_gts = priors.shape[0], gt_boxes.shape[0]
    if num_gts == 0 or num_priors == 0:
        # No gt: every prior is background (mmdet sets gt_inds to 0 when num_gts == 0).
        gt_inds = priors.new_zeros(num_priors, dtype=torch.long)
        if prior_valid is not None:
            gt_inds = gt_inds.masked_fill(~prior_valid, -1)
        return gt_inds, priors.new_zeros(num_priors, dtype=torch.float32)
    overlaps = box_iou(gt_boxes, priors)  # [G, P]
    if prior_valid is not None:
        overlaps = overlaps.masked_fill(~prior_valid, -1.0)
    max_overlaps, argmax = overlaps.max(dim=0)
    gt_inds = torch.full((num_priors,), -1, dtype=torch.long, device=priors.device)
    # masked_fill, not `gt_inds[mask] = 0`: torch 2.11 runs the latter as a masked index_put_, a host sync on CUDA.
    gt_inds = gt_inds.masked_fill((max_overlaps >= 0) & (max_overlaps < neg_iou_thr), 0)
    pos = max_overlaps >= pos_iou_thr
    gt_inds = torch.where(pos, argmax + 1, gt_inds)
    if match_low_quality:
        gt_max = overlaps.max(dim=1, keepdim=True).values  # [G, 1]
        claims = (overlaps == gt_max) & (gt_max >= min_pos_iou)  # [G, P]
        # Last claiming gt wins: the largest 1-based index among a prior's claims (0: none).
        gt_ids = torch.arange(1, num_gts + 1, device=priors.device)[:, None]
        claimed = (claims * gt_ids).amax(dim=0)
        gt_inds = torch.where(claimed > 0, claimed, gt_inds)
    return gt_inds, max_overlaps


def random_keys(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One uniform float64 key per candidate; the sampler keeps the largest. float64 so that two
    of a few hundred thousand anchors almost never tie (float32 keys would, about 2,000 times an
    image). `detector.parity.stages.first_n_sampling` patches this to take candidates in order."""
    return torch.rand(shape, dtype=torch.float64, device=device)


class Samples(NamedTuple):
    """Fixed-size sampling slots, `Tensor[N, num]` each: `picked`, an index into the candidates; `valid`
    (a slot holds a sample), `positive` (it holds a positive; positives fill the first slots of
    an image, negatives the next, unused slots come last and point at candidate 0)."""

    picked: Tensor
    valid: Tensor
    positive: Tensor


def random_sample(gt_inds: Tensor, *, num: int, pos_fraction: float) -> Samples:
    """mmdet `RandomSampler` (`neg_pos_ub=-1`) for each row of `gt_inds [N, P]`: up to
    `int(num * pos_fraction)` positives drawn uniformly without replacement, negatives (drawn the
    same way) fill the rest of `num`.

    A uniform draw of k from n is the k largest of n i.i.d. uniform keys: the same distribution as
    mmdet's `randperm(n)[:k]` (the draws themselves differ, as mmdet's differ between CPU and
    CUDA), taken with `topk` over fixed shapes instead of a `nonzero` and a `randperm` per image.
    """
    n, p = gt_inds.shape
    if p == 0:
        empty = torch.zeros((n, num), dtype=torch.bool, device=gt_inds.device)
        return Samples(picked=empty.long(), valid=empty, positive=empty)
    num_pos = int(num * pos_fraction)
    keys = random_keys((n, p), gt_inds.device)
    pos_keys, pos_idx = torch.where(gt_inds > 0, keys, -1.0).topk(min(num_pos, p), dim=1)
    neg_keys, neg_idx = torch.where(gt_inds == 0, keys, -1.0).topk(min(num, p), dim=1)
    n_pos = (pos_keys >= 0).sum(dim=1, keepdim=True)  # [N, 1]
    n_neg = torch.minimum((neg_keys >= 0).sum(dim=1, keepdim=True), num - n_pos)
    slot = torch.arange(num, device=gt_inds.device)[None, :]
    positive = slot < n_pos
    valid = slot < n_pos + n_neg
    from_pos = pos_idx.gather(1, slot.clamp(max=pos_idx.shape[1] - 1).expand(n, -1)) if num_pos > 0 else pos_idx.new_zeros(n, num)
    from_neg = neg_idx.gather(1, (slot - n_pos).clamp(0, neg_idx.shape[1] - 1))
    picked = torch.where(positive, from_pos, torch.where(valid, from_neg, 0))
    return Samples(picked=picked, valid=valid, positive=positive)


__all__ = ["Samples", "max_iou_assign", "random_keys", "random_sample"]
