"""Greedy NMS of many groups at once, with no pass that walks the boxes one by one.

Shorthand: G groups (an (image, FPN level) pair in the RPN), M candidates per group (padded).

torchvision's CUDA NMS computes the IoU bit mask in parallel, then decides what to keep in one
thread block that walks every box of the call in score order: its time grows with all the boxes of
the call, whatever their groups (~0.4 us a box on an H200: ~7 ms of a 2-image training step for the
RPN's ~18,000 candidates, ~60 ms at 16 images, `../shared/GPU.md`). Groups never suppress each other,
so they can be decided side by side; this module does that with tensor operations only.

Greedy NMS keeps box j (in score order) iff no kept box i < j overlaps it above the threshold. With
`S[i, j] = i < j and IoU(i, j) > thr`, the keep vector is the unique fixed point of
`keep[j] = not any_i(keep[i] and S[i, j])` (by induction over j), and iterating that map from
"keep everything" reaches it: box j is right from the iteration after every box it depends on is
right, and a map that returns its input is at the fixed point (Cluster-NMS, Zheng et al. 2020, proves
the same). Each iteration is one batched matrix product over all groups; equality with the previous
iterate is read back every `check_every` iterations (a host sync each).

IoU as torchvision's kernel computes it (`inter / (area_a + area_b - inter) > thr` in float32), so
the decisions agree up to float rounding at the threshold itself (tested against torchvision's nms).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one [g, M, M] IoU block computed at a time: bounds the float32 temporaries (~256 MB).
_BLOCK_ELEMENTS = 1 << 26


def suppression(boxes: Tensor, valid: Tensor, iou: float) -> Tensor:
    """`S [G, M, M]` bool: `S[g, i, j]` = i < j, box i valid and IoU(i, j) > iou, for `boxes [G, M, 4]`
    sorted by decreasing score within each group."""
    g, m, _ = boxes.shape
    out = torch.empty((g, m, m), dtype=torch.bool, device=boxes.device)
    upper = torch.ones((m, m), dtype=torch.bool, device=boxes.device).triu(1)
    step = max(1, _BLOCK_ELEMENTS // max(m * m, 1))
    for start in range(0, g, step):
        b = boxes[start : start + step].float()
        a, c = b[:, :, None, :], b[:, None, :, :]  # row box i, column box j
        width = (torch.minimum(a[..., 2], c[..., 2]) - torch.maximum(a[..., 0], c[..., 0])).clamp(min=0)
        height = (torch.minimum(a[..., 3], c[..., 3]) - torch.maximum(a[..., 1], c[..., 1])).clamp(min=0)
        inter = width * height
        area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
        overlap = inter / (area[:, :, None] + area[:, None, :] - inter) > iou
        out[start : start + step] = overlap & upper & valid[start : start + step, :, None]
    return out


def greedy_keep(s: Tensor, valid: Tensor, *, check_every: int = 4) -> tuple[Tensor, int]:
    """The greedy keep vector `[G, M]` bool of suppression matrices `s [G, M, M]` (see the module's
    docstring), and the iterations run (a multiple of `check_every`). Invalid rows are never kept."""
    # 0/1 values and counts are exact in float16 products with float32 accumulation (CUDA's
    # default); CPU multiplies float32.
    dtype = torch.float16 if s.is_cuda else torch.float32
    weights = s.to(dtype)
    keep = valid.clone()
    iterations = 0
    while True:
        previous = keep
        for _ in range(check_every):
            suppressed = torch.bmm(keep.to(dtype)[:, None, :], weights)[:, 0, :] > 0
            keep = valid & ~suppressed
        iterations += check_every
        # Back where it was `check_every` maps ago: the sequence cycles from there, and since it
        # reaches the fixed point it cannot cycle through anything else.
        if torch.equal(keep, previous):
            return keep, iterations
        if iterations > s.shape[-1] + check_every:  # cannot happen: no chain is longer than M
            raise RuntimeError("greedy_keep did not converge")


def grouped_nms(boxes: Tensor, scores: Tensor, iou: float) -> Tensor:
    """Greedy NMS in each group of `boxes [G, M, 4]`, `scores [G, M]` (-inf: not a candidate, neither
    kept nor suppressing). Returns the keep mask `[G, M]` in the input's order. Ties in score are
    taken in index order (a stable sort), as torchvision's sort orders them on CPU."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    sorted_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    valid = scores.gather(1, order) > float("-inf")
    keep_sorted, _ = greedy_keep(suppression(sorted_boxes, valid, iou), valid)
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)


__all__ = ["greedy_keep", "grouped_nms", "suppression"]
