"""Box-regression losses: the one name -> function map (`BOX_LOSSES`) and its reducer `box_loss`.

Shorthand: P positive samples; `pred`, `target` are `Tensor[P, 4]`, either deltas (l1, smooth_l1)
or decoded x1y1x2y2 boxes (iou, giou, bounded_iou: the head sets `reg_decoded_bbox`).

Reduction follows MMDetection's `weight_reduce_loss(reduction='mean', avg_factor=...)`: the summed
loss of the positives divided by `avg_factor`, which the heads set the way mmdet does:
  * RPN: `avg_factor` = sampled anchors (positives + negatives) over the whole batch
    (`SamplingResult.avg_factor` with `avg_factor_with_neg=True` for `RandomSampler`), for both
    the objectness and the box loss;
  * RoI head: loss_cls over all sampled RoIs of the batch; loss_bbox with
    `avg_factor=bbox_targets.size(0)`, i.e. also every sampled RoI (positives and negatives), not
    the positives alone.
For l1 / smooth_l1 / bounded_iou the per-coordinate terms are summed (mmdet weights are [P, 4]);
for iou / giou there is one term per box (mmdet averages the [P, 4] weights to [P]).
Everything is computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from detector.errors import ConfigError
from detector.model.box_ops import aligned_iou


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """`|pred - target|`, `Tensor[P, 4]` (mmdet `L1Loss`)."""
    return (pred - target).abs()


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    """Huber with knee `beta` (mmdet `SmoothL1Loss`, beta 1.0 default), `Tensor[P, 4]`."""
    diff = (pred - target).abs()
    if beta <= 0:
        return diff
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def iou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """`-ln(IoU)` with IoU clamped at `eps` (mmdet `IoULoss(mode='log', eps=1e-6)`), `Tensor[P]`."""
    return -aligned_iou(pred, target, mode="iou", eps=eps).clamp(min=eps).log()


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """`1 - GIoU` (mmdet `GIoULoss(eps=1e-6)`: the class default overrides the function's 1e-7)."""
    return 1 - aligned_iou(pred, target, mode="giou", eps=eps)


def bounded_iou_loss(pred: Tensor, target: Tensor, beta: float = 0.2, eps: float = 1e-3) -> Tensor:
    """mmdet `bounded_iou_loss` (Tychsen-Smith & Petersson 2018), `Tensor[P, 4]`.

    Bounded-IoU terms for centre offset and size, each smoothed like smooth-L1 with knee `beta`.
    The target side carries no gradient (mmdet computes it under `no_grad`).
    """
    pred, target = pred.float(), target.float().detach()
    pred_ctr = (pred[:, :2] + pred[:, 2:]) * 0.5
    pred_wh = pred[:, 2:] - pred[:, :2]
    target_ctr = (target[:, :2] + target[:, 2:]) * 0.5
    target_wh = target[:, 2:] - target[:, :2]
    d = (target_ctr - pred_ctr).abs()
    loss_dxy = 1 - torch.clamp((target_wh - 2 * d) / (target_wh + 2 * d + eps), min=0)
    loss_dwh = 1 - torch.minimum(target_wh / (pred_wh + eps), pred_wh / (target_wh + eps))
    loss = torch.cat([loss_dxy, loss_dwh], dim=-1)
    return torch.where(loss < beta, 0.5 * loss * loss / beta, loss - 0.5 * beta)


BOX_LOSSES: dict[str, Callable[..., Tensor]] = {
    "l1": l1_loss,
    "smooth_l1": smooth_l1_loss,
    "iou": iou_loss,
    "giou": giou_loss,
    "bounded_iou": bounded_iou_loss,
}
# Losses defined on boxes, not deltas: the head must decode first (mmdet `reg_decoded_bbox=True`).
DECODED_LOSSES = frozenset({"iou", "giou", "bounded_iou"})


def check_box_loss(name: str, *, field: str = "loss_bbox") -> Callable[..., Tensor]:
    """The loss function for `name`, or a `ConfigError` naming `field` and the allowed values."""
    try:
        return BOX_LOSSES[name]
    except KeyError:
        raise ConfigError(f"{field}: {name!r} is not allowed; allowed: {', '.join(BOX_LOSSES)}") from None


def box_loss(
    name: str,
    pred: Tensor,
    target: Tensor,
    *,
    avg_factor: float | Tensor,
    weight: Tensor | None = None,
    loss_weight: float = 1.0,
    smooth_l1_beta: float = 1.0,
) -> Tensor:
    """`loss_weight * sum(loss(pred, target)) / avg_factor` as a float32 scalar.

    `weight` (`Tensor[P]` bool): only these rows count, so that the heads can pass fixed-size
    sample slots (the others hold finite placeholders: `where` keeps their gradient at 0).
    With no positives this is an exact 0 that still carries a graph to `pred`, like mmdet's
    `bbox_pred[pos_inds].sum()`.
    """
    fn = check_box_loss(name)
    pred, target = pred.float(), target.float()
    if pred.numel() == 0:
        return pred.sum() * 0.0
    per_elem = fn(pred, target, smooth_l1_beta) if name == "smooth_l1" else fn(pred, target)
    if weight is not None:
        per_elem = torch.where(weight.view(-1, *[1] * (per_elem.dim() - 1)), per_elem, 0.0)
    return loss_weight * per_elem.sum() / avg_factor


__all__ = ["BOX_LOSSES", "DECODED_LOSSES", "box_loss", "bounded_iou_loss", "check_box_loss", "giou_loss", "iou_loss", "l1_loss", "smooth_l1_loss"]
