"""The bundled Faster R-CNN: `build_detector(cfg)` and `describe(cfg)`.

Shorthand: N images; image i is `Tensor[3, H_i, W_i]` RGB in [0, 255], already resized by the data
pipeline; the batch is `Tensor[N, 3, H_pad, W_pad]` with H_pad, W_pad the largest H_i, W_i rounded
up to the size divisor (32). Boxes are x1y1x2y2 in resized-image pixels unless `original_sizes` is
given at test time.

Submodule names are MMDetection's (`backbone`, `neck`, `rpn_head`, `roi_head`), so published
checkpoints load by key (see ARCHITECTURE.md, "The model").
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from detector.config import DetectorConfig
from detector.errors import ConfigError
from detector.model.backbones import build_backbone, set_fold_bn_
from detector.model.graphs import GraphCache
from detector.model.necks import build_neck
from detector.model.roi_heads import StandardRoIHead
from detector.model.rpn import RPNHead


class FasterRCNN(nn.Module):
    """Two-stage detector. Training: `forward(images, targets)` -> the four mmdet loss terms
    (`loss_rpn_cls`, `loss_rpn_bbox`, `loss_cls`, `loss_bbox`, float32 scalars). Eval:
    `forward(images, original_sizes=None)` -> per image `{"boxes" [K, 4], "scores" [K], "labels" [K]}`.
    """

    pixel_mean: Tensor
    pixel_std: Tensor
    _graphs: GraphCache | None

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        if cfg.num_classes < 1:
            raise ConfigError(f"num_classes: {cfg.num_classes} must be >= 1")
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.neck = build_neck(cfg.neck)
        self.rpn_head = RPNHead(cfg.rpn)
        self.roi_head = StandardRoIHead(cfg.roi_head, num_classes=cfg.num_classes, backbone=cfg.backbone)
        norm = cfg.normalize
        self.register_buffer("pixel_mean", torch.tensor(norm.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(norm.std).view(3, 1, 1), persistent=False)
        self.to_bgr = norm.to_bgr
        self.pad_divisor = cfg.data.pad_divisor
        # CPU batches go channels-last (NHWC): oneDNN's convolutions run NHWC natively, so every conv
        # skips the NCHW <-> blocked reorders of its input and output (same math, see benchmarks.md).
        # In inference always; in training only where oneDNN's NHWC backward pays (`cpu_trains_nhwc`).
        self.cpu_channels_last = True
        self.cpu_channels_last_train = cpu_trains_nhwc()
        # The same on CUDA is a candidate fast path (cuDNN's tensor-core kernels are NHWC, so NCHW
        # fp16 convs pay transposes), off until measured (`python -m detector.bench.gpu --ablation`);
        # it wants the conv weights channels-last too: `set_cuda_channels_last_`.
        self.cuda_channels_last = False
        # Frozen-statistics BN folded into its conv (`fold.conv_bn`): same math, one pass less. "auto":
        # every pair on CPU; elsewhere only where no gradient flows (a GPU step is bound by launches).
        set_fold_bn_(self, "auto")
        self.cuda_graphs = False

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("FasterRCNN.forward: targets are required in training mode")
        batch, image_sizes, pad_shapes = self.preprocess(images)
        # In inference with `cuda_graphs` on, `dense` is replayed from a CUDA graph (`graphs.py`).
        dense = self.dense if self._graphs is None or self.training else self._graphs
        feats, rpn_out = dense(batch)
        rois, rpn_losses = self.rpn_head(feats, image_sizes, pad_shapes, targets if self.training else None, head_out=rpn_out)
        if targets is not None and self.training:
            max_rois = self.rpn_head.cfg.train.max_per_img  # the RPN keeps at most this many per image
            return {**rpn_losses, **self.roi_head.loss(feats, rois, targets, max_rois_per_image=max_rois)}
        return self.roi_head.predict(feats, rois, image_sizes, self.scale_factors(image_sizes, original_sizes))

    def train(self, mode: bool = True) -> FasterRCNN:
        """Also moves the 4-D weights to the new mode's batch layout where that differs (on a CPU
        that trains NCHW and infers NHWC, `cpu_trains_nhwc`), so no convolution copies its weight at
        every call. Same values either way; the parameters stay the same objects."""
        device = self.pixel_mean.device
        before = self.memory_format(device)
        super().train(mode)
        if self.memory_format(device) != before:
            match_weight_layout_(self)
        return self

    def dense(self, batch: Tensor) -> tuple[list[Tensor], tuple[list[Tensor], list[Tensor]]]:
        """Backbone, neck and the RPN's convs: the part of the network whose shapes are the batch's.
        Returns the feature maps and the RPN's per-level (logits, deltas)."""
        feats = self.backbone(batch)
        if self.neck is not None:
            feats = self.neck(feats)
        return feats, self.rpn_head.head(feats)

    @property
    def cuda_graphs(self) -> bool:
        """Inference replays `dense` from CUDA graphs (`detector.model.graphs`); a candidate fast path,
        off until measured on a GPU (`python -m detector.bench.gpu --ablation`)."""
        return self._graphs is not None

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        # In __dict__, not a submodule: the cache holds CUDA graphs and refers back to the model.
        self.__dict__["_graphs"] = GraphCache(self.dense, self) if on else None

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Normalise (RGB -> BGR first for caffe weights), zero-pad bottom/right to a common size
        divisible by `pad_divisor` (mmdet pads after normalising, with 0).

        Returns `batch [N, 3, H_pad, W_pad]`, `image_sizes [N, 2]` and `pad_shapes [N, 2]` (each
        image's own (h, w) rounded up to the divisor), both int64 on the model's device.
        """
        if not images:
            raise ValueError("FasterRCNN.forward: empty image list")
        device, d = self.pixel_mean.device, self.pad_divisor
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        h_pad = math.ceil(max(h for h, _ in sizes) / d) * d
        w_pad = math.ceil(max(w for _, w in sizes) / d) * d
        batch = torch.empty((len(images), 3, h_pad, w_pad), device=device, memory_format=self.memory_format(device)).zero_()
        for i, im in enumerate(images):
            im = im.to(device, torch.float32, non_blocking=True)
            if self.to_bgr:
                im = im.flip(0)
            batch[i, :, : sizes[i][0], : sizes[i][1]] = (im - self.pixel_mean) / self.pixel_std
        # Built on the host and sent without waiting: `torch.tensor(..., device=cuda)` is a blocking copy.
        image_sizes = torch.tensor(sizes, dtype=torch.long).to(device, non_blocking=True)
        pads = [(math.ceil(h / d) * d, math.ceil(w / d) * d) for h, w in sizes]
        pad_shapes = torch.tensor(pads, dtype=torch.long).to(device, non_blocking=True)
        return batch, image_sizes, pad_shapes

    def memory_format(self, device: torch.device) -> torch.memory_format:
        """The layout of this model's batches on `device` in its current mode (`cpu_channels_last` in
        inference, `cpu_channels_last_train` in training, `cuda_channels_last`)."""
        if device.type == "cpu":
            nhwc = self.cpu_channels_last_train if self.training else self.cpu_channels_last
        else:
            nhwc = self.cuda_channels_last and device.type == "cuda"
        return torch.channels_last if nhwc else torch.contiguous_format

    def scale_factors(self, image_sizes: Tensor, original_sizes: list[tuple[int, int]] | None) -> Tensor | None:
        """`Tensor[N, 2]` (x, y) factors from resized to original pixels: original / resized."""
        if original_sizes is None:
            return None
        if len(original_sizes) != image_sizes.shape[0]:
            raise ValueError(f"FasterRCNN.forward: {len(original_sizes)} original_sizes for {image_sizes.shape[0]} images")
        orig = torch.tensor([(float(w), float(h)) for h, w in original_sizes]).to(image_sizes.device, non_blocking=True)
        return orig / image_sizes.flip(1).float()


def cpu_trains_nhwc() -> bool:
    """Whether CPU training steps run NHWC: where torch dispatches to AVX-512 kernels. There oneDNN's
    NHWC convolutions win forward and backward (R-50-FPN step at 800x1333: ratio to torchvision 0.85
    NHWC against 1.00 NCHW, AVX-512 AMD EPYC). On an AVX2-only CPU its NHWC backward loses more than the
    forward gains: 1.26 against 1.01 (AMD EPYC Milan; convolution_backward 10.7 s against 6.9 s a step
    at 512x832), so training stays NCHW there; inference is NHWC on both (0.73 against 0.89 on AVX2)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def set_cuda_channels_last_(model: FasterRCNN, on: bool) -> None:
    """NHWC batches on CUDA and the model's 4-D weights converted to match (or both back to NCHW)."""
    model.cuda_channels_last = on
    model.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def match_weight_layout_(model: FasterRCNN) -> FasterRCNN:
    """The model's 4-D weights in the layout its batches take on the device it is on, in its current
    mode (`memory_format`); `FasterRCNN.train()` / `.eval()` call it when the mode's layout changes.

    A convolution whose weight is not in its input's layout copies the weight at every call and its
    gradient at every backward: on CPU, where batches are NHWC, each 3x3 weight was copied 4 times a
    training step (R-50-FPN, 2 images at 160x128 on one core: 0.869 -> 0.836 s a step; at 800x1216
    within the noise, reports/benchmarks.md). Same values, same results (tests/detector/model/test_perf_paths.py).
    On CUDA the batches are NCHW unless `set_cuda_channels_last_`, so nothing changes there."""
    device = next(model.parameters()).device
    return model.to(memory_format=model.memory_format(device))


def build_detector(cfg: DetectorConfig) -> FasterRCNN:
    """The Faster R-CNN that `cfg` describes, randomly initialised as mmdet does before loading
    pretrained weights (those are the job of `detector.model.weights`)."""
    return FasterRCNN(cfg)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(total, trainable)` parameter counts; BN affine parameters are counted (they are parameters
    in mmdet), BN running statistics are not (buffers)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def describe(cfg: DetectorConfig) -> dict[str, Any]:
    """`{"name", "params_total", "params_trainable", "config"}` for `harness describe`.

    Built on the meta device: no memory is allocated and no init runs, so even X-101-32x8d is
    instant. `params_trainable` matches mmcv-1.x's counter (requires_grad only, reference 3).
    """
    with torch.device("meta"):
        model = build_detector(cfg)
    total, trainable = count_parameters(model)
    return {"name": cfg.name, "params_total": total, "params_trainable": trainable, "config": cfg.to_dict()}


__all__ = ["FasterRCNN", "build_detector", "count_parameters", "cpu_trains_nhwc", "describe", "match_weight_layout_",
           "set_cuda_channels_last_"]
