from __future__ import annotations

import torch

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


def test_random_sampler_quota() -> None:
    torch.manual_seed(0)
    gt_inds = torch.tensor([1] * 300 + [0] * 1000 + [-1] * 50)
    pos, neg = random_sample(gt_inds, num=256, pos_fraction=0.5)
    assert pos.numel() == 128 and neg.numel() == 128
    assert (gt_inds[pos] > 0).all() and (gt_inds[neg] == 0).all()
    assert pos.unique().numel() == 128
    few = torch.tensor([2] * 10 + [0] * 1000)
    pos, neg = random_sample(few, num=512, pos_fraction=0.25)
    assert pos.numel() == 10 and neg.numel() == 502  # negatives fill the rest (neg_pos_ub = -1)
