from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from detector.model.faster_rcnn import build_detector, count_parameters, describe
from detector.recipes import resolve

# Every kind of cell the matrices use (backbones, styles, necks, losses, precision, pretrain, classes).
HEAVY = pytest.mark.slow
CELLS: list[Any] = [
    {},
    pytest.param({"backbone": "r101"}, marks=HEAVY),
    pytest.param({"backbone": "x101-32x4d"}, marks=HEAVY),
    pytest.param({"backbone": "x101-64x4d"}, marks=HEAVY),
    pytest.param({"backbone": "x101-32x8d"}, marks=HEAVY),
    {"style": "caffe"},
    pytest.param({"backbone": "r101", "style": "caffe"}, marks=HEAVY),
    pytest.param({"style": "caffe", "neck": "c4"}, marks=HEAVY),
    {"style": "caffe", "neck": "dc5"},
    {"loss": "iou"},
    {"loss": "giou"},
    {"loss": "bounded-iou"},
    {"loss": "smooth-l1"},
    pytest.param({"precision": "amp"}, marks=HEAVY),  # same network as r50-fpn
    pytest.param({"pretrain": "tnr"}, marks=HEAVY),  # same network as r50-fpn
    {"style": "caffe", "train_scale": "ms-choice", "classes": "person", "pretrain": "coco-caffe-ms-3x"},
    {"style": "caffe", "train_scale": "ms-choice", "classes": "person-bicycle-car", "pretrain": "coco-caffe-ms-3x"},
]
LOSS_KEYS = {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"}


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 96, generator=g) * 255, torch.rand(3, 56, 80, generator=g) * 255]


