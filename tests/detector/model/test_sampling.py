from __future__ import annotations

import pytest
import torch

from detector.model.box_ops import box_iou
from detector.model.sampling import max_iou_assign, random_sample

RPN = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)


def test_positive_negative_and_ignored() -> None:
    gt = torch.tensor([[0.0, 0, 10, 10]])
    priors = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 8], [0.0, 0, 10, 5], [50.0, 50, 60, 60]])
    gt_inds, overlaps = max_iou_assign(priors, gt, **RPN)
    # IoU 1.0 -> pos, 0.8 -> pos, 0.5 -> ignored (between 0.3 and 0.7), 0 -> negative.
    assert gt_inds.tolist() == [1, 1, -1, 0]
    torch.testing.assert_close(overlaps, torch.tensor([1.0, 0.8, 0.5, 0.0]))


def test_low_quality_match_gives_gt_its_best_priors_including_ties() -> None:
    gt = torch.tensor([[0.0, 0, 10, 10]])
    priors = torch.tensor([[0.0, 0, 10, 4], [0.0, 6, 10, 10], [0.0, 0, 10, 2]])  # IoU 0.4, 0.4, 0.2
    gt_inds, _ = max_iou_assign(priors, gt, **RPN)
    assert gt_inds.tolist() == [1, 1, 0]
    no_lq = dict(RPN, match_low_quality=False)
    assert max_iou_assign(priors, gt, **no_lq)[0].tolist() == [-1, -1, 0]
    # Below min_pos_iou the gt claims nothing.
    far = torch.tensor([[0.0, 0, 10, 2]])
    assert max_iou_assign(far, gt, **RPN)[0].tolist() == [0]


def test_later_gt_wins_a_shared_best_prior() -> None:
    gts = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    priors = torch.tensor([[0.0, 0, 10, 5]])
    assert max_iou_assign(priors, gts, **RPN)[0].tolist() == [2]


def test_no_gt_means_all_negative() -> None:
    gt_inds, _ = max_iou_assign(torch.rand(5, 4) * 10, torch.zeros(0, 4), **RPN)
    assert gt_inds.tolist() == [0] * 5


def test_invalid_priors_get_the_assignment_of_the_valid_ones_alone() -> None:
    # prior_valid replaces mmdet's selection of inside anchors (a nonzero): the valid priors must be
    # assigned exactly as if the others were not there, low-quality matches (and their ties) included.
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(400, 2, generator=g) * 80
    priors = torch.cat([xy, xy + 4 + torch.rand(400, 2, generator=g) * 30], dim=1).round()  # rounding makes ties
    gt = torch.tensor([[10.0, 10, 40, 40], [30.0, 20, 60, 50], [0.0, 0, 5, 5], [70.0, 70, 110, 110]])
    valid = torch.rand(400, generator=g) > 0.3
    # The best prior of gt 3 is invalid: its low-quality match must come from the valid ones.
    best = box_iou(gt, priors)[3].argmax()
    valid[best] = False
    for kw in (RPN, dict(RPN, match_low_quality=False)):
        subset, overlaps = max_iou_assign(priors[valid], gt, **kw)
        full, full_overlaps = max_iou_assign(priors, gt, prior_valid=valid, **kw)
        assert full[valid].tolist() == subset.tolist() and (full[~valid] == -1).all()
        assert torch.equal(full_overlaps[valid], overlaps)
    no_gt, _ = max_iou_assign(priors, torch.zeros(0, 4), prior_valid=valid, **RPN)
    assert (no_gt[valid] == 0).all() and (no_gt[~valid] == -1).all()


def _reference_sample(gt_inds: torch.Tensor, keys: torch.Tensor, num: int, pos_fraction: float) -> list[int]:
    """The plain per-image path: nonzero positives / negatives, the largest keys first."""
    pos = torch.nonzero(gt_inds > 0).squeeze(1)
    pos = pos[keys[pos].argsort(descending=True)][: int(num * pos_fraction)]
    neg = torch.nonzero(gt_inds == 0).squeeze(1)
    neg = neg[keys[neg].argsort(descending=True)][: num - pos.numel()]
    return pos.tolist() + neg.tolist()


