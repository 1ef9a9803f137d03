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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

T = TypeVar("T")
_STORE = "_fold_cache"  # a plain attribute of the conv / BN module: not a buffer, not in state_dict


def _identity(*tensors: Tensor | None) -> tuple[Any, ...] | None:
    """What a value made from `tensors` depends on; None when it cannot be tracked (an inference
    tensor has no version counter)."""
    out: list[Any] = []
    for t in tensors:
        if t is None:
            out.append(None)
        elif t.is_inference():
            return None
        else:
            out.append((id(t), t.data_ptr(), t.dtype, t.device, t._version))
    return tuple(out)


def _cached(owner: nn.Module, slot: str, key: tuple[Any, ...] | None, make: Callable[[], T]) -> T:
    """`make()` under no_grad, kept on `owner` under `slot` and returned again while `key` holds."""
    store: dict[str, tuple[Any, Any]] = owner.__dict__.setdefault(_STORE, {})
    hit = store.get(slot)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]  # type: ignore[no-any-return]
    with torch.no_grad():
        value = make()
    if key is None:
        store.pop(slot, None)
    else:
        store[slot] = (key, value)
    return value


def _drop(owner: nn.Module, slot: str) -> None:
    """Forget `slot`: a conv that trains now must not keep the folded weight an inference left."""
    owner.__dict__.get(_STORE, {}).pop(slot, None)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _key(context: tuple[Any, ...] | None, *tensors: Tensor | None) -> tuple[Any, ...] | None:
    """A cache key: `context` (the key of what the value is made from as well) and `tensors`'
    identities; None, so nothing is cached, when either cannot be tracked."""
    ident = _identity(*tensors)
    return None if context is None or ident is None else (context, ident)


def folded_conv_params(conv: nn.Conv2d, bn: nn.BatchNorm2d, device_type: str) -> tuple[Tensor, Tensor]:
    """The weight and bias of `conv` with `bn` (frozen statistics) folded in, for a call on `device_type`."""
    var, mean = bn.running_var, bn.running_mean
    assert var is not None and mean is not None
    stats_key = _key((torch.is_inference_mode_enabled(), bn.eps), var, mean)
    inv_std, neg_mean = _cached(bn, "stats", stats_key, lambda: (torch.rsqrt(var + bn.eps), -mean))

    def affine() -> tuple[Tensor, Tensor]:
        scale = inv_std * bn.weight if bn.weight is not None else inv_std
        bias = neg_mean * scale
        if bn.bias is not None:
            bias = bias + bn.bias
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        return scale, bias

    if _needs_grad(bn.weight, bn.bias, conv.bias):  # a trained affine: folded anew at every call
        _drop(conv, "weight")
        scale, bias = affine()
        return conv.weight * scale.reshape(-1, 1, 1, 1), bias
    affine_key = _key(stats_key, bn.weight, bn.bias, conv.bias)
    scale, bias = _cached(bn, "affine", affine_key, affine)
    if _needs_grad(conv.weight):
        _drop(conv, "weight")
        return conv.weight * scale.reshape(-1, 1, 1, 1), bias
    amp = _autocast_dtype(device_type)

    def weight() -> tuple[Tensor, Tensor]:
        w = conv.weight * scale.reshape(-1, 1, 1, 1)
        # Autocast would cast both at every call (any float but float64); the same cast, once.
        return (w.to(amp), bias.to(amp)) if amp is not None and w.dtype != torch.float64 else (w, bias)

    return _cached(conv, "weight", _key((affine_key, amp) if affine_key else None, conv.weight), weight)


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, *, fold: bool = True) -> Tensor:
    """`bn(conv(x))`, computed as one convolution when the BN uses its running statistics (see the
    module's docstring). A BN in training mode (batch statistics) is applied as is."""
    if not fold or bn.training or bn.running_var is None or bn.running_mean is None:
        return bn(conv(x))
    weight, bias = folded_conv_params(conv, bn, x.device.type)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def clear_fold_cache_(module: nn.Module) -> None:
    """Forget every folded constant below `module` (after writes the version counter cannot see)."""
    for m in module.modules():
        m.__dict__.pop(_STORE, None)


__all__ = ["clear_fold_cache_", "conv_bn", "folded_conv_params"]
