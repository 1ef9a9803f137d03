"""Anchors exactly as MMDetection's `AnchorGenerator` lays them out.

Shorthand: L levels, A anchors per location (len(ratios) * len(scales)), H_l x W_l feature sizes,
K = sum_l H_l * W_l * A anchors in all. Flattened anchor order is level-major, then row-major
locations (y, then x), then the A anchors of a location (ratio-major, scale-minor) -- the same order
the RPN head's `permute(0, 2, 3, 1).reshape(N, -1)` gives its outputs.

Differences from torchvision's `AnchorGenerator` (reference "torchvision gaps"): mmdet centres
anchors on the top-left corner of each stride cell (`center_offset=0`) and does not round the base
anchors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def base_anchors(*, base_size: float, scales: tuple[float, ...], ratios: tuple[float, ...], center_offset: float) -> Tensor:
    """mmdet `gen_single_level_base_anchors`: `Tensor[A, 4]`, ratio-major then scale-minor.

    ratio = h / w; for each ratio r and scale s: w = base_size * s / sqrt(r), h = base_size * s * sqrt(r).
    """
    ratios_t = torch.tensor(ratios, dtype=torch.float64)
    scales_t = torch.tensor(scales, dtype=torch.float64)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = (base_size * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
    hs = (base_size * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    cx = cy = center_offset * base_size
    anchors = torch.stack([cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs], dim=-1)
    return anchors.float()


class AnchorGenerator(nn.Module):
    """Per-level anchors for strides `strides`, base size = stride, sizes = stride * scales.

    Base anchors are a non-persistent buffer (no state-dict keys, as in mmdet checkpoints).
    """

    def __init__(
        self, *, strides: tuple[int, ...], scales: tuple[float, ...], ratios: tuple[float, ...], center_offset: float = 0.0
    ) -> None:
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.num_anchors = len(scales) * len(ratios)
        for i, s in enumerate(self.strides):
            cell = base_anchors(base_size=s, scales=scales, ratios=ratios, center_offset=center_offset)
            self.register_buffer(f"base_{i}", cell, persistent=False)
        self._cache: dict[tuple, list[Tensor]] = {}

    def grid_anchors(self, featmap_sizes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Anchors per level, `Tensor[H_l * W_l * A, 4]` each (mmdet `grid_priors`).

        Cached per (sizes, device): inference at a fixed padded size pays for the grid once.
        """
        key = (tuple(featmap_sizes), str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        out = []
        for i, (h, w) in enumerate(featmap_sizes):
            stride = self.strides[i]
            xs = torch.arange(w, device=device, dtype=torch.float32) * stride
            ys = torch.arange(h, device=device, dtype=torch.float32) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # row-major: x varies fastest
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            base = getattr(self, f"base_{i}").to(device)
            out.append((shifts + base[None]).reshape(-1, 4))
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = out
        return out

    def valid_flags(self, featmap_sizes: list[tuple[int, int]], pad_shapes: Tensor) -> Tensor:
        """`Tensor[N, K]` bool: the anchor's location lies inside the image's own padded extent
        (mmdet `valid_flags(featmap_sizes, img_meta['pad_shape'])`; `pad_shapes` is `Tensor[N, 2]`
        (h, w) of each image padded to the size divisor, not the batch shape)."""
        flags = []
        for i, (h, w) in enumerate(featmap_sizes):
            stride = self.strides[i]
            valid_h = torch.clamp(torch.ceil(pad_shapes[:, 0].float() / stride), max=h)
            valid_w = torch.clamp(torch.ceil(pad_shapes[:, 1].float() / stride), max=w)
            ys = torch.arange(h, device=pad_shapes.device)
            xs = torch.arange(w, device=pad_shapes.device)
            ok = (ys[None, :, None] < valid_h[:, None, None]) & (xs[None, None, :] < valid_w[:, None, None])
            flags.append(ok[..., None].expand(-1, h, w, self.num_anchors).reshape(len(pad_shapes), -1))
        return torch.cat(flags, dim=1)


def inside_flags(anchors: Tensor, valid: Tensor, image_size: tuple[int, int] | Tensor, allowed_border: float) -> Tensor:
    """mmdet `anchor_inside_flags`: with `allowed_border >= 0` anchors reaching more than
    `allowed_border` pixels past the (unpadded) image are ignored in training (DC5 uses 0);
    with -1 only the location flags count (FPN and, since PR #7435, C4)."""
    if allowed_border < 0:
        return valid
    h, w = image_size[0], image_size[1]  # ints, or 0-d tensors on the device (no host sync)
    return (
        valid
        & (anchors[:, 0] >= -allowed_border)
        & (anchors[:, 1] >= -allowed_border)
        & (anchors[:, 2] < w + allowed_border)
        & (anchors[:, 3] < h + allowed_border)
    )


__all__ = ["AnchorGenerator", "base_anchors", "inside_flags"]
