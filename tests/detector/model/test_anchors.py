from __future__ import annotations

import math

import torch

from detector.model.anchors import AnchorGenerator, base_anchors, inside_flags
from detector.recipes import resolve


def test_fpn_base_anchors_match_mmdet_values() -> None:
    # mmdet AnchorGenerator(strides=[4], scales=[8], ratios=[0.5, 1, 2], center_offset=0):
    # ratio r = h / w, w = 4 * 8 / sqrt(r), h = 4 * 8 * sqrt(r), centred on (0, 0), unrounded.
    got = base_anchors(base_size=4, scales=(8.0,), ratios=(0.5, 1.0, 2.0), center_offset=0.0)
    a, b = 16 * math.sqrt(2), 8 * math.sqrt(2)  # 22.6274, 11.3137
    expected = torch.tensor([[-a, -b, a, b], [-16.0, -16.0, 16.0, 16.0], [-b, -a, b, a]])
    torch.testing.assert_close(got, expected)


def test_c4_anchor_order_is_ratio_major_scale_minor() -> None:
    cfg = resolve({"style": "caffe", "neck": "c4"}).rpn
    got = base_anchors(base_size=16, scales=cfg.anchor_scales, ratios=cfg.anchor_ratios, center_offset=0.0)
    assert got.shape == (15, 4)
    widths = got[:, 2] - got[:, 0]
    heights = got[:, 3] - got[:, 1]
    # First five: ratio 0.5 at scales 2..32 (sizes 32..512), wide boxes.
    torch.testing.assert_close(widths[:5], torch.tensor([32.0, 64, 128, 256, 512]) * math.sqrt(2))
    torch.testing.assert_close(heights[5:10], torch.tensor([32.0, 64, 128, 256, 512]))
    torch.testing.assert_close(heights[10:], torch.tensor([32.0, 64, 128, 256, 512]) * math.sqrt(2))


def test_grid_is_row_major_and_levels_concatenate() -> None:
    gen = AnchorGenerator(strides=(4, 8), scales=(8.0,), ratios=(0.5, 1.0, 2.0))
    lvl0, lvl1 = gen.grid_anchors([(2, 3), (1, 2)], torch.device("cpu"))
    assert lvl0.shape == (2 * 3 * 3, 4) and lvl1.shape == (1 * 2 * 3, 4)
    # Location (y=1, x=2) of level 0 is flat location 1 * 3 + 2 = 5; its square anchor is index 5*3+1.
    torch.testing.assert_close(lvl0[5 * 3 + 1], torch.tensor([8.0 - 16, 4.0 - 16, 8.0 + 16, 4.0 + 16]))
    # Location (y=0, x=1) of level 1: shift (8, 0), square anchor of size 64.
    torch.testing.assert_close(lvl1[1 * 3 + 1], torch.tensor([8.0 - 32, -32.0, 8.0 + 32, 32.0]))


def test_valid_flags_follow_each_images_pad_shape() -> None:
    gen = AnchorGenerator(strides=(16,), scales=(8.0,), ratios=(1.0,))
    pad_shapes = torch.tensor([[64, 96], [32, 64]])  # batch padded to 64 x 96
    flags = gen.valid_flags([(4, 6)], pad_shapes)
    assert flags.shape == (2, 24)
    assert flags[0].all()
    grid = flags[1].view(4, 6)
    assert grid[:2, :4].all() and not grid[2:].any() and not grid[:, 4:].any()


def test_inside_flags_allowed_border() -> None:
    anchors = torch.tensor([[0.0, 0, 10, 10], [-1.0, 0, 10, 10], [50.0, 50, 100, 64], [50.0, 50, 90, 63.9]])
    valid = torch.ones(4, dtype=torch.bool)
    assert inside_flags(anchors, valid, (64, 100), -1.0).all()
    # allowed_border 0 (DC5): anchors must lie inside [0, w) x [0, h) of the unpadded image.
    assert inside_flags(anchors, valid, (64, 100), 0.0).tolist() == [True, False, False, True]
    assert inside_flags(anchors, valid.logical_not(), (64, 100), -1.0).sum() == 0
