"""`detector.model.fold`: the folded conv + BN and its cache of constants.

What is cached must be bit for bit what folding again computes, be forgotten when a tensor it was
made from changes, and never hand a gradient-free constant to a conv that trains.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from detector.model.fold import clear_fold_cache_, conv_bn


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        self.names[func.name()] += 1
        return func(*args, **(kwargs or {}))


def _pair(seed: int = 0, *, conv_bias: bool = False) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=conv_bias)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(6, generator=g))
        bn.running_mean.copy_(torch.randn(6, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(6, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(6, generator=g) * 0.1)
    return conv, bn


def _fresh(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    clear_fold_cache_(conv)
    clear_fold_cache_(bn)
    return conv_bn(conv, bn, x)


def _frozen(*modules: nn.Module) -> None:
    for m in modules:
        m.requires_grad_(False)


X = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("conv_bias", [False, True])
def test_cached_fold_is_bit_identical_to_folding_again(conv_bias: bool) -> None:
    conv, bn = _pair(conv_bias=conv_bias)
    _frozen(conv, bn)
    fresh = _fresh(conv, bn, X)
    first, second = conv_bn(conv, bn, X), conv_bn(conv, bn, X)
    assert torch.equal(first, fresh) and torch.equal(second, fresh)
    torch.testing.assert_close(second, bn(conv(X)), rtol=1e-5, atol=1e-5)  # the plain path, to rounding


def test_a_frozen_conv_runs_one_operator_once_folded() -> None:
    """Inference or frozen stages: after the first call the fold costs nothing but the conv."""
    conv, bn = _pair()
    _frozen(conv, bn)
    conv_bn(conv, bn, X)
    ops = _Ops()
    with ops:
        conv_bn(conv, bn, X)
    assert ops.names == Counter({"aten::convolution": 1}), ops.names
    with torch.no_grad():  # trainable parameters, no gradient asked: the same
        conv2, bn2 = _pair(1)
        conv_bn(conv2, bn2, X)
        with _Ops() as ops2:
            conv_bn(conv2, bn2, X)
    assert ops2.names == Counter({"aten::convolution": 1}), ops2.names


def test_a_trained_conv_folds_anew_but_not_its_frozen_statistics() -> None:
    conv, bn = _pair()
    conv_bn(conv, bn, X)
    with _Ops() as ops:
        y = conv_bn(conv, bn, X)
    assert ops.names["aten::rsqrt"] == 0 and ops.names["aten::neg"] == 0, ops.names
    assert y.requires_grad
    y.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None


def test_frozen_mode_folds_only_where_no_gradient_flows() -> None:
    """"frozen" (what "auto" does off CPU): a pair a gradient flows through runs the plain conv then
    BN, bit for bit, and drops what an inference folded for it; a frozen pair, or any pair without
    grad mode, is folded as in "all"."""
    conv, bn = _pair()
    with torch.no_grad():
        conv_bn(conv, bn, X, fold="frozen")  # an evaluation between training steps
    assert "weight" in conv.__dict__["_fold_cache"]
    with _Ops() as ops:
        y = conv_bn(conv, bn, X, fold="frozen")
    assert ops.names["aten::convolution"] == 1 and sum(n.endswith("batch_norm") for n in ops.names) == 1, ops.names
    assert torch.equal(y, bn(conv(X))) and "weight" not in conv.__dict__["_fold_cache"]
    y.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None
    frozen_conv, frozen_bn = _pair(1)
    _frozen(frozen_conv, frozen_bn)
    conv_bn(frozen_conv, frozen_bn, X, fold="frozen")
    with _Ops() as ops:
        conv_bn(frozen_conv, frozen_bn, X, fold="frozen")
    assert ops.names == Counter({"aten::convolution": 1}), ops.names


def test_auto_mode_folds_every_pair_on_cpu_and_only_frozen_ones_elsewhere() -> None:
    conv, bn = _pair()
    with _Ops() as ops:
        y = conv_bn(conv, bn, X, fold="auto")
    assert ops.names["aten::convolution"] == 1 and not any("batch_norm" in n for n in ops.names), ops.names
    assert torch.equal(y, conv_bn(conv, bn, X, fold="all"))
    # Another device (meta: shapes only, as a GPU would dispatch): a trained pair runs conv then BN.
    conv.to("meta"), bn.to("meta")
    assert conv_bn(conv, bn, X.to("meta"), fold="auto").grad_fn.name() == "NativeBatchNormBackward0"


def test_a_training_step_launches_fewer_kernels_folding_only_frozen_pairs() -> None:
    """What "auto" does on a GPU, counted on CPU: folding where a gradient flows costs more
    operators than BN's forward and backward it replaces (R-50-FPN at 800x1333: 1,521 -> 1,185)."""
    from detector.bench.syncs import count_operators
    from detector.config import DetectorConfig
    from detector.model.backbones import set_fold_bn_
    from detector.model.faster_rcnn import build_detector

    torch.manual_seed(0)
    model = build_detector(DetectorConfig()).train()
    images = [torch.rand(3, 96, 128) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])}]
    kernels = {}
    for mode in ("all", "frozen", "off"):
        set_fold_bn_(model, mode)
        sum(model(images, targets).values()).backward()  # the constants that can be cached, made
        kernels[mode] = count_operators(lambda: sum(model(images, targets).values()).backward())["kernels"]
    trained_pairs = sum(1 for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad)
    assert kernels["frozen"] <= kernels["all"] - 5 * trained_pairs, (kernels, trained_pairs)
    assert kernels["frozen"] < kernels["off"], kernels  # the frozen stem and res2 still folded


