"""`roi_align_grad`: torchvision's RoIAlign gradient, each sampling point's weights computed once."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from detector.model.poolers import CpuRoIAlign, RoIPooler
from detector.model.roi_align_grad import roi_align_backward, sampling_weights


def _rois(g: torch.Generator, n: int, images: int, size: tuple[int, int]) -> torch.Tensor:
    """RoIs of every kind the kernel distinguishes: inside, across the border, more than a pixel
    outside, degenerate (zero and negative size), tiny and larger than the image; `size` is (W, H)."""
    w, h = size
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([w * 0.1, h * 0.1])
    wh = torch.rand(n, 2, generator=g) ** 2 * torch.tensor([w, h]) + 0.3
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([-80.0, -60.0, -20.0, -10.0])  # wholly outside, top left
    boxes[1] = torch.tensor([w + 20.0, h + 20.0, w + 90.0, h + 70.0])  # wholly outside, bottom right
    boxes[2] = torch.tensor([10.0, 10.0, 10.0, 10.0])  # zero size
    boxes[3] = torch.tensor([30.0, 30.0, 20.0, 25.0])  # negative size
    boxes[4] = torch.tensor([-5.0, -5.0, w + 5.0, h + 5.0])  # the whole image and more
    image = torch.randint(0, images, (n, 1), generator=g).float()
    return torch.cat([image, boxes], 1)


@pytest.mark.parametrize(("channels", "stride", "out", "sampling_ratio", "aligned"), [
    (8, 4, 7, 0, True),  # an FPN level, mmcv's defaults
    (16, 16, 14, 0, True),  # C4's RoI layer
    (8, 8, 7, 2, True),  # a fixed sampling ratio
    (8, 8, 7, 0, False),  # the legacy half-pixel-less RoIAlign (RoIs at least 1 x 1)
    (4, 32, 5, 3, False),
])  # fmt: skip
def test_equals_torchvisions_backward(channels: int, stride: int, out: int, sampling_ratio: int, aligned: bool) -> None:
    g = torch.Generator().manual_seed(stride * 100 + out + sampling_ratio)
    size = (200, 136)  # W, H: maps of 50 x 34 at stride 4, 7 x 5 at stride 32 (odd, and last rows clamped)
    feat_shape = (3, channels, -(-size[1] // stride), -(-size[0] // stride))
    rois = _rois(g, 60, 3, size)
    grad = torch.randn(rois.shape[0], channels, out, out, generator=g)
    ref = torch.ops.torchvision._roi_align_backward(grad, rois, 1 / stride, out, out, *feat_shape, sampling_ratio, aligned)
    ours = roi_align_backward(grad, rois, feat_shape=feat_shape, spatial_scale=1 / stride, sampling_ratio=sampling_ratio,
                              aligned=aligned)  # fmt: skip
    assert ref.abs().sum() > 0 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_weights_are_each_bins_average() -> None:
    """Each bin's weights sum to 1 when all its points lie well inside the map (an average of
    bilinear interpolations), 0 for a RoI wholly outside it, and every entry names a real pixel."""
    rois = torch.tensor([[0.0, 8.0, 8.0, 40.0, 30.0], [1.0, -90.0, -90.0, -40.0, -50.0], [1.0, 20.0, 4.0, 21.0, 5.0]])
    pixel, bins, weight = sampling_weights(rois, spatial_scale=0.25, output_size=(7, 7), sampling_ratio=0, aligned=True,
                                           height=16, width=16)  # fmt: skip
    per_bin = torch.zeros(3 * 49).index_add_(0, bins, weight)
    torch.testing.assert_close(per_bin[:49], torch.ones(49))
    assert per_bin[49:98].abs().sum() == 0
    torch.testing.assert_close(per_bin[98:], torch.ones(49))  # a 1-pixel RoI: one point per bin
    assert pixel.min() >= 0 and pixel.max() < 2 * 16 * 16


def test_points_on_the_far_edge_and_one_pixel_out() -> None:
    """A point exactly on y = H (x = W) counts and reads the last row (column) alone; one exactly at
    -1 counts and reads row 0; one just beyond either does not count."""
    h, w = 6, 9
    # One bin, one point at the bin's centre (no half-pixel shift): y = y1 + (y2 - y1) / 2.
    rois = torch.tensor([[0.0, w - 2.0, h - 2.0, w + 2.0, h + 2.0], [0.0, -3.0, -3.0, 1.0, 1.0],
                         [0.0, w - 2.0, h - 2.0, w + 2.2, h + 2.2], [0.0, -3.2, -3.2, 1.0, 1.0]])  # fmt: skip
    grad = torch.ones(4, 1, 1, 1)
    ref = torch.ops.torchvision._roi_align_backward(grad, rois, 1.0, 1, 1, 1, 1, h, w, 1, False)
    ours = roi_align_backward(grad, rois, feat_shape=(1, 1, h, w), spatial_scale=1.0, sampling_ratio=1, aligned=False)
    assert ref[0, 0, h - 1, w - 1] == 1 and ref[0, 0, 0, 0] == 1 and ref.sum() == 2
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_pooler_trains_with_the_sparse_gradient(channels_last: bool, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the pooler (FPN levels, an image without RoIs), on one thread and on several: the forward is
    torchvision's bit for bit, the features' gradients its up to rounding, in the features' layout."""
    g = torch.Generator().manual_seed(1)
    strides = (4, 8, 16, 32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = [torch.randn(3, 8, 128 // s, 160 // s, generator=g).contiguous(memory_format=fmt).requires_grad_() for s in strides]
    rois = _rois(g, 80, 3, (160, 128))
    rois[:, 0] = rois[:, 0].clamp(max=1) * 2  # images 0 and 2 only: image 1's gradient must be zeros
    weights = torch.randn(rois.shape[0], 8, 7, 7, generator=g)
    pooler = RoIPooler(output_size=7, featmap_strides=strides, sampling_ratio=0, aligned=True, finest_scale=56)
    pooler.cpu_threads = True
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    calls: list[bool] = []  # each CpuRoIAlign call's sparse_grad
    real_apply = CpuRoIAlign.apply
    monkeypatch.setattr(CpuRoIAlign, "apply", lambda *a: calls.append(a[-1]) or real_apply(*a))
    outs, grads, passes = [], [], []
    for sparse in (True, False):
        pooler.cpu_sparse_grad = sparse
        for f in feats:
            f.grad = None
        calls.clear()
        out = pooler(feats, rois)
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append([f.grad for f in feats])
        passes.append(list(calls))
    assert passes[0] and all(passes[0]), "the sparse gradient did not run"
    assert not any(passes[1])
    assert torch.equal(outs[0], outs[1])
    for ours, ref in zip(*grads):
        if ref is None:
            assert ours is None
            continue
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        assert ours[1].abs().sum() == 0 and ours.is_contiguous(memory_format=fmt)


def test_no_gradient_no_sparse_path() -> None:
    """Inference (no graph) and features that need no gradient take torchvision's plain call."""
    feat = torch.randn(1, 4, 8, 8)
    rois = torch.tensor([[0.0, 2.0, 2.0, 20.0, 24.0]])
    pooler = RoIPooler(output_size=7, featmap_strides=(4,), sampling_ratio=0, aligned=True, finest_scale=56)
    ref = roi_align(feat, rois, (7, 7), spatial_scale=0.25, sampling_ratio=0, aligned=True)
    out = pooler([feat], rois)
    assert out.grad_fn is None and torch.equal(out, ref)
    with torch.no_grad():
        assert torch.equal(pooler([feat.requires_grad_()], rois), ref)
