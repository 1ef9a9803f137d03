"""RoI feature extraction: MMDetection's `SingleRoIExtractor` on torchvision's `roi_align`.

Shorthand: R RoIs as `Tensor[R, 5]` (batch index, x1, y1, x2, y2) in resized-image pixels; L levels
with strides `featmap_strides`; S the output size (7, or 14 for C4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: int = 56) -> Tensor:
    """mmdet `SingleRoIExtractor.map_roi_levels`: `floor(log2(sqrt(w * h) / finest_scale + 1e-6))`
    clamped to [0, num_levels - 1] -> `Tensor[R]` int64 (FPN paper eq. 1 with k0 = 4 at 224 px:
    scale < 112 -> P2, < 224 -> P3, < 448 -> P4, else P5)."""
    rois = rois.float()
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class RoIPooler(nn.Module):
    """`forward(feats: list[Tensor[N, C, H_l, W_l]], rois: Tensor[R, 5]) -> Tensor[R, C, S, S]`.

    RoIAlign with mmcv's defaults: `aligned=True` (half-pixel offset), `sampling_ratio=0` (adaptive),
    average pooling (reference 1.2). Runs in float32 under autocast (roi_align has no reduced
    precision kernel worth its rounding error), returning float32.
    """

    def __init__(self, *, output_size: int, featmap_strides: tuple[int, ...], sampling_ratio: int, aligned: bool, finest_scale: int) -> None:
        super().__init__()
        self.output_size = (output_size, output_size)
        self.scales = [1.0 / s for s in featmap_strides]
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.finest_scale = finest_scale

    def _align(self, feat: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_align(
            feat.float(), rois.float(), self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio, aligned=self.aligned
        )

    def forward(self, feats: list[Tensor], rois: Tensor) -> Tensor:
        num_levels = len(self.scales)
        feats = feats[:num_levels]  # P6 feeds the RPN only
        if num_levels == 1:
            return self._align(feats[0], rois, self.scales[0])
        levels = map_roi_levels(rois, num_levels, self.finest_scale)
        out = rois.new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size), dtype=torch.float32)
        for lvl, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.nonzero(levels == lvl).squeeze(1)
            if idx.numel() == 0:
                continue
            out[idx] = self._align(feat, rois[idx], scale)
        return out


__all__ = ["RoIPooler", "map_roi_levels"]