def _targets(num_classes: int = 80) -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [40.0, 5.0, 90.0, 40.0]]), "labels": torch.tensor([0, num_classes - 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def test_r50_fpn_parameter_counts_match_reference_section_3() -> None:
    model = build_detector(resolve({}))
    assert count_parameters(model) == (41_753_056, 41_527_712)
    info = describe(resolve({}, name="faster-rcnn_r50_fpn_1x_coco"))
    assert (info["name"], info["params_total"], info["params_trainable"]) == ("faster-rcnn_r50_fpn_1x_coco", 41_753_056, 41_527_712)
    assert info["config"]["backbone"]["depth"] == 50


def test_frozen_norm_cells_train_fewer_parameters() -> None:
    caffe = describe(resolve({"style": "caffe"}))
    assert caffe["params_total"] == 41_753_056
    bn_affine_after_layer1 = caffe["params_trainable"] - 41_527_712
    assert bn_affine_after_layer1 < 0  # caffe: every BN affine is frozen


def test_state_dict_keys_follow_mmdet_names() -> None:
    keys = set(build_detector(resolve({})).state_dict())
    expected = {
        "backbone.conv1.weight",
        "backbone.bn1.running_var",
        "backbone.layer1.0.conv1.weight",
        "backbone.layer1.0.downsample.0.weight",
        "backbone.layer1.0.downsample.1.num_batches_tracked",
        "neck.lateral_convs.0.conv.weight",
        "neck.fpn_convs.3.conv.bias",
        "rpn_head.rpn_conv.weight",
        "rpn_head.rpn_cls.weight",
        "rpn_head.rpn_reg.bias",
        "roi_head.bbox_head.shared_fcs.0.weight",
        "roi_head.bbox_head.shared_fcs.1.weight",
        "roi_head.bbox_head.fc_cls.weight",
        "roi_head.bbox_head.fc_reg.weight",
    }
    assert expected <= keys
    assert not any("anchor" in k or "pixel_" in k for k in keys)  # no buffers beyond mmdet's
    c4 = set(build_detector(resolve({"style": "caffe", "neck": "c4"})).state_dict())
    assert "roi_head.shared_head.layer4.0.downsample.0.weight" in c4 and not any(k.startswith("neck.") for k in c4)


def test_preprocess_normalises_bgr_and_pads_with_zero() -> None:
    model = build_detector(resolve({"style": "caffe"}))
    img = torch.zeros(3, 40, 50)
    img[0] = 255.0  # pure red in RGB
    batch, sizes, pads = model.preprocess([img, torch.zeros(3, 70, 33)])
    assert batch.shape == (2, 3, 96, 64)
    assert sizes.tolist() == [[40, 50], [70, 33]] and pads.tolist() == [[64, 64], [96, 64]]
    # BGR: channel 2 holds red; caffe mean (103.53, 116.28, 123.675), std 1.
    assert batch[0, :, 0, 0].tolist() == pytest.approx([-103.53, -116.28, 255 - 123.675])
    assert batch[0, :, 40:, :].abs().sum() == 0 and batch[0, :, :, 50:].abs().sum() == 0


def test_train_and_eval_outputs() -> None:
    torch.manual_seed(0)
    cfg = resolve({})
    model = build_detector(replace(cfg, roi_head=replace(cfg.roi_head, score_thr=0.0)))
    losses = model(_images(), _targets())
    assert set(losses) == LOSS_KEYS and all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_head.bbox_head.fc_reg.weight.grad is not None
    assert model.backbone.layer1[0].conv1.weight.grad is None  # frozen stage
    model.eval()
    with torch.no_grad():
        dets = model(_images())
        scaled = model(_images(), original_sizes=[(128, 192), (112, 160)])
    assert len(dets) == 2
    for d, s in zip(dets, scaled):
        assert set(d) == {"boxes", "scores", "labels"}
        assert d["boxes"].shape[0] == d["scores"].shape[0] == d["labels"].shape[0] <= 100
        assert d["labels"].dtype == torch.int64 and int(d["labels"].max()) < 80
        torch.testing.assert_close(s["boxes"], d["boxes"] * 2)  # both sides doubled: same NMS result
    assert (dets[1]["boxes"][:, 2] <= 80).all() and (dets[1]["boxes"][:, 3] <= 56).all()


def test_all_empty_targets() -> None:
    model = build_detector(resolve({}))
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(_images(), empty)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_rpn_bbox"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and torch.isfinite(losses["loss_rpn_cls"])
    sum(losses.values()).backward()


def _check_autocast(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cfg = resolve({"precision": "bf16" if dtype == torch.bfloat16 else "amp"})
    # 64 sampled RoIs an image, not 512: where the CPU has no native bf16 (AVX2), torch's bf16 matmul
    # fallback made the RoI head's backward ~40 s of this test at the recipe's count.
    model = build_detector(replace(cfg, roi_head=replace(cfg.roi_head, score_thr=0.0, num_samples=64))).to(device)
    seen: dict[str, torch.dtype] = {}
    model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("backbone", o[-1].dtype))
    model.roi_head.bbox_roi_extractor.register_forward_hook(lambda m, i, o: seen.__setitem__("roi", o.dtype))
    images = [im[:, :32, :64].to(device) for im in _images()]  # small: reduced-precision CPU convs are slow
    targets = [{k: v.to(device) for k, v in t.items()} for t in _targets()]
    targets[0]["boxes"] = torch.tensor([[4.0, 4.0, 30.0, 28.0]], device=device)
    targets[0]["labels"] = targets[0]["labels"][:1]
    with torch.autocast(device, dtype=dtype):
        losses = model(images, targets)
        sum(losses.values()).backward()
    assert seen == {"backbone": dtype, "roi": torch.float32}  # convs reduced, RoIAlign in float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        dets = model(images)
    assert all(d["boxes"].dtype == d["scores"].dtype == torch.float32 for d in dets)
    assert all(torch.isfinite(d["boxes"]).all() for d in dets) and dets[0]["boxes"].shape[0] > 0


def test_cpu_bf16_autocast_dtypes() -> None:
    _check_autocast("cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_autocast_dtypes() -> None:
    _check_autocast("cuda", torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_losses_equal_the_cpu_losses_under_deterministic_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sync-free assignment and slot sampling on CUDA (topk, scatter, masked losses) against the
    # same model on CPU: the same samples, the same losses up to float rounding (TF32 off).
    from detector.parity.stages import first_n_keys

    monkeypatch.setattr("detector.model.sampling.random_keys", first_n_keys)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_detector(resolve({})).train()
    images, targets = _images(), _targets(80)
    with torch.no_grad():
        cpu = {k: v.item() for k, v in model(images, targets).items()}
        model.cuda()
        cuda = {k: v.item() for k, v in model([im.cuda() for im in images],
                                              [{k: v.cuda() for k, v in t.items()} for t in targets]).items()}  # fmt: skip
    assert cuda == pytest.approx(cpu, rel=1e-4), (cuda, cpu)


@pytest.mark.parametrize("axes", CELLS, ids=lambda a: "-".join(a.values()) or "r50-fpn")
def test_every_cell_trains_and_predicts_at_tiny_size(axes: dict[str, str]) -> None:
    torch.manual_seed(0)
    cfg = resolve(axes)
    # Random init scores sit near 1/(C+1) < 0.05: drop the threshold so eval exercises NMS too.
    # 64 proposals and 64 samples per image: every stage runs, and C4's res5 head over all of an
    # image's anchors (its default here) cost a minute of CPU.
    rpn = replace(cfg.rpn, train=replace(cfg.rpn.train, max_per_img=64), test=replace(cfg.rpn.test, max_per_img=64))
    model = build_detector(replace(cfg, rpn=rpn, roi_head=replace(cfg.roi_head, score_thr=0.0, num_samples=64)))
    losses = model(_images(), _targets(cfg.num_classes))
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        dets = model(_images(), original_sizes=[(64, 96), (56, 80)])
    assert len(dets) == 2 and all(bool((d["labels"] < cfg.num_classes).all()) for d in dets)
    assert sum(d["boxes"].shape[0] for d in dets) > 0  # score_thr 0: the NMS path really ran


@pytest.mark.slow
def test_one_gpu_of_16_images_has_the_losses_of_8_ranks_of_2(monkeypatch: pytest.MonkeyPatch) -> None:
    # `--images-per-gpu 16` on one GPU (issue 16): assignment and sampling are per image, and each
    # loss is divided by the batch's sample count; when every image fills its quota (16 x 64 either
    # way here; 256 anchors and 512 RoIs per image on COCO), the one batch's loss is the mean of the
    # 8 ranks' losses, which is what DDP's gradient averaging optimises. Same-size images: the batch
    # padding, the one remaining difference, is the same. Deterministic sampling (first N in index
    # order) so that both ways draw the same samples.
    from detector.parity.stages import first_n_keys

    monkeypatch.setattr("detector.model.sampling.random_keys", first_n_keys)
    cfg = resolve({})
    cfg = replace(cfg, rpn=replace(cfg.rpn, num_samples=64), roi_head=replace(cfg.roi_head, num_samples=64))
    torch.manual_seed(0)
    model = build_detector(cfg).train()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 96, generator=g) * 255 for _ in range(16)]
    targets = []
    for i in range(16):
        x, y = 4.0 + 2 * i, 6.0 + i
        targets.append({"boxes": torch.tensor([[x, y, x + 30.0, y + 40.0], [50.0, 10.0, 90.0, 30.0 + i]]),
                        "labels": torch.tensor([i % 80, (3 * i) % 80])})
    with torch.no_grad():
        whole = model(images, targets)
        ranks = [model(images[r : r + 2], targets[r : r + 2]) for r in range(0, 16, 2)]
    for key in LOSS_KEYS:
        mean = torch.stack([r[key] for r in ranks]).mean()
        assert torch.allclose(whole[key], mean, rtol=1e-5, atol=0), (key, whole[key].item(), mean.item())
