"""The gradient of torchvision's CPU `roi_align`, with each sampling point's bilinear weights computed
once for all channels instead of once per channel.

torchvision's CPU backward (`roi_align_backward_kernel_impl`) loops channel by channel and, inside,
recomputes every sampling point's position and four bilinear weights (`bilinear_interpolate_gradient`:
a few dozen flops and branches), so it costs ~50 ns per (RoI, channel, bin, point) on one core; its
forward precomputes them once per RoI. For the C4 head (1,024 channels, 14 x 14 bins) that made the
backward 8x the forward: 1.02 s against 0.12 s for 96 RoIs at the smoke scale, 14 s for 1,024 RoIs at
1333 x 800 (AMD EPYC Milan, one thread), about a tenth of every CPU training step of the matrix.

Here the points and weights are tensors (the same float32 formulas, in the same order) and the
gradient is one sparse x dense product over the whole batch:

    grad_feat[(b, y, x), c] = sum over (RoI, bin) of  W[(b, y, x), (RoI, bin)] * grad_out[(RoI, bin), c]

with W's entries the four corner weights of each point divided by its bin's point count. The sums are
torchvision's up to the order of float additions (`tests/detector/model/test_roi_align_grad.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sampling_weights(
    rois: Tensor, *, spatial_scale: float, output_size: tuple[int, int], sampling_ratio: int, aligned: bool, height: int, width: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The nonzero entries of W: `(pixel, bin, weight)`, pixel = `b * H * W + y * W + x`, bin =
    `roi * PH * PW + ph * PW + pw`; one entry per corner of each sampling point inside the map.

    torchvision's rules (roi_align_kernel.cpp): RoIs shifted by half a pixel when `aligned` (else
    at least 1 x 1); `sampling_ratio` points per bin side, or ceil(bin size) when it is 0; a point
    more than one pixel outside the map contributes nothing; one inside is clamped to the last row
    or column.
    """
    ph, pw = output_size
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    if sampling_ratio > 0:
        grid_w = grid_h = torch.full_like(rois[:, 0], sampling_ratio, dtype=torch.long)
    else:  # a RoI of negative size samples nothing (the kernel's loops run zero times)
        grid_w, grid_h = torch.ceil(bin_w).long().clamp(min=0), torch.ceil(bin_h).long().clamp(min=0)
    count = (grid_h * grid_w).to(rois.dtype)  # a bin's points (only RoIs with points are indexed)

    # Every (RoI, ph, pw, iy, ix) point, RoI by RoI: a RoI has PH * PW * grid_h * grid_w of them.
    per_roi = ph * pw * grid_h * grid_w
    roi = torch.repeat_interleave(torch.arange(rois.shape[0], device=rois.device), per_roi)
    local = torch.arange(roi.numel(), device=rois.device) - (torch.cumsum(per_roi, 0) - per_roi)[roi]
    gw, gh = grid_w[roi], grid_h[roi]
    ix, rest = local % gw, local // gw
    iy, rest = rest % gh, rest // gh
    pwi, phi = rest % pw, rest // pw
    # The kernel's expressions, evaluated in the same order: start + p * bin + (i + .5) * bin / grid.
    y = y1[roi] + phi.to(rois.dtype) * bin_h[roi] + (iy.to(rois.dtype) + 0.5) * bin_h[roi] / gh.to(rois.dtype)
    x = x1[roi] + pwi.to(rois.dtype) * bin_w[roi] + (ix.to(rois.dtype) + 0.5) * bin_w[roi] / gw.to(rois.dtype)

    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y, x = y.clamp(min=0.0), x.clamp(min=0.0)
    y_low, x_low = y.long(), x.long()
    y_last, x_last = y_low >= height - 1, x_low >= width - 1
    y_low, x_low = y_low.clamp(max=height - 1), x_low.clamp(max=width - 1)
    y_high = torch.where(y_last, y_low, y_low + 1)
    x_high = torch.where(x_last, x_low, x_low + 1)
    y = torch.where(y_last, y_low.to(rois.dtype), y)
    x = torch.where(x_last, x_low.to(rois.dtype), x)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx

    base = rois[:, 0].long()[roi] * (height * width)
    pixel = torch.stack([base + y_low * width + x_low, base + y_low * width + x_high,
                         base + y_high * width + x_low, base + y_high * width + x_high])  # fmt: skip
    weight = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx]) / count[roi]
    bins = (roi * (ph * pw) + phi * pw + pwi).expand(4, -1)
    keep = inside.expand(4, -1)
    return pixel[keep], bins[keep], weight[keep]


def roi_align_backward(
    grad: Tensor, rois: Tensor, *, feat_shape: tuple[int, int, int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    """d(loss)/d(features) `[N, C, H, W]` of `roi_align(features, rois, ...)` given `grad [R, C, PH, PW]`,
    float32, channels-last in memory (the product's natural layout)."""
    n, c, h, w = feat_shape
    ph, pw = grad.shape[-2:]
    pixel, bins, weight = sampling_weights(rois, spatial_scale=spatial_scale, output_size=(ph, pw), sampling_ratio=sampling_ratio,
                                           aligned=aligned, height=h, width=w)  # fmt: skip
    # grad as rows of channels, one row per (RoI, bin): free when it is already channels-last.
    rows = grad.permute(0, 2, 3, 1).reshape(-1, c)
    # Built from in-range indices by construction: no invariant check (torch warns unless told).
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        matrix = torch.sparse_coo_tensor(torch.stack([pixel, bins]), weight, (n * h * w, rows.shape[0]))
        return torch.sparse.mm(matrix, rows).view(n, h, w, c).permute(0, 3, 1, 2)


__all__ = ["roi_align_backward", "sampling_weights"]
