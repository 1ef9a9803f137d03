"""RoI feature extraction: MMDetection's `SingleRoIExtractor` on torchvision's `roi_align`.

Shorthand: R RoIs as `Tensor[R, 5]` (batch index, x1, y1, x2, y2) in resized-image pixels; L levels
with strides `featmap_strides`; S the output size (7, or 14 for C4).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from detector.model.box_ops import count_ids
from detector.model.roi_align_grad import roi_align_backward

# CPU RoIAlign splits its RoIs over this many threads at most (torchvision's CPU kernel is one loop
# on one core; the op releases the GIL). Below `_MIN_ROIS` RoIs the threads are not worth it.
_MIN_ROIS = 32
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roi_align")
        return _pool


def _copy_image_(dst: Tensor, src: Tensor) -> None:
    """`dst[C, H, W] <- src[C, H, W]`, each either NCHW-contiguous or an NHWC slice. Between layouts
    this is one 2-D transpose `[H*W, C] <-> [C, H*W]`, which PyTorch copies in cache blocks, about
    3x faster than the generic strided copy of `.contiguous()` on a 4-D tensor."""
    c, h, w = dst.shape

    def rows(t: Tensor, nchw: bool) -> Tensor:  # t as a 2-D view whose rows match dst's memory
        if nchw:
            return t.view(c, h * w) if t.is_contiguous() else t.permute(1, 2, 0).view(h * w, c).t()
        return t.permute(1, 2, 0).view(h * w, c) if not t.is_contiguous() else t.view(c, h * w).t()

    dst_nchw = dst.is_contiguous()
    rows(dst, dst_nchw).copy_(rows(src, dst_nchw))


def swap_layout(x: Tensor, *, to_channels_last: bool) -> Tensor:
    """`x [N, C, H, W]` copied to channels-last (NHWC) memory or to contiguous NCHW (`_copy_image_`
    per image); returned as is when already there. Same values."""
    fmt = torch.channels_last if to_channels_last else torch.contiguous_format
    if x.dim() != 4 or x.is_contiguous(memory_format=fmt):
        return x
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return x.contiguous(memory_format=fmt)
    out = torch.empty_like(x, memory_format=fmt)
    for i in range(x.shape[0]):
        _copy_image_(out[i], x[i])
    return out


def _split_by_image(rois: Tensor, num_images: int, workers: int) -> list[tuple[int, Tensor]]:
    """`(image, indices into rois)` jobs: each image's RoIs, cut into enough pieces to feed
    `workers` threads (one piece per image when there are at least as many images as threads)."""
    per_image = [(i, torch.nonzero(rois[:, 0] == i).squeeze(1)) for i in range(num_images)]
    per_image = [(i, idx) for i, idx in per_image if idx.numel() > 0]
    pieces = max(1, -(-workers // max(len(per_image), 1)))
    return [(i, part) for i, idx in per_image for part in idx.chunk(pieces)]


class CpuRoIAlign(torch.autograd.Function):
    """torchvision's CPU `roi_align` with two fast paths, each switched on `RoIPooler`:

    - `workers` > 1 (`cpu_threads`): the kernel (and, without the sparse gradient, its backward) runs
      on several threads at once, each on one image's slice `feat[i:i+1]` with a share of that image's
      RoIs (batch index rewritten to 0). Each output row is computed by the same kernel from the same
      inputs as one call over all RoIs, so the forward is bit-identical; torchvision's backward sums
      each piece's gradient, which only reorders float additions when an image is cut into pieces.
    - `sparse_grad` (`cpu_sparse_grad`): the backward is `roi_align_grad.roi_align_backward`, each
      sampling point's weights computed once for all channels instead of once per channel (6-10x
      faster than torchvision's; the same sums up to the order of float additions).

    With one worker and no sparse gradient there is nothing to do: `RoIPooler` calls `roi_align`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, feat: Tensor, rois: Tensor, scale: float, size: tuple[int, int], sampling_ratio: int, aligned: bool, workers: int,
        sparse_grad: bool,
    ) -> Tensor:
        if workers < 2 and not sparse_grad:
            raise ValueError("CpuRoIAlign: neither fast path is on (use torchvision's roi_align)")
        ctx.channels_last = not feat.is_contiguous() and feat.is_contiguous(memory_format=torch.channels_last)
        feat = swap_layout(feat, to_channels_last=False)  # the kernel reads NCHW
        ctx.feat_shape, ctx.args = tuple(feat.shape), (scale, size, sampling_ratio, aligned, workers, sparse_grad)
        if sparse_grad:
            ctx.save_for_backward(rois)
        if workers < 2:
            out: Tensor = torch.ops.torchvision.roi_align(feat, rois, scale, size[0], size[1], sampling_ratio, aligned)
            return out
        jobs = _split_by_image(rois, feat.shape[0], workers)
        local = []
        for _i, part in jobs:
            r = rois[part].clone()
            r[:, 0] = 0
            local.append(r)

        def run(k: int) -> Tensor:
            i = jobs[k][0]
            with torch.no_grad():  # grad mode is per thread: the workers must not record a graph
                return torch.ops.torchvision.roi_align(feat[i : i + 1], local[k], scale, size[0], size[1], sampling_ratio, aligned)

        results = list(_thread_pool(workers).map(run, range(len(jobs))))
        if torch.equal(torch.cat([part for _, part in jobs]), torch.arange(rois.shape[0])):
            out = torch.cat(results)  # RoIs grouped by image, as the RPN and the sampler emit them
        else:
            out = feat.new_empty((rois.shape[0], feat.shape[1], *size))
            for (_, part), res in zip(jobs, results):
                out[part] = res
        ctx.jobs, ctx.local = jobs, local
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        scale, size, sampling_ratio, aligned, workers, sparse_grad = ctx.args
        n, c, h, w = ctx.feat_shape
        nones = (None,) * 7
        # The gradient goes back in the features' own layout: autograd adds it to the RPN's
        # channels-last gradient of the same level, which is slow across layouts.
        if sparse_grad:
            (rois,) = ctx.saved_tensors
            grad_feat = roi_align_backward(grad, rois, feat_shape=ctx.feat_shape, spatial_scale=scale, sampling_ratio=sampling_ratio,
                                           aligned=aligned)  # fmt: skip
            return swap_layout(grad_feat, to_channels_last=ctx.channels_last), *nones

        def run(k: int) -> Tensor:
            part = ctx.jobs[k][1]
            with torch.no_grad():
                return torch.ops.torchvision._roi_align_backward(
                    grad[part].contiguous(), ctx.local[k], scale, size[0], size[1], 1, c, h, w, sampling_ratio, aligned
                )

        pieces = list(_thread_pool(workers).map(run, range(len(ctx.jobs))))
        per_image: list[Tensor | None] = [None] * n
        for (i, _), piece in zip(ctx.jobs, pieces):
            prev = per_image[i]
            per_image[i] = piece if prev is None else prev.add_(piece)
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        grad_feat = torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt)
        for i, g in enumerate(per_image):
            if g is None:
                grad_feat[i].zero_()
            else:
                _copy_image_(grad_feat[i], g[0])
        return grad_feat, *nones


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: int = 56) -> Tensor:
    """mmdet `SingleRoIExtractor.map_roi_levels`: `floor(log2(sqrt(w * h) / finest_scale + 1e-6))`
    clamped to [0, num_levels - 1] -> `Tensor[R]` int64 (FPN paper eq. 1 with k0 = 4 at 224 px:
    scale < 112 -> P2, < 224 -> P3, < 448 -> P4, else P5)."""
    rois = rois.float()
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class RoIPooler(nn.Module):
    """`forward(feats: list[Tensor[N, C, H_l, W_l]], rois: Tensor[R, 5]) -> Tensor[R, C, S, S]`.

    RoIAlign with mmcv's defaults: `aligned=True` (half-pixel offset), `sampling_ratio=0` (adaptive),
    average pooling (reference 1.2). Runs in float32 under autocast (roi_align has no reduced
    precision kernel worth its rounding error), returning float32.
    """

    def __init__(self, *, output_size: int, featmap_strides: tuple[int, ...], sampling_ratio: int, aligned: bool, finest_scale: int) -> None:
        super().__init__()
        self.output_size = (output_size, output_size)
        self.scales = [1.0 / s for s in featmap_strides]
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.finest_scale = finest_scale
        # CPU fast paths (`CpuRoIAlign`); both off: one plain torchvision call per level.
        self.cpu_threads = True  # the kernel spread over torch.get_num_threads() threads
        self.cpu_sparse_grad = True  # the backward as one sparse product (`roi_align_grad`)

    def _align(self, feat: Tensor, rois: Tensor, scale: float) -> Tensor:
        feat, rois = feat.float(), rois.float()
        if feat.device.type == "cpu":
            workers = torch.get_num_threads() if self.cpu_threads and rois.shape[0] >= _MIN_ROIS else 1
            sparse_grad = self.cpu_sparse_grad and feat.requires_grad and torch.is_grad_enabled()
            if workers > 1 or sparse_grad:
                out: Tensor = CpuRoIAlign.apply(feat, rois, scale, self.output_size, self.sampling_ratio, self.aligned, workers, sparse_grad)
                return out
        return roi_align(feat, rois, self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio, aligned=self.aligned)

    def forward(self, feats: list[Tensor], rois: Tensor) -> Tensor:
        num_levels = len(self.scales)
        feats = feats[:num_levels]  # P6 feeds the RPN only
        if num_levels == 1:
            return self._align(feats[0], rois, self.scales[0])
        levels = map_roi_levels(rois, num_levels, self.finest_scale)
        out = rois.new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size), dtype=torch.float32)
        # The RoIs of each level in their order, from one stable sort and one read of the counts
        # (a single host sync on CUDA, where a nonzero per level made one each).
        order = torch.sort(levels, stable=True).indices
        counts = count_ids(levels, num_levels).tolist()
        for idx, feat, scale in zip(order.split(counts), feats, self.scales):
            if idx.numel() == 0:
                continue
            out[idx] = self._align(feat, rois[idx], scale)
        return out


__all__ = ["CpuRoIAlign", "RoIPooler", "map_roi_levels", "swap_layout"]
