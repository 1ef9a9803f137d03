from __future__ import annotations

import torch
from torchvision.ops import roi_align

from detector.model.poolers import RoIPooler, map_roi_levels


def _square_rois(sides: list[float]) -> torch.Tensor:
    return torch.tensor([[0.0, 0.0, 0.0, s, s] for s in sides])


def test_level_mapping_follows_mmdet_thresholds() -> None:
    # floor(log2(side / 56 + 1e-6)): < 112 -> 0, [112, 224) -> 1, [224, 448) -> 2, >= 448 -> 3.
    sides = [8.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 2000.0]
    assert map_roi_levels(_square_rois(sides), 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # Non-square: the scale is sqrt(w * h).
    assert map_roi_levels(torch.tensor([[0.0, 0, 0, 448, 112]]), 4).tolist() == [2]
    assert map_roi_levels(torch.tensor([[0.0, 0, 0, 0, 0]]), 4).tolist() == [0]  # degenerate RoI


def test_each_roi_reads_its_level() -> None:
    strides = (4, 8, 16, 32)
    pooler = RoIPooler(output_size=7, featmap_strides=strides, sampling_ratio=0, aligned=True, finest_scale=56)
    feats = [torch.full((2, 3, 256 // s, 256 // s), float(lvl)) for lvl, s in enumerate(strides)]
    rois = torch.tensor([[0.0, 0, 0, 50, 50], [1.0, 0, 0, 150, 150], [0.0, 0, 0, 250, 250], [1.0, 0, 0, 255, 255], [0.0, 10, 10, 60, 60]])
    out = pooler(feats + [torch.zeros(2, 3, 4, 4)], rois)  # a P6 level is ignored
    assert out.shape == (5, 3, 7, 7) and out.dtype == torch.float32
    assert out.mean(dim=(1, 2, 3)).tolist() == [0.0, 1.0, 2.0, 2.0, 0.0]


def test_matches_torchvision_roi_align_aligned_adaptive() -> None:
    feat = torch.randn(1, 4, 20, 30)
    rois = torch.tensor([[0.0, 3.3, 4.1, 100.7, 60.2], [0.0, 0.0, 0.0, 16.0, 16.0]])
    pooler = RoIPooler(output_size=14, featmap_strides=(16,), sampling_ratio=0, aligned=True, finest_scale=56)
    ref = roi_align(feat, rois, (14, 14), spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(pooler([feat], rois), ref)


def test_reduced_precision_features_are_pooled_in_float32() -> None:
    pooler = RoIPooler(output_size=7, featmap_strides=(16,), sampling_ratio=0, aligned=True, finest_scale=56)
    out = pooler([torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)], torch.tensor([[0.0, 0, 0, 64, 64]], dtype=torch.bfloat16))
    assert out.dtype == torch.float32
