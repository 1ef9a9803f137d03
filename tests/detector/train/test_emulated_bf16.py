"""The emulated bf16 path (`detector.train.emulated_bf16`) computes what bf16 kernels compute.

The reference is the definition of a bf16 kernel: inputs rounded to bf16, products summed exactly
(float64 here), the result rounded to bf16 once. Any two kernels differ by the order of summation,
which moves a result that lies next to a rounding boundary by one bf16 unit: a handful of elements in
10^4. A path that skipped a rounding (fp32 inputs, say) moves most of them, which the control shows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from detector.model.faster_rcnn import build_detector
from detector.recipes import resolve
from detector.train.emulated_bf16 import EmulatedBf16

BF16 = torch.bfloat16
Op = Callable[[Tensor, Tensor, Tensor], Tensor]
OPS: dict[str, tuple[Op, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    # name: (op(x, w, b), x shape, w shape, b shape)
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, padding=1), (2, 32, 20, 16), (48, 32, 3, 3), (48,)),
    "conv2d_strided": (lambda x, w, b: F.conv2d(x, w, b, stride=2), (2, 32, 20, 16), (48, 32, 1, 1), (48,)),
    "linear": (F.linear, (64, 256), (96, 256), (96,)),
    "matmul": (lambda x, w, b: x @ w.T, (64, 256), (96, 256), (96,)),  # b unused: no grad b
    "addmm": (lambda x, w, b: torch.addmm(b, x, w.T), (64, 256), (96, 256), (96,)),
}


def _inputs(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, xs, ws, bs = OPS[name]
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g) for s in (xs, ws, bs))
    with torch.no_grad():
        grad_out = OPS[name][0](x, w, b)
    return x, w, b, torch.randn(grad_out.shape, generator=g)


def _run(name: str, mode: str) -> list[Tensor]:
    """(output, grad x, grad w, grad b) of one op, fp32 leaves, under `mode`: "emulated" or
    "native" (torch's own bf16 autocast kernels) or "unrounded" (a control: plain fp32)."""
    op = OPS[name][0]
    x, w, b, grad_out = _inputs(name)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    if mode == "unrounded":
        out = op(*leaves)
    else:
        with torch.autocast("cpu", dtype=BF16):
            if mode == "emulated":
                with EmulatedBf16():
                    out = op(*leaves)
            else:
                out = op(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves if t.grad is not None)]


def _exact_bf16(name: str) -> list[Tensor]:
    """What a bf16 kernel means: bf16 inputs, exact sums (float64), each result rounded to bf16 once."""
    op = OPS[name][0]
    x, w, b, grad_out = _inputs(name)
    leaves = [t.to(BF16).double().requires_grad_() for t in (x, w, b)]
    out = op(*leaves)
    out.backward(grad_out.to(BF16).double())
    return [t.to(BF16) for t in (out.detach(), *(leaf.grad for leaf in leaves if leaf.grad is not None))]


def _mismatch(ref: Tensor, got: Tensor) -> tuple[float, float]:
    """(fraction of elements whose bf16 values differ, largest difference in bf16 units of the ref)."""
    ref32, got32 = ref.float(), got.to(BF16).float()
    differ = ref32 != got32
    if not differ.any():
        return 0.0, 0.0
    ulp = torch.finfo(BF16).eps * ref32.abs().clamp_min(torch.finfo(BF16).tiny)  # spacing near |ref| (to 2x)
    return differ.float().mean().item(), ((ref32 - got32).abs() / ulp)[differ].max().item()


@pytest.mark.parametrize("name", list(OPS))
def test_outputs_and_gradients_are_the_bf16_kernels(name: str) -> None:
    expected, emulated = _exact_bf16(name), _run(name, "emulated")
    assert emulated[0].dtype == BF16 and all(g.dtype == torch.float32 for g in emulated[1:])
    assert len(expected) == len(emulated)
    for what, ref, got in zip(("output", "grad x", "grad w", "grad b"), expected, emulated):
        fraction, units = _mismatch(ref, got)
        assert fraction <= 2e-3 and units <= 2, f"{name} {what}: {fraction:.2%} of elements differ, by up to {units:.1f} bf16 units"


@pytest.mark.parametrize("name", ["conv2d", "linear"])
def test_unrounded_inputs_would_be_caught(name: str) -> None:
    """The control: fp32 inputs (no rounding before the kernel) move most results off bf16's."""
    expected, unrounded = _exact_bf16(name), _run(name, "unrounded")
    fraction, _ = _mismatch(expected[0], unrounded[0])
    assert fraction > 0.05


@pytest.mark.parametrize("name", list(OPS))
def test_outputs_equal_torchs_own_bf16_autocast(name: str) -> None:
    """Forward, torch's own kernels agree (AVX2's generic ones and oneDNN's alike). Their input
    gradients are another matter on an AVX2 CPU: the generic kernels round partial sums to bf16
    (60% of a conv's input gradient off the exact bf16 value, measured), the emulation does not."""
    native, emulated = _run(name, "native"), _run(name, "emulated")
    assert native[0].dtype == emulated[0].dtype == BF16
    fraction, units = _mismatch(native[0], emulated[0])
    assert fraction <= 2e-3 and units <= 2


def test_only_bf16_autocast_regions_are_rounded() -> None:
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with EmulatedBf16():
        plain = F.linear(x, w)  # no autocast: fp32, untouched
        with torch.autocast("cpu", dtype=BF16):
            inner = F.linear(x, w)
            with torch.autocast("cpu", enabled=False):  # a region kept in fp32 (box arithmetic, RoIAlign)
                kept = F.linear(x, w)
            double = F.linear(x.double(), w.double())  # autocast leaves float64 alone
    assert plain.dtype == kept.dtype == torch.float32 and torch.equal(plain, x @ w.T) and torch.equal(kept, plain)
    assert inner.dtype == BF16 and double.dtype == torch.float64


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_detector_forward_has_torchs_bf16_losses(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole training forward of R-50-FPN: the same losses as torch's own bf16 autocast, to the
    rounding of the sums.

    Both runs train on the proposals of torch's own run: which proposals survive the RPN's top-k and
    NMS cuts turns on the last bits of a score, and one flipped proposal changes the RoI head's
    samples and moves loss_bbox by percents (a CI run saw 4%: the weights came from whatever random
    state earlier tests had left). The RPN's own samples are anchors, drawn the same in both runs."""
    torch.manual_seed(seed)
    model = build_detector(resolve({"precision": "amp"})).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 160, generator=g) * 255, torch.rand(3, 112, 160, generator=g) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 90.0, 100.0], [60.0, 5.0, 150.0, 60.0]]), "labels": torch.tensor([0, 7])},
               {"boxes": torch.tensor([[30.0, 30.0, 120.0, 100.0]]), "labels": torch.tensor([3])}]  # fmt: skip
    pinned: list[torch.Tensor] = []
    rpn_forward = model.rpn_head.forward

    def torchs_proposals(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rois, rpn_losses = rpn_forward(*args, **kwargs)
        if not pinned:
            pinned.append(rois.detach().clone())
        return pinned[0], rpn_losses

    monkeypatch.setattr(model.rpn_head, "forward", torchs_proposals)
    losses = {}
    for emulated in (False, True):
        torch.manual_seed(1)  # the samplers' draws
        with torch.autocast("cpu", dtype=BF16):
            if emulated:
                with EmulatedBf16():
                    losses[emulated] = model(images, targets)
            else:
                losses[emulated] = model(images, targets)
    for key, native in losses[False].items():
        assert losses[True][key].item() == pytest.approx(native.item(), rel=2e-3, abs=1e-4), key
