"""The detector's fast paths compute what the plain paths compute (benchmarks.md, "what each change won").

Each fast path has a switch; with it off the model runs the plain PyTorch modules:
`fold.conv_bn` / `set_fold_bn_` (frozen BN folded into its conv),
`FasterRCNN.cpu_channels_last` / `cpu_channels_last_train` with `match_weight_layout_` (NHWC batches
and conv weights on CPU, in training only where `cpu_trains_nhwc`)
`RoIPooler.cpu_threads` (CPU RoIAlign split over threads) and `RoIPooler.cpu_sparse_grad` (its backward
as one sparse product, `roi_align_grad`).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from detector.config import DetectorConfig, ProposalConfig
from detector.model.backbones import set_fold_bn_
from detector.model.faster_rcnn import FasterRCNN, build_detector, cpu_trains_nhwc, match_weight_layout_
from detector.model.fold import conv_bn
from detector.model.poolers import (
    CpuRoIAlign,
    RoIPooler,
    _split_by_image,
    swap_layout,
)

# Fewer proposals and sampled RoIs than the recipe keep the test quick; the paths under test (the
# convolutions) do not depend on those counts.
_R = DetectorConfig().rpn
SMALL_CFG = dataclasses.replace(
    DetectorConfig(),
    rpn=dataclasses.replace(_R, train=ProposalConfig(nms_pre=300, max_per_img=100), test=ProposalConfig(nms_pre=300, max_per_img=100)),
    roi_head=dataclasses.replace(DetectorConfig().roi_head, num_samples=64),
)


def _random_bn_(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial frozen statistics and affine (a fresh BN is the identity, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 1, "bias": False},
        {"kernel_size": 3, "padding": 1, "stride": 2, "bias": False},
        {"kernel_size": 3, "padding": 2, "dilation": 2, "groups": 4, "bias": False},
        {"kernel_size": 3, "padding": 1, "bias": True},
    ],
)
def test_conv_bn_fold_matches_conv_then_bn_forward_and_backward(kwargs: dict) -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 16, **kwargs), nn.BatchNorm2d(16)
    _random_bn_(bn)
    bn.eval()  # frozen statistics, trainable affine: mmdet norm_eval=True
    x = torch.randn(2, 8, 12, 10, requires_grad=True)
    outs, grads = [], []
    for fold in (False, True):
        for p in (*conv.parameters(), *bn.parameters(), x):
            p.grad = None
        y = conv_bn(conv, bn, x, fold=fold)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([t.grad.clone() for t in (x, conv.weight, bn.weight, bn.bias)])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for folded, plain in zip(grads[1], grads[0]):
        torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-5)


def test_conv_bn_with_batch_statistics_is_not_folded() -> None:
    conv, bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4).train()
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(conv_bn(conv, bn, x, fold=True), bn(conv(x)))


def test_detector_folds_and_a_bare_backbone_does_not() -> None:
    model = build_detector(DetectorConfig())
    folds = [m.fold_bn for m in model.modules() if hasattr(m, "fold_bn")]
    assert folds and all(f == "auto" for f in folds)
    from detector.model.backbones import ResNet

    assert all(m.fold_bn == "off" for m in ResNet(DetectorConfig().backbone).modules() if hasattr(m, "fold_bn"))


def _assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3, name: str = "") -> None:
    """Equal up to float32 rounding accumulated over ~50 layers: max |a - b| <= rel * max |b|.
    (NHWC alone, fold off, already differs by ~1e-4 of the scale at C5: another summation order.)"""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rel * scale, f"{name}: max abs difference {err} > {rel} * {scale}"


def _plain(model: FasterRCNN) -> FasterRCNN:
    plain = copy.deepcopy(model)
    plain.cpu_channels_last = plain.cpu_channels_last_train = False
    match_weight_layout_(plain)
    plain.roi_head.bbox_roi_extractor.cpu_threads = False
    plain.roi_head.bbox_roi_extractor.cpu_sparse_grad = False
    set_fold_bn_(plain, "off")
    return plain


@pytest.fixture(scope="module")
def models() -> tuple[FasterRCNN, FasterRCNN]:
    torch.manual_seed(0)
    fast = build_detector(SMALL_CFG)
    _random_bn_(fast.backbone)
    with torch.no_grad():
        # Well-separated class scores so that the detections themselves are comparable.
        fast.roi_head.bbox_head.fc_cls.bias[:3] = torch.tensor([6.0, 4.0, 2.0])
    # NHWC in training too, whatever this CPU's default (`cpu_trains_nhwc`): the path is tested everywhere.
    fast.cpu_channels_last_train = True
    match_weight_layout_(fast)  # as a cell's run places it
    return fast, _plain(fast)


def _images(n: int, scale: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, (96 + 32 * i) * scale, 128 * scale), generator=g).float() for i in range(n)]


def test_fast_and_plain_features_and_detections_agree(models: tuple[FasterRCNN, FasterRCNN]) -> None:
    fast, plain = models
    images = _images(2)
    with torch.inference_mode():
        batch, _, _ = fast.preprocess(images)
        assert batch.is_contiguous(memory_format=torch.channels_last)
        assert plain.preprocess(images)[0].is_contiguous()
        for a, b in zip(fast.neck(fast.backbone(batch)), plain.neck(plain.backbone(batch.contiguous()))):
            _assert_close_to_scale(a, b)
        out_fast, out_plain = fast.eval()(images), plain.eval()(images)
    for a, b in zip(out_fast, out_plain):
        # Order-free: near-equal scores may swap places under a 1e-4 perturbation.
        assert a["boxes"].shape[0] > 0 and a["boxes"].shape == b["boxes"].shape
        torch.testing.assert_close(a["scores"].sort().values, b["scores"].sort().values, rtol=1e-3, atol=1e-4)
        assert torch.equal(a["labels"].sort().values, b["labels"].sort().values)
        same_label = a["labels"][:, None] == b["labels"][None, :]
        best_iou = (box_iou(a["boxes"], b["boxes"]) * same_label).max(dim=1).values
        assert best_iou.min() > 0.999


# Each CPU fast path switched on alone in the plain model, and all of them (the detector's default).
# "exact": the threaded RoIAlign computes the same numbers. The others sum in another order (folding one
# multiply; oneDNN's NHWC convolutions throughout; RoIAlign's gradient as a sparse product) and are held to what float32 rounding alone does to
# the plain path on the machine at hand (`rounding_noise`). "frozen", what the detector does on a GPU,
# folds only the frozen stem and res2 in training.
FAST_PATHS = {"fold_bn": "rounding", "fold_frozen": "rounding", "roi_threads": "exact", "roi_grad": "rounding",
              "channels_last": "rounding", "all": "rounding"}
_TARGETS = [
    {"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0], [40.0, 30.0, 120.0, 90.0]]), "labels": torch.tensor([0, 5])},
    {"boxes": torch.tensor([[5.0, 50.0, 60.0, 120.0]]), "labels": torch.tensor([2])},
]


def _training_step(model: FasterRCNN, images: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same anchor / RoI samples
    out = model(images, _TARGETS)
    sum(out.values()).backward()
    return {k: v.detach() for k, v in out.items()}, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _largest_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


@pytest.fixture(scope="module")
def rounding_noise(models: tuple[FasterRCNN, FasterRCNN]) -> float:
    """The largest gradient difference, relative to the gradient's scale, that float32 rounding alone
    makes in the plain path here: its images scaled by 1 +- k * 2^-23 against the unscaled ones.

    It is not small, and it is not smooth: a rounding-sized change flips the ReLU of a few of the RoI
    head's ~10^5 FC pre-activations that lie within 1e-6 of zero, and each flip moves that layer's
    gradient by a whole RoI's share. Measured on one model: 2e-5 (no flip) to 1.9e-2 of the scale,
    depending on k, on an AVX2 CPU; ~8e-3 on an AVX-512 one. A fixed bound tuned on one CPU failed on
    the other (1.5e-3 against 1e-4 for folding), so the bound is measured where the test runs."""
    _, plain = models
    images = _images(2)
    _, base = _training_step(plain, images)
    base = {n: g.clone() for n, g in base.items()}
    eps = 2.0**-23
    noise = max(_largest_relative_difference(_training_step(plain, [im * (1 + sign * k * eps) for im in images])[1], base)
                for k in (1, 4, 16, 64) for sign in (1, -1))
    # Bounded, or the fast paths' comparison below could not fail: a real mistake (a wrong BN epsilon,
    # a transposed weight) moves gradients by their whole scale.
    assert 0 < noise < 0.05, noise
    return noise


def _switched(plain: FasterRCNN, fast_path: str) -> FasterRCNN:
    model = copy.deepcopy(plain)
    if fast_path in ("fold_bn", "all"):
        set_fold_bn_(model, "auto")  # on CPU: every pair (see fold_frozen for what other devices do)
    if fast_path == "fold_frozen":
        set_fold_bn_(model, "frozen")
    if fast_path in ("roi_threads", "all"):
        model.roi_head.bbox_roi_extractor.cpu_threads = True
    if fast_path in ("roi_grad", "all"):
        model.roi_head.bbox_roi_extractor.cpu_sparse_grad = True
    if fast_path in ("channels_last", "all"):
        model.cpu_channels_last = model.cpu_channels_last_train = True
        match_weight_layout_(model)
    return model


@pytest.mark.parametrize("fast_path", list(FAST_PATHS))
def test_fast_and_plain_training_losses_and_gradients_agree(models: tuple[FasterRCNN, FasterRCNN], rounding_noise: float,
                                                           fast_path: str) -> None:
    _, plain = models
    images = _images(2)
    fast_losses, fast_grads = _training_step(_switched(plain, fast_path), images)
    losses, grads = _training_step(plain, images)
    for key in losses:
        torch.testing.assert_close(fast_losses[key], losses[key], rtol=1e-4, atol=1e-5)
    assert fast_grads.keys() == grads.keys() and "backbone.layer2.0.bn1.weight" in grads
    for name, g in fast_grads.items():
        if FAST_PATHS[fast_path] == "exact":
            assert torch.equal(g, grads[name]), name
        else:
            _assert_close_to_scale(g, grads[name], rel=2 * rounding_noise, name=name)


def _weight_copies(model: FasterRCNN) -> int:
    """Layout conversions of a k x k (k > 1) conv weight or its gradient during one training step:
    copies made by `contiguous` (a clone) or by autograd laying a gradient out as its weight (a 1x1
    weight is the same memory in either layout). oneDNN's own per-call `to` in the backward is not one.
    The images are twice the other tests' so that the smallest map (P6) is 4x4: on an AVX2 CPU
    oneDNN's backward takes a 2x2 map's weight NCHW whatever its layout (one copy, torch's choice;
    seen on AMD EPYC Milan, not on AVX-512), and no map of a real image is that small."""
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1}
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0]]), "labels": torch.tensor([1])}] * 2
    model.train()
    torch.manual_seed(3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        sum(model(_images(2, scale=2), targets).values()).backward()
    model.zero_grad(set_to_none=True)
    return sum(1 for e in prof.events() if e.name == "aten::copy_" and e.input_shapes and tuple(e.input_shapes[0]) in shapes
               and e.cpu_parent is not None and e.cpu_parent.name in ("aten::clone", "torch::autograd::AccumulateGrad"))


def test_matched_weight_layout_spares_every_weight_copy_and_changes_no_number(models: tuple[FasterRCNN, FasterRCNN]) -> None:
    """NHWC batches with NCHW weights made oneDNN copy each 3x3 weight (and its gradient) at every call;
    with the weights NHWC too (`match_weight_layout_`) none is copied, and losses and gradients are equal."""
    fast, _ = models
    unmatched = copy.deepcopy(fast).to(memory_format=torch.contiguous_format)
    assert fast.backbone.layer1[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert not unmatched.backbone.layer1[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert _weight_copies(unmatched) >= 2 * 12  # forward and backward, over a dozen 3x3 convs
    assert _weight_copies(fast) == 0
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0]]), "labels": torch.tensor([1])}] * 2
    losses, grads = [], []
    for model in (fast, unmatched):
        torch.manual_seed(3)
        out = model.train()(_images(2), targets)
        sum(out.values()).backward()
        losses.append({k: v.detach() for k, v in out.items()})
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    for key in losses[0]:
        torch.testing.assert_close(losses[0][key], losses[1][key], rtol=1e-6, atol=1e-7)
    for name, g in grads[0].items():
        _assert_close_to_scale(g, grads[1][name], rel=1e-5, name=name)
    # Where batches are NCHW (a GPU's default, or the switch off), the weights go back to NCHW.
    plain = match_weight_layout_(_plain(fast))
    assert all(p.is_contiguous() for p in plain.parameters())


@pytest.mark.parametrize(("capability", "trains_nhwc"), [("AVX512", True), ("AVX512_BF16", True), ("AVX2", False),
                                                        ("DEFAULT", False)])
def test_cpu_training_layout_follows_the_cpu(capability: str, trains_nhwc: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """NHWC training only where torch runs AVX-512 kernels (AVX2: oneDNN's NHWC backward loses more
    than its forward wins, reports/benchmarks.md); inference is NHWC on every CPU."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_trains_nhwc() is trains_nhwc
    model = build_detector(SMALL_CFG)
    cpu = torch.device("cpu")
    assert model.cpu_channels_last_train is trains_nhwc
    assert model.train().memory_format(cpu) == (torch.channels_last if trains_nhwc else torch.contiguous_format)
    assert model.eval().memory_format(cpu) == torch.channels_last
    with torch.inference_mode():
        assert model.preprocess(_images(1))[0].is_contiguous(memory_format=torch.channels_last)


