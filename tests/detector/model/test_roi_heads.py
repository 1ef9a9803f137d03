from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from detector.config import BackboneConfig, RoIHeadConfig
from detector.errors import ConfigError
from detector.model.roi_heads import StandardRoIHead
from detector.recipes import resolve

NUM_CLASSES = 3


def _head(**kw: object) -> StandardRoIHead:
    cfg = replace(RoIHeadConfig(), in_channels=4, fc_channels=16, **kw)  # type: ignore[arg-type]
    return StandardRoIHead(cfg, num_classes=NUM_CLASSES, backbone=BackboneConfig())


def _feats() -> list[torch.Tensor]:
    return [torch.randn(2, 4, 64 // s, 96 // s) for s in (4, 8, 16, 32)]


def _rois() -> torch.Tensor:
    return torch.tensor([[0.0, 0, 0, 30, 30], [0.0, 10, 10, 60, 50], [0.0, 40, 5, 90, 60], [1.0, 0, 0, 20, 20], [1.0, 5, 5, 40, 40]])


def test_predictor_shapes_init_and_keys() -> None:
    head = _head()
    assert head.bbox_head.fc_cls.out_features == NUM_CLASSES + 1  # background last
    assert head.bbox_head.fc_reg.out_features == 4 * NUM_CLASSES
    keys = set(head.state_dict())
    assert {"bbox_head.shared_fcs.0.weight", "bbox_head.shared_fcs.1.bias", "bbox_head.fc_cls.weight", "bbox_head.fc_reg.weight"} <= keys
    big = StandardRoIHead(RoIHeadConfig(), num_classes=80, backbone=BackboneConfig())
    assert 0.007 < big.bbox_head.fc_cls.weight.std().item() < 0.013
    assert 0.0007 < big.bbox_head.fc_reg.weight.std().item() < 0.0013


def test_sampling_adds_gts_and_labels_background_last() -> None:
    torch.manual_seed(0)
    head = _head()
    targets = [
        {"boxes": torch.tensor([[0.0, 0, 30, 30]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    rois, labels, gts, valid = head.sample(_rois(), targets)
    # Fixed slots: num_samples per image; image 0 has 3 proposals + the gt, image 1 two proposals.
    n = head.cfg.num_samples
    assert rois.shape == (2 * n, 5) and valid.tolist() == [True] * 4 + [False] * (n - 4) + [True] * 2 + [False] * (n - 2)
    assert rois[valid, 0].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    # Image 0: the gt itself and the identical proposal are positives (first), the rest negatives.
    assert labels[valid].tolist() == [2, 2, 3, 3, 3, 3]
    assert gts[:2].tolist() == [[0.0, 0, 30, 30]] * 2


def test_sampling_takes_the_first_candidates_under_deterministic_keys() -> None:
    from detector.parity.stages import first_n_sampling

    head = _head()
    gt = torch.tensor([[0.0, 0, 30, 30]])
    with first_n_sampling():
        rois, labels, _, valid = head.sample(_rois()[:3], [{"boxes": gt, "labels": torch.tensor([1])}])
    # mmdet's order with the gt in front: gt, proposal 0 (both positive), then proposals 1, 2.
    assert rois[valid, 1:].tolist() == [[0.0, 0, 30, 30], [0.0, 0, 30, 30], [10.0, 10, 60, 50], [40.0, 5, 90, 60]]
    assert labels[valid].tolist() == [1, 1, 3, 3]


def test_sampler_quota_for_many_proposals() -> None:
    torch.manual_seed(0)
    head = _head()
    xy = torch.rand(2000, 2) * 50
    props = torch.cat([torch.zeros(2000, 1), xy, xy + 10 + torch.rand(2000, 2) * 30], dim=1)
    gt = torch.tensor([[10.0, 10, 40, 40], [30.0, 20, 60, 50]])
    rois, labels, _, valid = head.sample(props, [{"boxes": gt, "labels": torch.tensor([0, 1])}])
    assert rois.shape[0] == 512 and bool(valid.all()) and 0 < (labels < NUM_CLASSES).sum() <= 128


def test_empty_targets_give_zero_box_loss() -> None:
    head = _head().train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = head.loss(_feats(), _rois(), empty)
    assert losses["loss_bbox"].item() == 0.0 and torch.isfinite(losses["loss_cls"])
    # With every RoI a negative and near-uniform logits, CE ~ ln(C + 1).
    assert losses["loss_cls"].item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=0.05)


def test_smooth_l1_beta_reaches_the_box_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    import detector.model.roi_heads

    seen: list[tuple[str, float]] = []
    real = detector.model.roi_heads.box_loss

    def spy(name: str, *args: object, smooth_l1_beta: float = 1.0, **kw: object) -> torch.Tensor:
        seen.append((name, smooth_l1_beta))
        return real(name, *args, smooth_l1_beta=smooth_l1_beta, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(detector.model.roi_heads, "box_loss", spy)
    targets = [{"boxes": torch.tensor([[0.0, 0, 30, 30]]), "labels": torch.tensor([1])}] * 2
    losses = _head(loss_bbox="smooth_l1", loss_bbox_beta=0.5).train().loss(_feats(), _rois(), targets)
    assert seen == [("smooth_l1", 0.5)] and losses["loss_bbox"].item() > 0


def test_class_major_regression_selects_own_class() -> None:
    head = _head()
    reg = torch.arange(24.0).view(2, 12)
    assert head._class_deltas(reg, torch.tensor([0, 2])).tolist() == [[0.0, 1, 2, 3], [20.0, 21, 22, 23]]


def test_predict_threshold_nms_rescale_and_max_per_img() -> None:
    head = _head(max_per_img=2).eval()
    with torch.no_grad():
        head.bbox_head.fc_cls.weight.zero_()
        head.bbox_head.fc_cls.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # class 2 dominates
        head.bbox_head.fc_reg.weight.zero_()
        head.bbox_head.fc_reg.bias.zero_()
    sizes = torch.tensor([[64, 96], [64, 96]])
    dets = head.predict(_feats(), _rois(), sizes, scale_factors=torch.tensor([[1.0, 1.0], [2.0, 3.0]]))
    assert len(dets) == 2
    assert dets[0]["labels"].tolist() == [2, 2]  # 3 RoIs, capped at 2 after NMS
    assert dets[0]["boxes"].dtype == torch.float32
    # Image 1: zero deltas -> the proposals themselves, rescaled by (x 2, y 3); they overlap < 0.5.
    assert sorted(dets[1]["boxes"].tolist()) == [[0.0, 0.0, 40.0, 60.0], [10.0, 15.0, 80.0, 120.0]]
    assert all(s.item() > 0.05 for s in dets[1]["scores"])


def test_c4_res5_head() -> None:
    cfg = resolve({"style": "caffe", "neck": "c4"})
    head = StandardRoIHead(cfg.roi_head, num_classes=2, backbone=cfg.backbone).eval()
    assert "shared_head.layer4.2.conv3.weight" in head.state_dict()
    assert head.bbox_head.fc_cls.in_features == 2048
    with torch.no_grad():
        cls, reg = head.forward_box([torch.randn(1, 1024, 4, 6)], torch.tensor([[0.0, 0, 0, 60, 50]]))
    assert cls.shape == (1, 3) and reg.shape == (1, 8)


def test_iou_loss_requires_decoded_boxes() -> None:
    with pytest.raises(ConfigError, match="reg_decoded_bbox"):
        _head(loss_bbox="iou")
    _head(loss_bbox="iou", reg_decoded_bbox=True)


def test_predict_with_no_proposals() -> None:
    dets = _head().eval().predict(_feats(), torch.zeros(0, 5), torch.tensor([[64, 96], [64, 96]]))
    assert [d["boxes"].shape for d in dets] == [(0, 4), (0, 4)]
