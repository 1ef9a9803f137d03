from __future__ import annotations

import math

import torch
import torchvision

from detector.model.box_ops import (
    MAX_DWH,
    BoxCoder,
    aligned_iou,
    box_iou,
    clip_boxes,
    count_ids,
    pad_per_image,
    stack_padded,
)


def _random_boxes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_decode_round_trip() -> None:
    coder = BoxCoder((0.1, 0.1, 0.2, 0.2))
    priors, gts = _random_boxes(64, 0), _random_boxes(64, 1)
    torch.testing.assert_close(coder.decode(priors, coder.encode(priors, gts)), gts, rtol=1e-5, atol=1e-4)


def test_encode_matches_mmdet_formula() -> None:
    coder = BoxCoder((0.1, 0.1, 0.2, 0.2))
    prior = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    gt = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14), w 20, h 20
    expected = torch.tensor([[0.7 / 0.1, 0.2 / 0.1, math.log(2.0) / 0.2, 0.0]])
    torch.testing.assert_close(coder.encode(prior, gt), expected)


def test_decode_clamps_dw_dh_and_clips_to_image() -> None:
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    prior = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    huge = coder.decode(prior, torch.tensor([[0.0, 0.0, 100.0, 100.0]]))
    w = huge[0, 2] - huge[0, 0]
    torch.testing.assert_close(w, torch.tensor(10.0 * math.exp(MAX_DWH)))  # = 10 * 1000 / 16
    clipped = coder.decode(prior, torch.tensor([[0.0, 0.0, 100.0, 100.0]]), max_shape=(30, 40))
    assert clipped.tolist() == [[0.0, 0.0, 40.0, 30.0]]


def test_per_row_max_shape() -> None:
    boxes = torch.tensor([[-5.0, -5.0, 500.0, 500.0], [-5.0, -5.0, 500.0, 500.0]])
    out = clip_boxes(boxes, torch.tensor([[100, 200], [300, 50]]))
    assert out.tolist() == [[0.0, 0.0, 200.0, 100.0], [0.0, 0.0, 50.0, 300.0]]


def test_encode_degenerate_gt_is_finite() -> None:
    coder = BoxCoder((0.1, 0.1, 0.2, 0.2))
    assert torch.isfinite(coder.encode(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[5.0, 5, 5, 5]]))).all()


def test_box_iou_matches_torchvision_and_handles_zero_area() -> None:
    a, b = _random_boxes(7, 2), _random_boxes(5, 3)
    torch.testing.assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b))
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    assert box_iou(point, point).item() == 0.0  # torchvision gives nan here


def test_aligned_iou_and_giou() -> None:
    a = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20.0, 0, 30, 10]])
    torch.testing.assert_close(aligned_iou(a, b), torch.tensor([50 / 150, 0.0]))
    # Disjoint: GIoU = 0 - (300 - 200) / 300.
    torch.testing.assert_close(aligned_iou(a, b, mode="giou"), torch.tensor([50 / 150, -1 / 3]))
    torch.testing.assert_close(aligned_iou(a, b, mode="giou"), torchvision.ops.generalized_box_iou(a, b).diagonal())


def test_padded_per_image_layouts() -> None:
    a, b = torch.tensor([[0.0, 0, 4, 4], [1.0, 1, 5, 5]]), torch.zeros(0, 4)
    assert stack_padded([a, b]).tolist() == [a.tolist(), [[0.0] * 4] * 2]
    assert stack_padded([b, b]).shape == (2, 1, 4)  # at least one row: gathers stay in range
    assert stack_padded([torch.tensor([3, 1]), torch.zeros(0, dtype=torch.long)], 3).tolist() == [[3, 1, 0], [0, 0, 0]]
    ids = torch.tensor([0, 0, 2, 2, 2])
    assert count_ids(ids, 4).tolist() == [2, 0, 3, 0]
    rois = torch.cat([ids[:, None].float(), torch.arange(20.0).view(5, 4)], dim=1)
    boxes, valid = pad_per_image(rois, 3, 4)
    assert valid.tolist() == [[True, True, False, False], [False] * 4, [True, True, True, False]]
    assert boxes[valid].tolist() == rois[:, 1:].tolist() and (boxes[~valid] == 0).all()
