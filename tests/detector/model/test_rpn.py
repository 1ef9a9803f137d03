from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from detector.config import ProposalConfig, RPNConfig
from detector.errors import ConfigError
from detector.model.rpn import RPNHead, topk_per_image


def _feats(n: int = 2, c: int = 8, h: int = 16, w: int = 24) -> list[torch.Tensor]:
    # P2..P6 of a (4h, 4w) padded batch.
    return [torch.randn(n, c, math.ceil(h / 2**i), math.ceil(w / 2**i)) for i in range(5)]


def _head(**kw: object) -> RPNHead:
    return RPNHead(replace(RPNConfig(), in_channels=8, feat_channels=8, **kw))  # type: ignore[arg-type]


def test_head_layout_and_init() -> None:
    head = _head()
    assert head.rpn_cls.out_channels == 3 and head.rpn_reg.out_channels == 12
    assert 0.005 < RPNHead(RPNConfig()).rpn_conv.weight.std().item() < 0.015
    with torch.no_grad():
        head.rpn_reg.weight.zero_()
        head.rpn_reg.bias.copy_(torch.arange(12.0))
    logits, deltas = head.head(_feats())
    assert [tuple(x.shape) for x in logits] == [(2, 16 * 24 * 3), (2, 8 * 12 * 3), (2, 4 * 6 * 3), (2, 2 * 3 * 3), (2, 1 * 2 * 3)]
    # Channel 4a + c of rpn_reg is coordinate c of anchor a at every location.
    assert deltas[0][0, 7 * 3 + 2].tolist() == [8.0, 9.0, 10.0, 11.0]


def test_proposals_per_image_limits_and_layout() -> None:
    torch.manual_seed(0)
    head = _head(test=ProposalConfig(nms_pre=50, max_per_img=30, nms_iou=0.7)).eval()
    sizes = torch.tensor([[64, 96], [40, 60]])
    rois, losses = head(_feats(), sizes, torch.tensor([[64, 96], [64, 64]]))
    assert losses == {}
    ids = rois[:, 0]
    assert (ids[1:] >= ids[:-1]).all()  # grouped by image
    for i, (h, w) in enumerate(sizes.tolist()):
        boxes = rois[ids == i, 1:]
        assert 0 < boxes.shape[0] <= 30
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all()  # min_bbox_size 0 drops empty boxes


def test_empty_targets_give_zero_box_loss_and_finite_cls() -> None:
    head = _head().train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    sizes = torch.tensor([[64, 96], [64, 96]])
    _, losses = head(_feats(), sizes, sizes, empty)
    assert losses["loss_rpn_bbox"].item() == 0.0
    assert torch.isfinite(losses["loss_rpn_cls"]) and losses["loss_rpn_cls"].item() > 0


def test_losses_are_averaged_over_sampled_anchors() -> None:
    head = _head().train()
    with torch.no_grad():
        for conv in (head.rpn_cls, head.rpn_reg):
            conv.weight.zero_()
            conv.bias.zero_()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([0])}] * 2
    sizes = torch.tensor([[64, 96], [64, 96]])
    _, losses = head(_feats(), sizes, sizes, targets)
    # Zero logits: BCE is ln 2 for every sampled anchor, so the mean over samples is exactly ln 2.
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2.0), rel=1e-5)
    assert losses["loss_rpn_bbox"].item() > 0


def test_smooth_l1_beta_reaches_the_box_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-#2410 RPN uses smooth-L1 with beta 1/9 (reference 1.8): the config's beta is the one used."""
    import detector.model.rpn

    seen: list[tuple[str, float]] = []
    real = detector.model.rpn.box_loss

    def spy(name: str, *args: object, smooth_l1_beta: float = 1.0, **kw: object) -> torch.Tensor:
        seen.append((name, smooth_l1_beta))
        return real(name, *args, smooth_l1_beta=smooth_l1_beta, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(detector.model.rpn, "box_loss", spy)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([0])}] * 2
    sizes = torch.tensor([[64, 96], [64, 96]])
    torch.manual_seed(0)
    _, losses = _head(loss_bbox="smooth_l1", loss_bbox_beta=1 / 9).train()(_feats(), sizes, sizes, targets)
    assert seen == [("smooth_l1", pytest.approx(1 / 9))] and torch.isfinite(losses["loss_rpn_bbox"])


def test_topk_per_image() -> None:
    keep = torch.tensor([4, 0, 3, 1, 2, 5])  # indices sorted by score
    image_ids = torch.tensor([1, 0, 1, 0, 1, 0])  # image of each index
    # Image 0 owns 3, 1, 5 (in score order), image 1 owns 4, 0, 2: first two of each, image 0 first.
    assert topk_per_image(keep, image_ids, 2, 2).tolist() == [3, 1, 4, 0]


