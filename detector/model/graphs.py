"""CUDA graphs for the static-shape part of inference: replay the backbone, neck and RPN convs as one launch.

Why: batch-1 inference on a GPU is bound by the host, not the GPU (`../shared/GPU.md`: 16.5 ms wall
for ~9.4 ms of kernels, the rest kernel launches and host syncs). Everything from the padded batch to
the RPN's logits and deltas has shapes fixed by the batch's shape: ~150 of the ~380 kernels of a
batch-1 inference (`syncs.count_operators`), launched one by one from Python. A CUDA graph records
them once per input signature and replays them with one launch (PyTorch's "whole network capture",
what MLPerf's detection entries do for the backbone and RPN head).

What makes a replay equal to calling the function (`tests/detector/model/test_graphs.py`; the CUDA
equality test is `-m gpu`):

- a graph is made per input signature (shape, strides, dtype, device), autocast dtype and inference
  mode, and only where no gradient is recorded (inference): training runs eagerly;
- a graph reads the memory its kernels read when it was captured: the module's parameters and
  buffers and the folded-BN constants cached from them (`fold.py`). So every graph is dropped when
  any parameter or buffer is another tensor or was written in place since the capture (an optimiser
  step, `load_state_dict`, `.to()`): the same identity-and-version rule as the folding cache; and a
  graph holds the folded constants it read (a later call under another autocast dtype or a training
  step makes new ones and would otherwise free the memory the graph reads);
- autocast's own cast cache is off during warm-up and capture (a cast cached by the caller's
  context would be freed when that context exits, while the graph still read it);
- the outputs are the graph's own tensors, overwritten by the next replay of the same graph: they
  are for the rest of one forward, not to be kept (the detector's outputs are new tensors).

A signature is captured at its second call (the first runs eagerly), and at most `max_graphs` graphs
are kept: evaluation over images of many shapes would otherwise pay a capture per shape and hold the
activations' memory of each. Off by default (`FasterRCNN.cuda_graphs`) until measured on a GPU (`python -m detector.bench.gpu
--ablation`, variant `+cuda_graphs`); on CPU the function is called as it is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from detector.model.fold import fold_cache_tensors

Replay = Callable[[Tensor], Any]
# `capture(fn, example) -> replay`: makes the graph of `fn` for `example`'s signature. Injected so that
# the bookkeeping below is tested on CPU with a recording stand-in; CUDA's is `capture_cuda_graph`.
Capture = Callable[[Callable[[Tensor], Any], Tensor], Replay]


def capture_cuda_graph(fn: Callable[[Tensor], Any], example: Tensor, *, warmup: int = 2,
                       pool: Any = None) -> Replay:  # fmt: skip
    """Record `fn(example)` as a CUDA graph; `replay(x)` copies `x` into the graph's input, replays,
    and returns the graph's outputs (overwritten by the next replay).

    Warm-up runs on a side stream first (PyTorch's recipe: cuDNN picks its algorithms and lazy state,
    such as the folded-BN cache, is made outside the graph's memory pool)."""
    device = example.device
    static_in = torch.empty_like(example)
    static_in.copy_(example)
    amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    # The caller's autocast state kept, its cast cache off (see the module's docstring).
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None, cache_enabled=False):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data loader thread touching CUDA meanwhile is not an error of this capture.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            static_out = fn(static_in)

    def replay(x: Tensor) -> Any:
        static_in.copy_(x)
        graph.replay()
        return static_out

    return replay


def module_state(module: nn.Module) -> list[tuple[int, int, int]] | None:
    """What a graph of `module` depends on: identity, storage and version of each parameter and buffer;
    None when a version cannot be read (inference tensors), and then no graph is used.

    It runs at every call: a walk of `_modules` with the tensors read from `_parameters` / `_buffers`
    costs a third of `module.parameters()` + `module.buffers()` (~120 us against ~460 us for R-50-FPN's
    355 tensors on the 2-core CI machine)."""
    out = []
    stack = [module]
    try:
        while stack:
            m = stack.pop()
            for tensors in (m._parameters, m._buffers):
                for t in tensors.values():
                    if t is not None:
                        out.append((id(t), t.data_ptr(), t._version))
            stack.extend(c for c in m._modules.values() if c is not None)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
    return out


class GraphCache:
    """`cache(x)` returns `fn(x)`, a static-shape computation of `module`'s, replayed from a CUDA graph
    where that is safe (see the module's docstring); eager otherwise."""

    def __init__(self, fn: Callable[[Tensor], Any], module: nn.Module, *, max_graphs: int = 4,
                 capture: Capture | None = None) -> None:  # fmt: skip
        self.fn = fn
        self.module = module
        self.max_graphs = max_graphs
        self._capture = capture
        self._graphs: OrderedDict[tuple[Any, ...], tuple[Replay, list[Tensor]]] = OrderedDict()
        self._seen: dict[tuple[Any, ...], int] = {}
        self._state: list[tuple[int, int, int]] | None = None
        self._pool: Any = None
        self.captures = 0  # graphs made so far (tests, benchmark logs)

    def clear(self) -> None:
        """Drop every graph (and the memory it holds)."""
        self._graphs.clear()
        self._seen.clear()
        self._state = None
        self._pool = None

    def __call__(self, x: Tensor) -> Any:
        if torch.is_grad_enabled() or (self._capture is None and not x.is_cuda):
            return self.fn(x)
        state = module_state(self.module)
        if state is None:
            return self.fn(x)
        if state != self._state:  # weights changed since the graphs were made: they would read stale memory
            self.clear()
            self._state = state
        device_type = x.device.type
        amp = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, amp, torch.is_inference_mode_enabled())
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            return entry[0](x)
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        if seen < 2:
            if len(self._seen) > 64:  # many shapes seen once each: forget them
                self._seen = {key: seen}
            return self.fn(x)
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        replay = self._make(x)
        self.captures += 1
        self._graphs[key] = (replay, fold_cache_tensors(self.module))
        return replay(x)

    def _make(self, x: Tensor) -> Replay:
        if self._capture is not None:
            return self._capture(self.fn, x)
        if self._pool is None:  # one memory pool for all graphs: they never run at the same time
            self._pool = torch.cuda.graph_pool_handle()
        return capture_cuda_graph(self.fn, x, pool=self._pool)


__all__ = ["Capture", "GraphCache", "capture_cuda_graph", "module_state"]
