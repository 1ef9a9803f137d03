"""Feature pyramid (MMDetection `FPN`) and the identity neck of C4 / DC5.

Shorthand: C2..C5 backbone stages (strides 4..32), P2..P6 pyramid levels (strides 4..64).

Keys match mmdet: `neck.lateral_convs.<i>.conv`, `neck.fpn_convs.<i>.conv` (an mmcv `ConvModule`
without norm or activation, hence the extra `.conv`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from detector.config import NeckConfig
from detector.errors import ConfigError


class ConvModule(nn.Module):
    """The parameter-bearing part of mmcv's `ConvModule` with no norm and no activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """FPN P2-P6 as in `configs/_base_/models/faster-rcnn_r50_fpn.py` (reference 1.2).

    1x1 laterals, top-down nearest upsampling to the finer level's exact size, 3x3 output convs,
    P6 = `max_pool2d(P5, 1, stride=2)` (`add_extra_convs=False`). Convs are Xavier-uniform with zero
    bias (mmdet `xavier_init(distribution='uniform')`; torchvision uses kaiming_uniform(a=1)).

    `forward(feats: list[Tensor[N, C_i, H_i, W_i]]) -> list[Tensor[N, out, H_l, W_l]]` of length
    `num_outs`.
    """

    def __init__(self, cfg: NeckConfig) -> None:
        super().__init__()
        if cfg.num_outs < len(cfg.in_channels):
            raise ConfigError(f"neck.num_outs: {cfg.num_outs} must be >= len(neck.in_channels) = {len(cfg.in_channels)}")
        self.num_outs = cfg.num_outs
        self.lateral_convs = nn.ModuleList(ConvModule(c, cfg.out_channels, 1) for c in cfg.in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvModule(cfg.out_channels, cfg.out_channels, 3, padding=1) for _ in cfg.in_channels
        )
        self.out_channels = cfg.out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            # mmdet upsamples to the finer level's size (not scale_factor=2): odd sizes stay aligned.
            # In place: the lateral conv's backward does not need its output.
            laterals[i - 1] += F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


def build_neck(cfg: NeckConfig) -> nn.Module | None:
    """FPN for `kind="fpn"`; `None` for C4 / DC5, whose heads read the backbone output directly."""
    if cfg.kind == "fpn":
        return FPN(cfg)
    if cfg.kind == "none":
        return None
    raise ConfigError(f"neck.kind: {cfg.kind!r} is not allowed; allowed: 'fpn', 'none'")


__all__ = ["FPN", "ConvModule", "build_neck"]
