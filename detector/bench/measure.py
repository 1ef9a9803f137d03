"""Inference speed (fps) and training memory, with the model zoo's semantics (reference section 2).

fps (reference 2.2, DESIGN "What the numbers mean"): batch 1, `warmup` images untimed, then the mean
over N images of the model call between two device synchronisations. The timed region holds the
host -> device transfer, the forward pass, post-processing (NMS, rescaling to the original size) and
the copy of the detections back to the host, as mmdet's benchmark did; data loading and the CPU
pipeline (decode, resize) are outside it. The amp cell is timed under fp16 autocast on CUDA.

Memory (reference 2.1, Q8): `torch.cuda.max_memory_allocated`, never reset, MAX over ranks, MB by
integer division, then / 1024 with one decimal ("GB", really GiB). On CPU: the peak resident set
size of the process (`getrusage`), labelled `cpu_peak_rss`.
"""

from __future__ import annotations

import contextlib
import re
import resource
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from detector.config import DetectorConfig
from detector.train.engine import Batch, all_reduce, unwrap
from detector.train.evaluate import original_size
from detector.train.solver import Amp, resolve_amp

# Marketing words that precede the GPU family in `torch.cuda.get_device_name`.
_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE", "QUADRO", "AMD", "INSTINCT", "RADEON", "PRO"}


def device_name(device: torch.device) -> str:
    """"cpu", or the CUDA device's name (e.g. "NVIDIA H200")."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_class(name: str) -> str:
    """A short family name to decide whether two fps values are comparable.

    "Tesla V100-SXM2-32GB" -> "V100", "NVIDIA A100-SXM4-80GB" -> "A100", "NVIDIA H100 80GB HBM3"
    -> "H100", "NVIDIA GeForce RTX 3090" -> "RTX 3090", "NVIDIA RTX A6000" -> "RTX A6000", "cpu" -> "cpu".
    """
    if name.strip().lower() == "cpu":
        return "cpu"
    words = [w for w in re.split(r"[\s\-_]+", name.upper()) if w and w not in _VENDOR_WORDS]
    if not words:
        return name.strip() or "unknown"
    if words[0] in ("RTX", "GTX", "TITAN") and len(words) > 1:
        return f"{words[0]} {words[1]}"  # "RTX 3090", "RTX A6000": the first word alone says little
    return words[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gb_from_mb(mb: int) -> float:
    return round(mb / 1024, 1)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GB with one decimal, mem_kind) of this process, MAX over ranks when distributed."""
    if device.type == "cuda":
        mb, kind = torch.cuda.max_memory_allocated(device) // 2**20, "cuda_max_allocated"
    else:
        mb, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "cpu_peak_rss"  # KiB on Linux
    reduce_device = device if device.type == "cuda" else torch.device("cpu")
    mb = int(all_reduce(torch.tensor([float(mb)], device=reduce_device), op="max").item())
    return _gb_from_mb(mb), kind


@torch.no_grad()
def measure_fps(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    device: torch.device,
    images: int,
    warmup: int = 5,
    amp: Amp | None = None,
) -> dict[str, Any]:
    """Time `images` single-image model calls after `warmup` untimed ones.

    Args:
        loader: batches of one image each (extra images in a batch are ignored).
        amp: autocast to time under (None: fp32).

    Returns:
        {"fps", "ms_per_img", "images" (timed), "warmup", "precision"}; fps is 0.0 if no image
        was timed (a dataset smaller than `warmup`).
    """
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    timed, total = 0, 0.0
    seen = 0
    for batch_images, _targets, metas in loader:
        if timed >= images:
            break
        image, size = batch_images[0], original_size(metas[0])
        _sync(device)
        t0 = time.perf_counter()
        with amp.autocast() if amp is not None else contextlib.nullcontext():
            dets = bare([image.to(device, non_blocking=True)], original_sizes=[size])
        dets = [{k: v.cpu() for k, v in d.items()} for d in dets]
        _sync(device)
        dt = time.perf_counter() - t0
        seen += 1
        if seen > warmup:
            timed, total = timed + 1, total + dt
    bare.train(was_training)
    fps = timed / total if total > 0 else 0.0
    return {
        "fps": round(fps, 2),
        "ms_per_img": round(1000.0 / fps, 2) if fps > 0 else None,
        "images": timed,
        "warmup": min(seen, warmup),
        "precision": amp.name if amp is not None else "fp32",
    }


def _synthetic_batches(image_size: tuple[int, int], count: int, seed: int = 0) -> Iterable[Batch]:
    """`count` batches of one random image (3, h, w) in [0, 255]; the same image every time so
    generation cost stays out of the loop."""
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    image = torch.rand(3, h, w, generator=gen) * 255.0
    for i in range(count):
        yield [image], [], [{"image_id": i, "orig_size": (h, w), "scale_factor": (1.0, 1.0)}]


def bench(
    cfg: DetectorConfig,
    *,
    device: str = "cpu",
    images: int = 20,
    image_size: tuple[int, int] = (800, 1333),
    warmup: int = 5,
) -> dict[str, Any]:
    """Inference speed of `cfg`'s detector with random weights on a synthetic (h, w) image.

    For `harness bench CELL`. The model has random weights, so post-processing sees few or no
    detections above the score threshold; compare such numbers with each other, not with the
    published fps (which used the trained model on COCO val images).

    Returns:
        {"fps", "ms_per_img", "images", "warmup", "image_size", "device", "device_class",
         "precision", "mem_gb", "mem_kind"} (memory: peak during this benchmark).
    """
    from detector.model.faster_rcnn import (  # lazy: keeps `measure` importable on its own
        build_detector,
        match_weight_layout_,
    )

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; allowed: 'cpu', 'cuda', 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; allowed here: 'cpu'")
    torch.manual_seed(0)
    model = match_weight_layout_(build_detector(cfg).to(dev)).eval()
    amp = resolve_amp(cfg.precision, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    result = measure_fps(model, _synthetic_batches(image_size, images + warmup), device=dev, images=images,
                         warmup=warmup, amp=amp)  # fmt: skip
    mem_gb, mem_kind = peak_memory(dev)
    name = device_name(dev)
    result.update({"image_size": list(image_size), "device": name, "device_class": device_class(name),
                   "mem_gb": mem_gb, "mem_kind": mem_kind})  # fmt: skip
    return result


__all__ = ["bench", "device_class", "device_name", "measure_fps", "peak_memory"]
