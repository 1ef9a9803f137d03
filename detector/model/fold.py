"""Frozen-statistics BatchNorm folded into the convolution before it, its constant parts made once.

Every recipe here freezes the BN statistics (mmdet `norm_eval=True`), so `bn(conv(x))` is the
per-channel affine `conv(x) * s + (beta - mean * s)` with `s = gamma / sqrt(var + eps)`, and it folds
into the conv: `conv(x, W * s, beta - mean * s)`. Same function of x, W, gamma and beta (autograd
reaches gamma and beta through the folded weight and bias), up to float rounding; one pass over the
activation less, and in training no BN input kept for the backward.

Why the constants are cached: folding costs 7 small operators per conv (53 convs in R-50), each a
kernel launch on a GPU, where batch-1 inference and 2-image training steps are bound by launches,
not arithmetic (`../shared/GPU.md`'s profile). What cannot change from one call to the next is made
once: `1 / sqrt(var + eps)` and `-mean` always (frozen buffers); and where no gradient has to flow
(inference, the frozen stem and res2 of `frozen_stages=1`, caffe's frozen affine) the folded scale
and bias, and the folded weight itself, cast to autocast's dtype under autocast as `F.conv2d` would
cast it. Inference then runs one operator per conv, not eight.

A cached value is reused only while every tensor it was made from is the same object, storage,
dtype and version (PyTorch bumps a tensor's version at each in-place write: optimiser steps,
`load_state_dict`; `.to()` makes new storage), under the same inference mode and autocast dtype:
the cache returns bit for bit what folding again computes (`tests/detector/model/test_fold.py`).
A write through `.data` bypasses the version counter (PyTorch's rule for `.data`): call
`clear_fold_cache_(model)` after one.

Where a gradient flows into the pair (training's res3-res5 with trainable weights and BN affine),
folding costs more operators than it saves: the fold itself in the forward (scale, bias, weight
times scale) and their backward, ~8 small operators a conv, against BN's one in each direction.
On CPU that is cheaper than BN's passes over the activation (a 2-image training step at 800x1333:
14.6 s folded, 14.9 s not, 2 cores); on a GPU, where a 2-image step is bound by launches
(`../shared/GPU.md`), it is a fifth of a step's kernels (800x1333, 2 images: 1,521 folding every
pair, 1,185 folding only where no gradient flows; under AMP 1,772 / 1,352; torchvision's: 1,433). Hence the modes (`FoldMode`): "all" folds every pair, "frozen"
only those no gradient flows through, "auto" (the detector's) is "all" on CPU and "frozen" on other
devices, "off" never folds (the plain path, which parity checks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_STORE = "_fold_cache"  # a plain attribute of the conv: not a buffer, not in state_dict
FoldMode = Literal["off", "frozen", "auto", "all"]
FOLD_MODES: tuple[FoldMode, ...] = ("off", "frozen", "auto", "all")


def _identity(*tensors: Tensor | None) -> tuple[Any, ...] | None:
    """What a value made from `tensors` depends on: each one's object, storage, dtype and version;
    None when that cannot be tracked (an inference tensor has no version counter)."""
    out: list[Any] = []
    try:
        for t in tensors:
            out.append(None if t is None else (id(t), t.data_ptr(), t.dtype, t._version))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
    return tuple(out)


def _trains(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def folded_conv_params(conv: nn.Conv2d, bn: nn.BatchNorm2d, device_type: str) -> tuple[Tensor, Tensor]:
    """The weight and bias of `conv` with `bn` (frozen statistics) folded in, for a call on `device_type`.

    Three slots in `conv`'s cache: "stats" (`1/sqrt(var + eps)`, `-mean`), "affine" (scale and
    bias) where the affine needs no gradient, "weight" (both folded, autocast's cast applied) where
    nothing does. It runs in every conv of every call: the module's tensors are read from
    `_parameters` / `_buffers` once (`nn.Module.__getattr__` costs microseconds a lookup) and a hit
    of the "weight" slot reads nothing else.
    """
    params, buffers = bn._parameters, bn._buffers
    var, mean = buffers["running_var"], buffers["running_mean"]
    gamma, beta = params.get("weight"), params.get("bias")
    weight, conv_bias = conv._parameters["weight"], conv._parameters.get("bias")
    assert var is not None and mean is not None and weight is not None
    store: dict[str, tuple[Any, Any]] = conv.__dict__.setdefault(_STORE, {})
    grad = torch.is_grad_enabled()
    affine_trains = grad and _trains(gamma, beta, conv_bias)
    weight_trains = grad and weight.requires_grad
    mode = torch.is_inference_mode_enabled()
    amp = _autocast_dtype(device_type)
    key: tuple[Any, ...] | None = None  # of the "weight" slot
    if not (affine_trains or weight_trains):
        ident = _identity(var, mean, gamma, beta, conv_bias, weight)
        key = None if ident is None else (mode, amp, bn.eps, ident)
        hit = store.get("weight")
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]  # type: ignore[no-any-return]
    else:
        store.pop("weight", None)  # a conv that trains now: drop what an inference left

    def cached(slot: str, key: tuple[Any, ...] | None, make: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        hit = store.get(slot)
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]  # type: ignore[no-any-return]
        with torch.no_grad():
            value = make()
        if key is not None:
            store[slot] = (key, value)
        return value

    stats_ident = _identity(var, mean)
    stats_key = None if stats_ident is None else (mode, bn.eps, stats_ident)
    inv_std, neg_mean = cached("stats", stats_key, lambda: (torch.rsqrt(var + bn.eps), -mean))

    def affine() -> tuple[Tensor, Tensor]:
        scale = inv_std * gamma if gamma is not None else inv_std
        bias = neg_mean * scale
        if beta is not None:
            bias = bias + beta
        if conv_bias is not None:
            bias = bias + conv_bias * scale
        return scale, bias

    if affine_trains:  # a trained affine: folded anew at every call
        scale, bias = affine()
        return weight * scale.reshape(-1, 1, 1, 1), bias
    affine_ident = _identity(gamma, beta, conv_bias)
    affine_key = None if stats_key is None or affine_ident is None else (stats_key, affine_ident)
    scale, bias = cached("affine", affine_key, affine)
    if weight_trains:
        return weight * scale.reshape(-1, 1, 1, 1), bias

    def folded() -> tuple[Tensor, Tensor]:
        w = weight * scale.reshape(-1, 1, 1, 1)
        # Autocast would cast both at every call (any float but float64); the same cast, once.
        return (w.to(amp), bias.to(amp)) if amp is not None and w.dtype != torch.float64 else (w, bias)

    return cached("weight", key, folded)


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, *, fold: FoldMode = "all") -> Tensor:
    """`bn(conv(x))`, computed as one convolution when the BN uses its running statistics and `fold`
    says so (see the module's docstring). A BN in training mode (batch statistics) is applied as is."""
    # `_buffers` read directly: `bn.running_var` goes through nn.Module.__getattr__ (~2.5 us each).
    buffers = bn._buffers
    if fold == "off" or bn.training or buffers.get("running_var") is None or buffers.get("running_mean") is None:
        return bn(conv(x))
    if (fold == "frozen" or (fold == "auto" and x.device.type != "cpu")) and torch.is_grad_enabled() and _pair_trains(conv, bn):
        conv.__dict__.get(_STORE, {}).pop("weight", None)  # what an inference folded: not needed while it trains
        return bn(conv(x))
    weight, bias = folded_conv_params(conv, bn, x.device.type)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _pair_trains(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    return _trains(conv._parameters["weight"], conv._parameters.get("bias"), bn._parameters.get("weight"), bn._parameters.get("bias"))


def fold_cache_tensors(module: nn.Module) -> list[Tensor]:
    """Every tensor the folding cache holds below `module` (a CUDA graph that reads them keeps them
    alive: a cache slot made anew would free the memory the graph reads)."""
    out: list[Tensor] = []
    for m in module.modules():
        for _key, value in m.__dict__.get(_STORE, {}).values():
            out.extend(value)
    return out


def clear_fold_cache_(module: nn.Module) -> None:
    """Forget every folded constant below `module` (after writes the version counter cannot see)."""
    for m in module.modules():
        m.__dict__.pop(_STORE, None)


__all__ = ["FOLD_MODES", "FoldMode", "clear_fold_cache_", "conv_bn", "fold_cache_tensors", "folded_conv_params"]
