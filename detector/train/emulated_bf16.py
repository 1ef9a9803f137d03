"""bf16 autocast on a CPU without native bf16: the same numbers at fp32 speed.

CPU autocast runs convolutions and matrix products in bf16 (autocast's lower-precision ops). Where
oneDNN has no bf16 kernels (no AVX-512 BF16 or AMX: an AVX2-only CPU) torch falls back to generic
code, `_slow_conv2d` and a scalar gemm: a smoke-size R-50-FPN training step took 18.4 s against 1.2 s
in fp32 (AMD EPYC Milan, one thread), and the smoke matrix's AMP cell 236 s of its 1,487 cell-seconds.

What a bf16 kernel computes is: the inputs rounded to bf16, their products summed in fp32, the result
rounded to bf16 once. A product of two bf16 numbers (8 significant bits each) is exact in fp32 (24),
so an fp32 kernel given the bf16-rounded inputs sums the same products; rounding its result to bf16
gives what the bf16 kernel gives, up to the order of summation, which differs between any two
kernels (`tests/detector/train/test_emulated_bf16.py` measures it: the same bf16 values but for a
handful of one-unit differences). Autograd sees the casts, so gradients are rounded to bf16 where
the bf16 kernels' are: the incoming gradient is bf16, the input and weight gradients come back
through the casts' backward as bf16.

`EmulatedBf16` does that for the lower-precision ops of CPU autocast that matter here (convolutions,
linear layers, matrix products), and only while CPU autocast to bf16 is on: a region that turns
autocast off (box arithmetic, RoIAlign in fp32) keeps fp32. Every other op runs as autocast makes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

# The lower-precision ops of CPU autocast (aten/src/ATen/autocast_mode.cpp, `AutocastCPU`) that a
# detector calls, as functions and as Tensor methods. The others on that list (RNN layers, attention,
# prelu, linalg_vecdot) keep torch's own bf16 kernels.
_ROUNDED_OPS = frozenset({
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
    F.linear, torch.mm, torch.bmm, torch.matmul, torch.addmm, torch.baddbmm, torch.addbmm,
    Tensor.mm, Tensor.bmm, Tensor.matmul, Tensor.__matmul__, Tensor.addmm, Tensor.baddbmm, Tensor.addbmm,
})  # fmt: skip
_CAST = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (not float64)


def _rounded(value: Any) -> Any:
    """A floating CPU tensor as autocast hands it to a bf16 kernel, carried in fp32 (exact)."""
    if isinstance(value, Tensor) and value.dtype in _CAST and value.device.type == "cpu":
        return value.to(torch.bfloat16).to(torch.float32)
    return value


class EmulatedBf16(TorchFunctionMode):
    """While on (a `with` block inside `torch.autocast("cpu", dtype=torch.bfloat16)`), autocast's
    convolutions and matrix products run as fp32 kernels on bf16-rounded inputs, their results
    rounded to bf16: bf16 autocast's numbers, fp32's speed."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in _ROUNDED_OPS or not _bf16_autocast_on():
            return func(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        if any(t.device.type != "cpu" or t.dtype not in _CAST for t in tensors):
            return func(*args, **kwargs)  # autocast would not cast these either (float64, other devices)
        with torch.autocast("cpu", enabled=False):
            out = func(*(_rounded(a) for a in args), **{k: _rounded(v) for k, v in kwargs.items()})
        return out.to(torch.bfloat16)


def _bf16_autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