def test_an_unknown_fold_mode_is_refused() -> None:
    from detector.config import DetectorConfig
    from detector.model.backbones import build_backbone, set_fold_bn_

    with pytest.raises(ValueError, match="allowed: off, frozen, auto, all"):
        set_fold_bn_(build_backbone(DetectorConfig().backbone), True)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", ["optimizer_step", "running_var", "load_state_dict", "double", "eps"])
def test_the_cache_follows_every_change_of_what_it_was_made_from(change: str) -> None:
    conv, bn = _pair()
    _frozen(conv, bn)
    before = conv_bn(conv, bn, X)
    x = X
    if change == "optimizer_step":
        conv.weight.requires_grad_(True)
        conv.weight.grad = torch.ones_like(conv.weight)
        torch.optim.SGD([conv.weight], lr=0.1).step()
        conv.weight.requires_grad_(False)
    elif change == "running_var":
        bn.running_var.mul_(2.0)
    elif change == "load_state_dict":
        other_conv, other_bn = _pair(seed=5)
        conv.load_state_dict(other_conv.state_dict())
        bn.load_state_dict(other_bn.state_dict())
    elif change == "double":
        conv.double()
        bn.double()
        x = X.double()
    else:
        bn.eps = 0.5
    after = conv_bn(conv, bn, x)
    assert not torch.allclose(after.float(), before)
    assert torch.equal(after, _fresh(conv, bn, x))
    assert after.dtype == x.dtype


def test_constants_from_inference_mode_never_reach_a_training_step() -> None:
    """An evaluation under inference_mode before a training step: the step trains as if the
    evaluation had not happened (an inference tensor saved for backward would raise)."""

    def setup() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        frozen = nn.Sequential(*_pair(2))
        _frozen(frozen)
        return frozen, nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)).eval()

    def step(frozen: nn.Module, model: nn.Module) -> list[torch.Tensor]:
        h = conv_bn(frozen[0], frozen[1], X)
        conv_bn(model[0], model[1], h).square().sum().backward()
        return [p.grad for p in model.parameters() if p.grad is not None]

    reference = step(*setup())
    frozen, model = setup()
    with torch.inference_mode():
        conv_bn(model[0], model[1], conv_bn(frozen[0], frozen[1], X))
    grads = step(frozen, model)
    assert len(grads) == 3 and all(torch.equal(a, b) for a, b in zip(grads, reference, strict=True))
    assert "weight" not in model[0].__dict__.get("_fold_cache", {})  # inference's folded weight dropped


def test_autocast_gets_the_cast_it_would_make_once() -> None:
    conv, bn = _pair()
    _frozen(conv, bn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = _fresh(conv, bn, X)
        cached = conv_bn(conv, bn, X)
        with _Ops() as ops:
            conv_bn(conv, bn, X)
    assert cached.dtype == torch.bfloat16 and torch.equal(cached, fresh)
    assert ops.names["aten::_to_copy"] == 1, ops.names  # the input's cast only
    assert conv_bn(conv, bn, X).dtype == torch.float32  # autocast off: the fp32 weight again


def test_inference_tensors_are_folded_every_time() -> None:
    """Parameters made under inference_mode have no version counter: nothing is cached for them."""
    with torch.inference_mode():
        conv, bn = _pair()
        y = conv_bn(conv, bn, X)
        bn.running_var.mul_(2.0)
        z = conv_bn(conv, bn, X)
    assert not torch.equal(y, z)
    assert not conv.__dict__.get("_fold_cache")


def test_training_with_evaluations_between_steps_equals_folding_afresh() -> None:
    """The harness's pattern: SGD steps with evaluations (inference_mode) between them. Each
    evaluation must see the weights the last step made; the run equals, bit for bit, the same run
    with every folded constant forgotten before each call."""
    import dataclasses

    from detector.config import DetectorConfig, ProposalConfig
    from detector.model.faster_rcnn import build_detector

    base = DetectorConfig()
    cfg = dataclasses.replace(
        base, rpn=dataclasses.replace(base.rpn, train=ProposalConfig(nms_pre=200, max_per_img=50),
                                      test=ProposalConfig(nms_pre=200, max_per_img=50)),
        roi_head=dataclasses.replace(base.roi_head, num_samples=32),
    )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, 96, 128), generator=g).float() for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([i])} for i in range(2)]

    def run(forget: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_detector(cfg)
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        seen = []
        for _ in range(2):
            model.train()
            if forget:
                clear_fold_cache_(model)
            sgd.zero_grad()
            sum(model(images, targets).values()).backward()
            sgd.step()
            model.eval()
            if forget:
                clear_fold_cache_(model)
            with torch.inference_mode():
                seen.append(model.neck(model.backbone(model.preprocess(images)[0]))[0].clone())
        return seen

    cached, afresh = run(forget=False), run(forget=True)
    assert not torch.equal(cached[0], cached[1])  # the step changed the trained stages
    assert all(torch.equal(a, b) for a, b in zip(cached, afresh, strict=True))
