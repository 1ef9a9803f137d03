from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from detector.bench import measure
from detector.config import ProposalConfig
from detector.recipes import resolve
from detector.train import solver
from tests.resources.fakes_engine import TinyDetector, TinySource

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cpu", "cpu"),
        ("Tesla V100-SXM2-32GB", "V100"),
        ("Tesla V100-PCIE-16GB", "V100"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090"),
        ("NVIDIA RTX A6000", "RTX A6000"),
        ("NVIDIA A10G", "A10G"),
        ("AMD Instinct MI250X", "MI250X"),
    ],
)
def test_device_class(name: str, expected: str) -> None:
    assert measure.device_class(name) == expected


def test_measure_fps_times_images_after_warmup_and_restores_mode() -> None:
    model = TinyDetector()
    calls = []
    forward = model.forward

    def counting(images, targets=None, original_sizes=None):
        calls.append(original_sizes)
        return forward(images, targets, original_sizes)

    model.forward = counting
    result = measure.measure_fps(model, TinySource().eval_batches(), device=CPU, images=4, warmup=2)
    assert len(calls) == 6 and calls[0] == [(16, 16)]  # batch 1, rescaled to the original size
    assert result["images"] == 4 and result["warmup"] == 2 and result["precision"] == "fp32"
    assert result["fps"] > 0 and result["ms_per_img"] == pytest.approx(1000 / result["fps"], rel=1e-3, abs=0.006)  # both rounded
    assert model.training


def test_measure_fps_under_bf16_autocast() -> None:
    amp = solver.resolve_amp("bf16", CPU)
    result = measure.measure_fps(TinyDetector(), TinySource().eval_batches(), device=CPU, images=2, warmup=1, amp=amp)
    assert result["precision"] == "bf16" and result["images"] == 2


def test_measure_fps_with_too_few_images_reports_zero() -> None:
    source = TinySource(n=2)
    result = measure.measure_fps(TinyDetector(), source.eval_batches(), device=CPU, images=5, warmup=5)
    assert result["images"] == 0 and result["fps"] == 0.0 and result["ms_per_img"] is None


def test_peak_memory_on_cpu_is_resident_set_in_gb() -> None:
    gb, kind = measure.peak_memory(CPU)
    assert kind == "cpu_peak_rss" and 0 < gb < 1024 and gb == round(gb, 1)


def test_bench_builds_the_cell_and_times_synthetic_images() -> None:
    cfg = resolve({})
    cfg = replace(cfg, rpn=replace(cfg.rpn, test=ProposalConfig(nms_pre=100, max_per_img=50)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = measure.bench(cfg, device="cpu", images=2, image_size=(64, 96), warmup=1)
    finally:
        torch.set_num_threads(threads)
    assert result["images"] == 2 and result["warmup"] == 1 and result["image_size"] == [64, 96]
    assert result["fps"] > 0 and result["ms_per_img"] > 0
    assert result["device"] == "cpu" and result["device_class"] == "cpu" and result["precision"] == "fp32"
    assert result["mem_kind"] == "cpu_peak_rss" and result["mem_gb"] > 0


def test_bench_rejects_unknown_devices() -> None:
    with pytest.raises(ValueError, match="allowed"):
        measure.bench(resolve({}), device="tpu0", images=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_amp_cell_times_fp16_on_cuda() -> None:
    result = measure.bench(resolve({"precision": "amp"}), device="cuda", images=3, image_size=(800, 1333))
    assert result["precision"] == "fp16" and result["mem_kind"] == "cuda_max_allocated" and result["mem_gb"] > 0
    assert result["device_class"] != "cpu" and result["fps"] > 0