def test_switching_mode_moves_the_weights_to_the_new_layout_and_keeps_them(models: tuple[FasterRCNN, FasterRCNN]) -> None:
    """On a CPU that trains NCHW and infers NHWC, `.eval()` / `.train()` convert the 4-D weights (same
    Parameter objects, same values), so neither mode copies a weight at every call; where both modes
    share a layout nothing moves."""
    fast, _ = models
    model = copy.deepcopy(fast)
    model.cpu_channels_last_train = False
    match_weight_layout_(model.train())
    conv = model.backbone.layer1[0].conv2.weight
    before = conv.detach().clone()
    assert conv.is_contiguous() and _weight_copies(model) == 0
    model.eval()
    assert model.backbone.layer1[0].conv2.weight is conv and conv.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.detach(), before)
    model.train()
    assert conv.is_contiguous() and torch.equal(conv.detach(), before) and _weight_copies(model) == 0
    same = copy.deepcopy(fast).train()  # NHWC in both modes
    ptr = same.backbone.layer1[0].conv2.weight.data_ptr()
    assert same.eval().backbone.layer1[0].conv2.weight.data_ptr() == ptr


@pytest.mark.parametrize(("num_images", "channels_last"), [(1, False), (3, False), (2, True)])
def test_threaded_roi_align_equals_one_plain_call(num_images: int, channels_last: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    strides = (4, 8, 16, 32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = [torch.randn(num_images, 8, 128 // s, 160 // s, generator=g).contiguous(memory_format=fmt).requires_grad_() for s in strides]
    n = 90
    xy = torch.rand(n, 2, generator=g) * torch.tensor([120.0, 90.0])
    wh = torch.rand(n, 2, generator=g) ** 2 * 150 + 4
    # Image 1 of 3 gets no RoI: its gradient must still come back (as zeros).
    img = torch.randint(0, num_images, (n, 1), generator=g).float() * (0 if num_images == 1 else 1)
    img[img == 1] = 2 if num_images == 3 else 0
    rois = torch.cat([img, xy, xy + wh], 1)
    pooler = RoIPooler(output_size=7, featmap_strides=strides, sampling_ratio=0, aligned=True, finest_scale=56)
    weights = torch.randn(n, 8, 7, 7, generator=g)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    outs, grads, calls = [], [], []
    real_apply = CpuRoIAlign.apply
    monkeypatch.setattr(CpuRoIAlign, "apply", lambda *a: calls.append(1) or real_apply(*a))
    pooler.cpu_sparse_grad = False  # torchvision's backward, threaded (`test_roi_align_grad`: the sparse one)
    for threaded in (True, False):
        pooler.cpu_threads = threaded
        for f in feats:
            f.grad = None
        out = pooler(feats, rois)
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append([f.grad for f in feats])
    assert calls, "the threaded path did not run"
    assert torch.equal(outs[0], outs[1])  # the same kernel on the same inputs, row by row
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    if num_images == 3:
        assert all(g is None or g[1].abs().sum() == 0 for g in grads[0])
    # The gradient comes back in the features' layout (no cross-layout add in autograd).
    assert all(g is None or g.is_contiguous(memory_format=fmt) for g in grads[0])


@pytest.mark.parametrize("shape", [(2, 16, 12, 20), (1, 1, 5, 7), (2, 3, 1, 1)])
def test_swap_layout_keeps_values(shape: tuple[int, int, int, int]) -> None:
    x = torch.randn(*shape)
    to_cl = swap_layout(x, to_channels_last=True)
    assert torch.equal(to_cl, x) and to_cl.is_contiguous(memory_format=torch.channels_last)
    back = swap_layout(to_cl, to_channels_last=False)
    assert torch.equal(back, x) and back.is_contiguous()
    odd = x.transpose(2, 3)  # neither layout: plain .contiguous()
    assert torch.equal(swap_layout(odd, to_channels_last=False), odd)


def test_split_by_image_feeds_every_thread() -> None:
    rois = torch.tensor([[0.0, 0, 0, 1, 1]] * 5 + [[2.0, 0, 0, 1, 1]] * 3)
    one = _split_by_image(rois[:5], 1, workers=2)
    assert [(i, p.tolist()) for i, p in one] == [(0, [0, 1, 2]), (0, [3, 4])]
    two = _split_by_image(rois, 3, workers=2)
    assert [(i, p.tolist()) for i, p in two] == [(0, [0, 1, 2, 3, 4]), (2, [5, 6, 7])]
