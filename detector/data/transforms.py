"""Image + box transforms of the MMDetection Faster R-CNN pipelines (reference sections 1.3, 1.4, 1.5).

Shorthand: an image is a uint8 tensor `[3, H, W]` (RGB); boxes are float32 `[N, 4]` x1y1x2y2 in
absolute pixels of that image. A scale is `(long, short)` as MMDetection writes it: `(1333, 800)`.

Train: keep-ratio resize (one fixed scale, or multi-scale: "ms_range" short side drawn uniformly
among the integers of [min, max], "ms_choice" one of the listed short sides; long side fixed), then
horizontal flip with probability `flip_prob`. Test: the fixed-scale resize only. Padding to a
multiple of 32 and normalisation belong to the model.

Every random draw comes from the `numpy.random.Generator` the caller passes (the dataset seeds one
per (seed, epoch, index)), so the same seed gives the same augmentations in any worker layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from detector.config import DataConfig


def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """New (w, h) of a keep-ratio resize, exactly as `mmcv.rescale_size` computes it.

    The factor is min(long / max(h, w), short / min(h, w)) and each side is `int(x * s + 0.5)`
    (mmcv `_scale_size`), so e.g. 640x480 at (1333, 800) becomes 1067x800.
    """
    long_edge, short_edge = max(scale), min(scale)
    s = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * float(s) + 0.5), int(h * float(s) + 0.5)


def resize(image: Tensor, boxes: Tensor, scale: tuple[int, int]) -> tuple[Tensor, Tensor, tuple[float, float]]:
    """Keep-ratio resize of `image` [3, H, W] uint8 and `boxes` [N, 4] to `scale` = (long, short).

    The pixels go through `cv2.resize(..., INTER_LINEAR)` on uint8, which is what mmcv's default
    backend calls: its fixed-point bilinear rounds differently from a float interpolation + round
    (+-1 grey level in ~10% of values, parity D3), so only cv2 itself gives MMDetection's input.
    Boxes are scaled by the actual ratios new_w / w and new_h / h (mmdet `Resize` stores those as
    `scale_factor`) and clipped to the new image (`clip_object_border=True`).

    Returns:
        (resized image [3, H', W'] uint8, boxes [N, 4] float32, (w_scale, h_scale)).
    """
    _, h, w = image.shape
    new_w, new_h = rescale_size(w, h, scale)
    if (new_w, new_h) != (w, h):
        hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        image = torch.from_numpy(cv2.resize(hwc, (new_w, new_h), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1).contiguous()
    w_scale, h_scale = new_w / w, new_h / h
    boxes = boxes.to(torch.float32) * torch.tensor([w_scale, h_scale, w_scale, h_scale], dtype=torch.float32)
    boxes[:, 0::2].clamp_(0, new_w)
    boxes[:, 1::2].clamp_(0, new_h)
    return image, boxes, (w_scale, h_scale)


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Horizontal flip; boxes become x1' = W - x2, x2' = W - x1 (mmdet v2+ coordinates, no -1)."""
    w = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = w - boxes[:, 2]
    flipped[:, 2] = w - boxes[:, 0]
    return image.flip(-1), flipped


@dataclass(frozen=True, kw_only=True)
class DetTransform:
    """One pipeline (train or test): how to pick a scale, and whether to flip.

    Attributes:
        long_side: the fixed long edge of every scale (1333 in the reference).
        short_sides: "single": one value; "ms_range": (min, max); "ms_choice": the candidates.
        mode: "single" | "ms_range" | "ms_choice" (`DataConfig.train_scale`).
        flip_prob: probability of a horizontal flip (0 for test).
    """

    long_side: int
    short_sides: tuple[int, ...]
    mode: str = "single"
    flip_prob: float = 0.0

    def __post_init__(self) -> None:
        allowed = {"single": 1, "ms_range": 2, "ms_choice": None}
        if self.mode not in allowed:
            raise ValueError(f"transform mode {self.mode!r}; allowed: {', '.join(allowed)}")
        need = allowed[self.mode]
        if not self.short_sides or (need is not None and len(self.short_sides) != need):
            raise ValueError(f"transform mode {self.mode!r} needs {need or 'one or more'} short sides, got {self.short_sides}")
        if min(self.short_sides) < 1 or self.long_side < 1:
            raise ValueError(f"scales must be positive, got long {self.long_side}, short {self.short_sides}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    @property
    def random(self) -> bool:
        return self.mode != "single" or self.flip_prob > 0

    def sample_scale(self, rng: np.random.Generator | None) -> tuple[int, int]:
        """(long, short) for one image. ms_range: mmcv `RandomResize._random_sample` draws
        randint(min, max + 1) per edge; the long edge is the same at both ends, so it is fixed."""
        if self.mode == "single":
            return self.long_side, self.short_sides[0]
        if rng is None:
            raise ValueError("a multi-scale transform needs a random generator")
        if self.mode == "ms_range":
            lo, hi = min(self.short_sides), max(self.short_sides)
            return self.long_side, int(rng.integers(lo, hi + 1))
        # mmcv RandomChoiceResize: one of the scales, uniformly.
        return self.long_side, self.short_sides[int(rng.integers(len(self.short_sides)))]

    def __call__(self, image: Tensor, boxes: Tensor, rng: np.random.Generator | None = None
                 ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Apply resize (then flip) to `image` [3, H, W] uint8 and `boxes` [N, 4].

        Returns:
            (image [3, H', W'] uint8, boxes [N, 4] float32, meta) with meta keys
            `img_size` (H', W'), `scale_factor` (w_scale, h_scale), `flipped` (bool).
        """
        scale = self.sample_scale(rng)  # drawn before the flip, as RandomResize precedes RandomFlip
        image, boxes, factor = resize(image, boxes, scale)
        flipped = False
        if self.flip_prob > 0:
            if rng is None:
                raise ValueError("a flipping transform needs a random generator")
            # mmcv RandomFlip: flip when a uniform draw falls below prob.
            flipped = bool(rng.random() < self.flip_prob)
            if flipped:
                image, boxes = hflip(image, boxes)
        meta = {"img_size": (int(image.shape[1]), int(image.shape[2])), "scale_factor": factor, "flipped": flipped}
        return image, boxes, meta


def build_transform(data: DataConfig, *, train: bool, image_scale: tuple[int, int] | None = None) -> DetTransform:
    """The train or test pipeline of `data` (reference 1.3 / 1.4 / 1.5).

    Args:
        data: the cell's data config; `scale` is (long, short), `train_scale` the multi-scale mode.
        train: False gives the test pipeline (fixed `scale`, no flip).
        image_scale: `RunConfig.image_scale` override (long, short) for small profiles; the
            multi-scale short sides are scaled by image_scale short / data.scale short and rounded,
            so (320, 192) turns the 640..800 range into 154..192.
    """
    long_side, short_side = max(data.scale), min(data.scale)
    ratio = 1.0
    if image_scale is not None:
        ratio = min(image_scale) / short_side
        long_side, short_side = max(image_scale), min(image_scale)
    if not train or data.train_scale == "single":
        return DetTransform(long_side=long_side, short_sides=(short_side,), mode="single",
                            flip_prob=data.flip_prob if train else 0.0)
    if not data.ms_short_sides:
        raise ValueError(f"data.train_scale={data.train_scale!r} needs data.ms_short_sides")
    sides = tuple(max(1, int(round(s * ratio))) for s in data.ms_short_sides)
    return DetTransform(long_side=long_side, short_sides=sides, mode=data.train_scale, flip_prob=data.flip_prob)


__all__ = ["DetTransform", "build_transform", "hflip", "rescale_size", "resize"]
