"""Count the host synchronisations a call would make on CUDA, and its kernel launches, on any device.

On a GPU every operator whose output size depends on the data (`nonzero`, boolean-mask indexing,
`unique`, NMS's kept count) or that hands a value to Python (`.item()`, `.tolist()`, `bool(t)`)
makes the CPU wait for the GPU to drain its queue: the GPU then idles while Python launches the next
kernels. `count_syncs(fn)` runs `fn` under a `TorchDispatchMode` that counts those operators, so the
number can be measured and held in a test on CPU; `torch.cuda.set_sync_debug_mode` counts the real
ones on CUDA (`detector.bench.gpu`). `count_operators(fn)` counts the operators `fn` dispatches,
backward included, and those of them that compute (a GPU kernel launch each, at least): where a
small batch leaves the GPU waiting on the host, that number is what a step costs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that always wait for the device's result: their output's size or value goes to the host.
_ALWAYS = frozenset({
    "aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::_unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::equal", "aten::is_nonzero", "torchvision::nms",
    "aten::bincount",  # CUDA reads the input's min and max back to size its output
})  # fmt: skip
# Indexing operators that sync only when an index is a boolean mask (it is turned into indices).
_MASKED = frozenset({"aten::index.Tensor", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"})


def _has_mask(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


class _SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        name = func.name()
        base = name.split(".")[0]
        if base in _ALWAYS or name in _ALWAYS:
            self.counts[base] += 1
        elif name in _MASKED and _has_mask(args):
            self.counts[f"{name} (boolean mask)"] += 1
        elif base == "aten::repeat_interleave" and "output_size" not in (kwargs or {}) and isinstance(args[0], torch.Tensor) \
                and len(args) == 1:  # repeats tensor without output_size: the total goes to the host
            self.counts[base] += 1
        return func(*args, **(kwargs or {}))


# Operators that compute nothing: views (their schema says they alias), and allocation or relabelling.
_NO_KERNEL = frozenset({"aten::_unsafe_view", "aten::lift_fresh", "aten::empty", "aten::empty_strided", "aten::_reshape_alias"})


class _OperatorCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.operators = 0
        self.kernels = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        self.operators += 1
        if not func.is_view and func.name().split(".")[0] not in _NO_KERNEL:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def count_operators(fn: Callable[[], Any]) -> dict[str, int]:
    """Run `fn` once; `{"operators": every ATen operator dispatched, "kernels": those that compute}`."""
    counter = _OperatorCounter()
    with counter:
        fn()
    return {"operators": counter.operators, "kernels": counter.kernels}


def count_syncs(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run `fn` once; returns (host syncs it would make on CUDA, by operator). Run inference under
    `torch.no_grad()`, not `torch.inference_mode()`: inference mode hides the `nonzero` inside
    composite operators (single-argument `torch.where`, boolean indexing) from the dispatch mode.

    `Tensor.tolist()` reads a CPU tensor without any operator, so it is counted by wrapping the
    method for the call. Not counted: torchvision's `batched_nms` runs one NMS per group on CPU
    above 4,000 boxes (each a sync here) but one for all groups on CUDA up to 25,000 boxes."""
    counter = _SyncCounter()
    tolist, tensor = torch.Tensor.tolist, torch.tensor

    def counted_tolist(self: torch.Tensor) -> Any:
        counter.counts["Tensor.tolist"] += 1
        return tolist(self)

    def counted_tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
        # Python data straight onto the model's device: a blocking host-to-device copy on CUDA.
        if kwargs.get("device") is not None:
            counter.counts["torch.tensor(device=)"] += 1
        return tensor(*args, **kwargs)

    torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign, assignment]
    torch.tensor = counted_tensor  # type: ignore[assignment]
    try:
        with counter:
            fn()
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        torch.tensor = tensor
    return sum(counter.counts.values()), dict(counter.counts.most_common())


__all__ = ["count_operators", "count_syncs"]
