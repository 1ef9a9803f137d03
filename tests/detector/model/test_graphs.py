"""`detector.model.graphs`: when the detector's dense part is captured, replayed, recaptured or run eagerly.

On CPU a recording stand-in takes the place of CUDA's capture (its "graph" runs the function again):
the bookkeeping is what is tested here; that a real graph's replay equals the eager call is the
`-m gpu` test at the end, run on the GPU machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from detector.config import DetectorConfig, ProposalConfig
from detector.model.faster_rcnn import FasterRCNN, build_detector
from detector.model.fold import fold_cache_tensors
from detector.model.graphs import GraphCache, module_state


class _Recorder:
    """A stand-in capture: counts captures and replays; a replay runs the function again."""

    def __init__(self) -> None:
        self.captured: list[tuple[int, ...]] = []
        self.replayed = 0

    def __call__(self, fn: Callable[[Tensor], Any], example: Tensor) -> Callable[[Tensor], Any]:
        self.captured.append(tuple(example.shape))
        fn(example)  # the warm-up a real capture runs (it fills the folding cache)

        def replay(x: Tensor) -> Any:
            self.replayed += 1
            return fn(x)

        return replay


def _cfg() -> DetectorConfig:
    base = DetectorConfig()
    small = ProposalConfig(nms_pre=200, max_per_img=50)
    return dataclasses.replace(base, rpn=dataclasses.replace(base.rpn, train=small, test=small),
                               roi_head=dataclasses.replace(base.roi_head, num_samples=32, score_thr=0.0))  # fmt: skip


def _model(recorder: _Recorder) -> FasterRCNN:
    torch.manual_seed(0)
    model = build_detector(_cfg()).eval()
    model.cuda_graphs = True
    assert model._graphs is not None
    model._graphs._capture = recorder
    return model


def _images(h: int = 96, w: int = 128, n: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(h * w + n)
    return [torch.randint(0, 256, (3, h, w), generator=g).float() for _ in range(n)]


def _assert_same(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_first_call_eager_second_captures_then_replays() -> None:
    rec = _Recorder()
    model = _model(rec)
    images = _images()
    with torch.inference_mode():
        model(images)
        assert rec.captured == [] and rec.replayed == 0
        model(images)
        assert rec.captured == [(1, 3, 96, 128)] and rec.replayed == 1
        model(images)
        assert len(rec.captured) == 1 and rec.replayed == 2


def test_detections_equal_with_and_without_graphs() -> None:
    """The detector's path through `dense` and `head_out` gives what the plain forward gives."""
    rec = _Recorder()
    model = _model(rec)
    images = _images(n=2)
    with torch.inference_mode():
        graphed = [model(images) for _ in range(3)]
        model.cuda_graphs = False
        plain = model(images)
    assert rec.replayed == 2
    for out in graphed:
        _assert_same(out, plain)
    assert sum(len(d["boxes"]) for d in plain) > 0


def test_training_and_gradients_never_use_graphs() -> None:
    rec = _Recorder()
    model = _model(rec)
    images = _images(n=2)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([i])} for i in range(2)]
    model.train()
    for _ in range(2):
        sum(model(images, targets).values()).backward()
        with torch.no_grad():  # training mode under no_grad (a validation loss): still eager
            model(images, targets)
    model.eval()
    for _ in range(2):
        model(images)  # inference with gradients recorded
    assert rec.captured == [] and rec.replayed == 0


@pytest.mark.parametrize("change", ["sgd_step", "load_state_dict", "memory_format", "new_parameter", "running_stat"])
def test_a_change_of_the_weights_drops_every_graph(change: str) -> None:
    rec = _Recorder()
    model = _model(rec)
    images = _images()
    with torch.inference_mode():
        model(images), model(images)
    assert len(rec.captured) == 1
    if change == "sgd_step":
        model.train()
        targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([0])}]
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        sum(model(images, targets).values()).backward()
        sgd.step()
        model.eval()
    elif change == "load_state_dict":
        state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
    elif change == "memory_format":  # new storage for every 4-D weight: the other layout
        nhwc = model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        model.to(memory_format=torch.contiguous_format if nhwc else torch.channels_last)
    elif change == "new_parameter":  # another object in the same place, same values
        fc = model.roi_head.bbox_head.fc_cls
        fc.weight = torch.nn.Parameter(fc.weight.detach().clone())
    else:
        with torch.no_grad():
            model.backbone.bn1.running_var.mul_(2.0)
    replays = rec.replayed
    with torch.inference_mode():
        model(images)
    # Recorded graphs are gone: the call after a change is eager, the next one captures anew.
    assert rec.replayed == replays and len(rec.captured) == 1
    with torch.inference_mode():
        model(images)
    assert len(rec.captured) == 2 and rec.replayed == replays + 1


