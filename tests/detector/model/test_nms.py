"""`detector.model.nms`: greedy NMS of many groups at once equals torchvision's NMS of each group."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

from detector.model.nms import greedy_keep, grouped_nms, suppression


def _clustered_boxes(g: torch.Generator, groups: int, m: int) -> torch.Tensor:
    """Boxes around a few centres per group, so that many overlap above 0.5-0.7 and chains form."""
    centres = torch.randint(20, 180, (groups, 4, 2), generator=g).float()
    pick = torch.randint(0, 4, (groups, m), generator=g)
    centre = centres.gather(1, pick[..., None].expand(-1, -1, 2))
    jitter = torch.randn(groups, m, 2, generator=g) * 6
    size = torch.rand(groups, m, 2, generator=g) * 40 + 10
    xy = centre + jitter
    return torch.cat([xy - size / 2, xy + size / 2], dim=-1)


@pytest.mark.parametrize("iou", [0.5, 0.7])
def test_every_group_keeps_what_torchvision_keeps(iou: float) -> None:
    g = torch.Generator().manual_seed(0)
    groups, m = 12, 150
    boxes = _clustered_boxes(g, groups, m)
    scores = torch.rand(groups, m, generator=g)
    # Some groups padded: their last candidates are not candidates (-inf), one group has none.
    count = torch.randint(0, m + 1, (groups,), generator=g)
    count[0], count[1] = m, 0
    scores = scores.masked_fill(torch.arange(m)[None, :] >= count[:, None], float("-inf"))
    keep = grouped_nms(boxes, scores, iou)
    for i in range(groups):
        n = int(count[i])
        expected = torch.zeros(m, dtype=torch.bool)
        expected[nms(boxes[i, :n], scores[i, :n], iou)] = True
        assert torch.equal(keep[i], expected), i
    assert keep[1].sum() == 0 and 0 < keep[0].sum() < m


def test_a_chain_longer_than_one_check_is_followed_to_its_end() -> None:
    """Boxes sliding right, each overlapping the next above the threshold but not the one after:
    greedy keeps every other box, and each decision waits on the one before it (depth = M)."""
    m = 40
    x = torch.arange(m, dtype=torch.float32) * 3.0
    boxes = torch.stack([x, torch.zeros(m), x + 10.0, torch.full((m,), 10.0)], dim=1)[None]
    scores = torch.linspace(1.0, 0.5, m)[None]
    valid = torch.ones(1, m, dtype=torch.bool)
    keep, iterations = greedy_keep(suppression(boxes, valid, 0.5), valid, check_every=4)
    assert iterations >= m  # one box settled per iteration
    assert torch.equal(keep[0], torch.arange(m) % 2 == 0)
    expected = torch.zeros(m, dtype=torch.bool)
    expected[nms(boxes[0], scores[0], 0.5)] = True
    assert torch.equal(keep[0], expected)


def test_equal_scores_are_taken_in_index_order() -> None:
    """Two identical boxes with one score: the first in index order is kept (a stable sort)."""
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]]])
    scores = torch.tensor([[0.5, 0.9, 0.5]])
    keep = grouped_nms(boxes, scores, 0.5)
    assert keep.tolist() == [[True, True, False]]
    flipped = grouped_nms(boxes.flip(1), scores.flip(1), 0.5)
    assert flipped.tolist() == [[True, True, False]]


def test_suppression_is_strictly_above_the_threshold_and_upper_triangular() -> None:
    # IoU exactly 0.5: [0, 10] x [0, 10] against [0, 10] x [0, 20] -> 100 / 200.
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert suppression(boxes, valid, 0.5).tolist() == [[[False, False], [False, False]]]
    assert suppression(boxes, valid, 0.49).tolist() == [[[False, True], [False, False]]]
    assert not suppression(boxes, torch.tensor([[False, True]]), 0.49).any()  # an invalid row suppresses nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_groups_keep_what_torchvision_cuda_keeps() -> None:
    """On CUDA the products run in float16 (0/1 entries, float32 accumulation): still exact."""
    g = torch.Generator().manual_seed(2)
    groups, m = 20, 2000  # the RPN's training groups: nms_pre 2000 per level
    boxes = _clustered_boxes(g, groups, m).cuda()
    scores = torch.rand(groups, m, generator=g).cuda()
    keep = grouped_nms(boxes, scores, 0.7)
    for i in range(groups):
        expected = torch.zeros(m, dtype=torch.bool, device="cuda")
        expected[nms(boxes[i], scores[i], 0.7)] = True
        assert torch.equal(keep[i], expected), i
