from __future__ import annotations

import math

import pytest
import torch

from detector.errors import ConfigError
from detector.model.losses import BOX_LOSSES, box_loss, check_box_loss

BOXES = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 40.0, 25.0]])


@pytest.mark.parametrize("name", sorted(BOX_LOSSES))
def test_zero_at_identical_boxes(name: str) -> None:
    loss = box_loss(name, BOXES.clone(), BOXES.clone(), avg_factor=2)
    # bounded_iou's eps=1e-3 leaves a ~1e-9 residue, as in mmdet.
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(BOX_LOSSES))
def test_finite_value_and_gradient_on_degenerate_boxes(name: str) -> None:
    pred = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 10.0], [0.0, 0.0, 10.0, 10.0]], requires_grad=True)
    target = torch.tensor([[5.0, 5.0, 5.0, 5.0], [3.0, 3.0, 3.0, 3.0], [20.0, 20.0, 20.0, 30.0]])
    loss = box_loss(name, pred, target, avg_factor=3, loss_weight=10.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("name", sorted(BOX_LOSSES))
def test_no_positives_gives_zero_with_graph(name: str) -> None:
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = box_loss(name, pred, torch.zeros(0, 4), avg_factor=512)
    loss.backward()
    assert loss.item() == 0.0 and pred.grad is not None


def test_known_values_and_avg_factor() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0]])  # IoU 1/3, enclosure 150 = union -> GIoU 1/3
    assert box_loss("iou", a, b, avg_factor=1).item() == pytest.approx(math.log(3.0), rel=1e-5)
    assert box_loss("giou", a, b, avg_factor=1).item() == pytest.approx(2 / 3, rel=1e-5)
    # L1 sums the 4 coordinates and divides by avg_factor (mmdet: number of sampled RoIs / anchors).
    assert box_loss("l1", a, b, avg_factor=4).item() == pytest.approx(10 / 4)
    assert box_loss("l1", a, b, avg_factor=4, loss_weight=10.0).item() == pytest.approx(25.0)
    # smooth-L1 with beta 1: |d| = 5 -> 4.5 per coordinate; small |d| = 0.5 -> 0.125.
    assert box_loss("smooth_l1", a, b, avg_factor=1).item() == pytest.approx(9.0)
    assert box_loss("smooth_l1", a, a + 0.5, avg_factor=1).item() == pytest.approx(0.5)
    assert box_loss("smooth_l1", a, a + 0.5, avg_factor=1, smooth_l1_beta=0.25).item() == pytest.approx(4 * (0.5 - 0.125))


def test_bounded_iou_formula() -> None:
    # Target centred at 5 with w 10; prediction shifted by dx = 1, same size.
    pred = torch.tensor([[1.0, 0.0, 11.0, 10.0]])
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    eps, beta = 1e-3, 0.2
    dx = 1 - (10 - 2) / (10 + 2 + eps)  # 0.3336 >= beta -> linear branch
    dy = 1 - 10 / (10 + eps)  # tiny -> quadratic branch
    dw = 1 - min(10 / (10 + eps), 10 / (10 + eps))
    expected = (dx - 0.5 * beta) + 0.5 * dy**2 / beta + 2 * 0.5 * dw**2 / beta
    assert box_loss("bounded_iou", pred, target, avg_factor=1).item() == pytest.approx(expected, rel=1e-4)


def test_unknown_loss_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="allowed: l1, smooth_l1, iou, giou, bounded_iou"):
        check_box_loss("diou")
    with pytest.raises(ConfigError):
        box_loss("mse", BOXES, BOXES, avg_factor=1)


def test_losses_run_in_float32_under_bf16_inputs() -> None:
    a = BOXES.to(torch.bfloat16)
    for name in BOX_LOSSES:
        assert box_loss(name, a, a + 1, avg_factor=2).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(BOX_LOSSES))
def test_weight_counts_only_its_rows_and_keeps_the_others_gradient_zero(name: str) -> None:
    # The heads pass fixed-size sample slots: rows outside `weight` must not change the value,
    # and their gradient must be exactly 0 (not NaN), whatever placeholder they hold.
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(6, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(6, 2, generator=g) * 20], 1)
    target = boxes + torch.rand(6, 4, generator=g) * 3
    weight = torch.tensor([True, False, True, True, False, False])
    pred = boxes.clone().requires_grad_(True)
    placeholder = target.clone()
    placeholder[~weight] = boxes[~weight]  # what a head puts in a slot without a positive
    value = box_loss(name, pred, placeholder, weight=weight, avg_factor=6.0)
    value.backward()
    subset = box_loss(name, boxes[weight], target[weight], avg_factor=6.0)
    torch.testing.assert_close(value, subset)
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and (pred.grad[~weight] == 0).all()