def test_one_graph_per_signature_and_at_most_max_graphs() -> None:
    rec = _Recorder()
    model = _model(rec)
    assert model._graphs is not None
    model._graphs.max_graphs = 2
    shapes = [(96, 128), (64, 96), (96, 128), (128, 64)]
    with torch.inference_mode():
        for h, w in shapes:
            model(_images(h, w)), model(_images(h, w))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another autocast dtype: its own graph
            model(_images(96, 128)), model(_images(96, 128))
    with torch.no_grad():  # outside inference mode: its own graph
        model(_images(96, 128)), model(_images(96, 128))
    assert rec.captured == [(1, 3, 96, 128), (1, 3, 64, 96), (1, 3, 128, 64), (1, 3, 96, 128), (1, 3, 96, 128)]
    # The third (96, 128) was a replay of the first graph: it was still one of the last two used.
    assert len(model._graphs._graphs) == 2


def test_a_graph_keeps_the_folded_constants_it_reads() -> None:
    """A later call in another mode or a training step makes new folded constants; the memory the
    graph read must stay allocated (and unchanged) for it."""
    rec = _Recorder()
    model = _model(rec)
    images = _images()
    with torch.inference_mode():
        model(images), model(images)
    assert model._graphs is not None
    (_replay, kept), = model._graphs._graphs.values()
    read = {id(t) for t in fold_cache_tensors(model)}
    assert read and read <= {id(t) for t in kept}
    with torch.no_grad():  # outside inference mode: every frozen conv's "weight" slot made anew
        model(images)
    assert not read & {id(t) for t in fold_cache_tensors(model)}
    assert {id(t) for t in kept} >= read


def test_module_state_follows_identity_and_version() -> None:
    model = build_detector(_cfg())
    state = module_state(model)
    assert state is not None and module_state(model) == state
    with torch.no_grad():
        model.roi_head.bbox_head.fc_cls.bias.add_(1.0)
    assert module_state(model) != state
    with torch.inference_mode():
        inference_module = torch.nn.Linear(2, 2)
    assert module_state(inference_module) is None  # inference tensors: no graphs


def test_eager_on_cpu_without_a_stand_in() -> None:
    torch.manual_seed(0)
    model = build_detector(_cfg()).eval()
    model.cuda_graphs = True
    with torch.inference_mode():
        for _ in range(3):
            model(_images())
    assert model._graphs is not None and model._graphs.captures == 0


def test_graph_cache_calls_the_function_when_grad_is_enabled() -> None:
    rec = _Recorder()
    module = torch.nn.Linear(3, 2)
    cache = GraphCache(module, module, capture=rec)
    x = torch.ones(4, 3)
    for _ in range(3):
        cache(x)
    assert rec.captured == []
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(cache(x), module(x))
    assert rec.captured == [(4, 3)] and rec.replayed == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [None, torch.float16])
def test_cuda_graph_replay_equals_the_eager_call(amp: torch.dtype | None) -> None:
    """Real CUDA graphs: detections equal the eager ones, after a capture, on replay, and after an SGD
    step (the graphs recaptured from the new weights)."""
    torch.manual_seed(0)
    model = build_detector(_cfg()).cuda().eval()
    images = [im.cuda() for im in _images(n=1)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]], device="cuda"), "labels": torch.tensor([0], device="cuda")}]
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)

    model.cuda_graphs = True
    cache = model._graphs
    assert cache is not None

    def detect(graphs: bool) -> list[dict[str, Tensor]]:
        model.__dict__["_graphs"] = cache if graphs else None
        with torch.inference_mode(), torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
            return [model(images) for _ in range(3)][-1]

    for step in range(2):
        eager = detect(False)
        graphed = detect(True)
        assert cache.captures == step + 1  # captured anew after the SGD step
        assert sum(len(d["boxes"]) for d in eager) > 0
        for a, b in zip(graphed, eager, strict=True):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-3)
        model.train()
        sgd.zero_grad()
        sum(model(images, targets).values()).backward()
        sgd.step()
        model.eval()