def test_fixed_slots_hold_what_the_per_image_path_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    gt_inds = torch.randint(-1, 3, (5, 700), generator=g)
    gt_inds[1] = torch.where(gt_inds[1] > 0, 0, gt_inds[1])  # no positive at all
    gt_inds[2, :690] = -1  # fewer candidates than slots
    gt_inds[3] = torch.where(gt_inds[3] == 0, 1, gt_inds[3])  # more positives than the quota, no negative
    keys = torch.rand(5, 700, dtype=torch.float64, generator=g)
    monkeypatch.setattr("detector.model.sampling.random_keys", lambda shape, device: keys)
    s = random_sample(gt_inds, num=256, pos_fraction=0.25)
    assert s.picked.shape == (5, 256)
    for i in range(5):
        ref = _reference_sample(gt_inds[i], keys[i], 256, 0.25)
        assert s.picked[i, s.valid[i]].tolist() == ref, i
        n_pos = int((gt_inds[i, ref] > 0).sum())
        assert s.positive[i].tolist() == [True] * n_pos + [False] * (256 - n_pos)
        assert s.valid[i].tolist() == [True] * len(ref) + [False] * (256 - len(ref))
    counts = s.valid.sum(1).tolist()
    assert counts[2] <= 10 and counts[3] == 64 and not s.positive[1].any() and counts[4] > 200  # the edge rows


def test_random_sampler_quota() -> None:
    torch.manual_seed(0)
    gt_inds = torch.tensor([[1] * 300 + [0] * 1000 + [-1] * 50])
    s = random_sample(gt_inds, num=256, pos_fraction=0.5)
    pos, neg = s.picked[s.positive], s.picked[s.valid & ~s.positive]
    assert pos.numel() == 128 and neg.numel() == 128
    assert (gt_inds[0, pos] > 0).all() and (gt_inds[0, neg] == 0).all()
    assert s.picked[s.valid].unique().numel() == 256  # without replacement
    few = torch.tensor([[2] * 10 + [0] * 1000])
    s = random_sample(few, num=512, pos_fraction=0.25)
    assert int(s.positive.sum()) == 10 and int((s.valid & ~s.positive).sum()) == 502  # negatives fill the rest


def test_random_sampler_draws_uniformly_without_replacement() -> None:
    # 2 of 6 positives and 3 of 5 negatives, 20,000 times (one row each): every candidate is drawn
    # with its probability k / n, and every pair of positives equally often (uniform subsets).
    torch.manual_seed(1)
    rows = 20_000
    gt_inds = torch.tensor([[1, 0, 1, 1, -1, 0, 1, 0, 1, 0, 1, 0]]).expand(rows, -1)
    s = random_sample(gt_inds, num=5, pos_fraction=0.4)
    assert s.valid.all() and (s.positive.sum(1) == 2).all()
    hits = torch.zeros(12).index_add_(0, s.picked.flatten(), torch.ones(rows * 5)) / rows
    pos, neg = gt_inds[0] > 0, gt_inds[0] == 0
    torch.testing.assert_close(hits[pos], torch.full((6,), 2 / 6), atol=0.015, rtol=0)
    torch.testing.assert_close(hits[neg], torch.full((5,), 3 / 5), atol=0.015, rtol=0)
    assert hits[4] == 0  # ignored
    pairs = torch.sort(s.picked[:, :2], dim=1).values
    counts = torch.unique(pairs[:, 0] * 12 + pairs[:, 1], return_counts=True)[1].float() / rows
    assert counts.numel() == 15
    torch.testing.assert_close(counts, torch.full((15,), 1 / 15), atol=0.012, rtol=0)
