"""The comparison rules of the parity check (no MMDetection needed: they compare tensors)."""

from __future__ import annotations

import math

import torch

from detector.model.sampling import random_sample
from detector.parity.stages import TOLERANCES, compare_dense, compare_sets, first_n_sampling, relative


def _set(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


def test_relative_difference_and_shape_mismatch() -> None:
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert relative(ref.clone(), ref) == 0.0
    assert math.isclose(relative(ref + torch.tensor([0.0, 0.0, 0.004]), ref), 0.001, rel_tol=1e-4)  # float32 input
    assert relative(torch.zeros(2), ref) == float("inf")


def test_dense_stage_names_the_worst_level_and_applies_its_tolerance() -> None:
    ref = [torch.ones(1, 4, 8, 8), torch.ones(1, 4, 4, 4)]
    ok = compare_dense("backbone", [r.clone() for r in ref], ref)
    assert ok.ok and ok.worst == 0.0
    off = [ref[0].clone(), ref[1] * (1 + 10 * TOLERANCES["backbone"])]
    bad = compare_dense("backbone", off, ref)
    assert not bad.ok and "output 1" in bad.detail
    assert not compare_dense("neck", ref[:1], ref).ok  # a missing level fails


def test_sets_pair_rows_by_label_iou_and_score_in_any_order() -> None:
    ref = [_set([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [1, 2])]
    same = [_set([[20, 20, 40, 40], [0, 0, 10, 10]], [0.8, 0.9], [2, 1])]
    r = compare_sets("detections", same, ref)
    assert r.ok and r.worst == 0.0 and r.detail.startswith("0 of 2")
    relabelled = [_set([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [1, 3])]
    r = compare_sets("detections", relabelled, ref)
    assert not r.ok and r.detail.startswith("2 of 2")  # a row of each side without a partner


def test_sets_allow_one_percent_of_tie_rows_but_not_more() -> None:
    boxes = [[i * 20.0, 0.0, i * 20.0 + 10, 10.0] for i in range(200)]
    ref = [_set(boxes, [0.5] * 200, [0] * 200)]
    swapped = [_set([*boxes[:-1], [5000.0, 0.0, 5010.0, 10.0]], [0.5] * 200, [0] * 200)]  # the tie at the cut
    assert compare_sets("proposals", swapped, ref).ok  # 2 of 200 rows: 1%
    worse = [_set([*boxes[:-2], [5000.0, 0, 5010, 10], [6000.0, 0, 6010, 10]], [0.5] * 200, [0] * 200)]
    assert not compare_sets("proposals", worse, ref).ok


def test_sets_fail_on_matched_rows_that_drift() -> None:
    ref = [_set([[0, 0, 100, 100]], [0.9], [0])]
    moved = [_set([[0, 0, 100, 100.01]], [0.9], [0])]
    r = compare_sets("detections", moved, ref)
    assert not r.ok and r.detail.startswith("0 of 1") and r.worst > TOLERANCES["sets"]


def test_first_n_takes_candidates_in_index_order() -> None:
    with first_n_sampling():
        s = random_sample(torch.tensor([[0, 2, -1, 0, 1, 1, 0, 3, 0]]), num=4, pos_fraction=0.5)
        assert s.picked.tolist() == [[1, 4, 0, 3]] and s.positive.tolist() == [[True, True, False, False]]
        s = random_sample(torch.tensor([[0, 0, 0, 1]]), num=3, pos_fraction=0.5)
        assert s.picked.tolist() == [[3, 0, 1]] and s.valid.all()  # negatives fill what positives leave