def test_iou_family_loss_is_rejected_for_the_rpn() -> None:
    with pytest.raises(ConfigError, match="rpn.loss_bbox"):
        RPNHead(RPNConfig(loss_bbox="giou"))


def test_nms_pre_ranks_sigmoid_scores_as_mmdet_sorts_them() -> None:
    # Parity D2a: logits 17, 18, 19 are distinct but all sigmoid to 1.0 in float32; mmdet ranks the
    # sigmoid scores with `sort(descending=True)` and cuts at nms_pre, so ties are cut where that sort
    # puts them, not where topk on logits would (which takes 19).
    head = _head(test=ProposalConfig(nms_pre=2, max_per_img=10, nms_iou=0.99))
    k = 6
    anchors = [torch.tensor([[i * 20.0, 0.0, i * 20.0 + 10.0, 10.0] for i in range(k)])]  # disjoint: NMS keeps all
    logits = torch.tensor([[17.0, 0.0, 18.0, 19.0, -1.0, 17.5]])
    assert len(set(logits.sigmoid()[0, [0, 2, 3, 5]].tolist())) == 1  # the tie
    deltas = torch.zeros(1, k, 4)
    rois = head.proposals(anchors, [logits], [deltas], torch.tensor([[100, 200]]), head.cfg.test)
    mmdet_pick = logits[0].sigmoid().sort(descending=True).indices[:2]  # mmdet's `_predict_by_feat_single`
    assert sorted(rois[:, 1].tolist()) == sorted(anchors[0][mmdet_pick, 0].tolist())


def test_batched_sort_orders_ties_as_per_image_sort() -> None:
    # `proposals` sorts all images of a batch at once; on CPU each row must order its ties as the
    # per-image sort in mmdet does.
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (3, 5000), generator=gen).float().sigmoid()
    batched = scores.sort(dim=1, descending=True).indices
    for i in range(3):
        assert torch.equal(batched[i], scores[i].sort(descending=True).indices)


@pytest.mark.parametrize("path", ["nms_per_level", "grouped_nms"])
def test_fast_nms_paths_keep_what_one_batched_nms_keeps(path: str) -> None:
    """The per-level path (`RPNHead.nms_per_level`, and CUDA batches above torchvision's one-call
    size) and the grouped one (`RPNHead.grouped_nms`: all groups decided at once) keep the same
    boxes in the same order as one `batched_nms` over all (image, level) groups of the boxes mmdet
    keeps before NMS (the per-level path also returns the dropped ones, last); proposals are the
    same rows (boxes of exactly equal score, such as anchors over padding, may come in another order)."""
    from torchvision.ops import batched_nms

    from detector.model.rpn import grouped_nms_per_level, nms_per_level, topk_per_image

    g = torch.Generator().manual_seed(0)
    n, level_sizes = 3, [400, 300, 200, 100, 50]
    m = sum(level_sizes)
    xy = torch.randint(0, 200, (n * m, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(4, 60, (n * m, 2), generator=g).float()], 1)
    scores = torch.rand(n * m, generator=g)
    image_ids = torch.arange(n)[:, None].expand(n, m).reshape(-1)
    levels = torch.cat([torch.full((size,), lvl) for lvl, size in enumerate(level_sizes)]).repeat(n)
    usable = torch.rand(n * m, generator=g) > 0.2
    ok = torch.nonzero(usable).squeeze(1)
    ref = ok[batched_nms(boxes[ok], scores[ok], (image_ids * 5 + levels)[ok], 0.7)]
    masked = scores.masked_fill(~usable, float("-inf"))
    if path == "nms_per_level":
        got = nms_per_level(boxes, masked, image_ids, n, level_sizes, 0.7)
        got_usable = got[usable[got]]
    else:
        got = got_usable = grouped_nms_per_level(boxes, masked, n, level_sizes, 0.7)
    assert 0 < ref.numel() < usable.sum() and torch.equal(got_usable, ref)
    assert torch.equal(topk_per_image(got, image_ids, n, 150, usable), topk_per_image(ref, image_ids, n, 150))
    torch.manual_seed(0)
    head = _head(test=ProposalConfig(nms_pre=200, max_per_img=100, nms_iou=0.7)).eval()
    feats, sizes, pads = _feats(h=40, w=48), torch.tensor([[160, 192], [120, 150]]), torch.tensor([[160, 192], [128, 160]])
    plain, _ = head(feats, sizes, pads)
    setattr(head, path, True)
    fast, _ = head(feats, sizes, pads)
    assert plain.shape == fast.shape and torch.equal(plain[:, 0], fast[:, 0])
    assert sorted(map(tuple, plain.tolist())) == sorted(map(tuple, fast.tolist()))
