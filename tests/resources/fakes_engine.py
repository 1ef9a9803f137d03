"""A tiny detector and batch source with the real interfaces, for engine / measure unit tests.

`TinyDetector.forward(images, targets=None, original_sizes=None)` follows ARCHITECTURE.md "The
model": four MMDet loss keys in training, per-image detections in eval. It draws from the global
torch RNG in training (like the RPN / RoI samplers), so resume tests cover RNG restoration.
`TinySource` derives the data order and the flips from (seed, epoch, index), as `detector.data.coco`
must, so any position of any epoch can be regenerated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


class TinyDetector(nn.Module):
    def __init__(self, num_classes: int = 3, nan_at_call: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.cls = nn.Linear(8, num_classes)
        self.reg = nn.Linear(8, 4)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.nan_at_call, self.calls = nan_at_call, 0

    def _features(self, images: list[Tensor]) -> Tensor:
        feats = [self.bn(torch.relu(self.conv(img[None] / 255.0))).mean(dim=(2, 3)) for img in images]
        return torch.cat(feats)  # (B, 8)

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> Any:
        feats = self._features(images)
        logits, deltas = self.cls(feats), self.reg(feats)
        if self.training:
            self.calls += 1
            labels = torch.stack([t["labels"][0] for t in targets])
            boxes = torch.stack([t["boxes"][0] / 64.0 for t in targets])
            # a random subset, as the samplers draw: makes the loss depend on the RNG stream
            keep = torch.randperm(len(images))[: max(1, len(images) // 2)]
            loss_cls = nn.functional.cross_entropy(logits, labels)
            losses = {
                "loss_rpn_cls": nn.functional.cross_entropy(logits[keep], labels[keep]),
                "loss_rpn_bbox": (deltas[keep] - boxes[keep]).abs().mean(),
                "loss_cls": loss_cls,
                "loss_bbox": (deltas - boxes).abs().mean(),
            }
            if self.nan_at_call is not None and self.calls >= self.nan_at_call:
                losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
            return losses
        out = []
        for i, img in enumerate(images):
            h, w = original_sizes[i] if original_sizes else img.shape[-2:]
            box = torch.sigmoid(deltas[i]) * torch.tensor([w, h, w, h], dtype=deltas.dtype, device=deltas.device)
            x1, y1, x2, y2 = box.unbind()
            box = torch.stack([torch.minimum(x1, x2), torch.minimum(y1, y2), torch.maximum(x1, x2), torch.maximum(y1, y2)])
            score, label = logits[i].softmax(-1).max(-1)
            out.append({"boxes": box[None], "scores": score[None], "labels": label[None]})
        return out


class TinySource:
    """`n` random images of (3, size, size) with one box each, batches of `batch`."""

    def __init__(self, n: int = 12, batch: int = 2, size: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.images = [torch.rand(3, size, size, generator=gen) * 255 for _ in range(n)]
        self.labels = [int(torch.randint(0, 3, (1,), generator=gen)) for _ in range(n)]
        self.batch, self.size, self.seed = batch, size, seed
        self.loaded: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.images) // self.batch

    def _sample(self, epoch: int, index: int) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 10_007 + index)
        img, s = self.images[index], self.size
        box = torch.tensor([2.0, 3.0, s - 4.0, s - 2.0])
        if torch.rand((), generator=gen) < 0.5:  # horizontal flip
            img = img.flip(-1)
            box = torch.tensor([s - box[2], box[1], s - box[0], box[3]])
        target = {"boxes": box[None], "labels": torch.tensor([self.labels[index]])}
        return img, target, {"image_id": index, "orig_size": (s, s), "scale_factor": (1.0, 1.0)}

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[list, list, list]]:
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed + epoch))
        for b in range(start, len(self)):
            samples = [self._sample(epoch, int(i)) for i in order[b * self.batch : (b + 1) * self.batch]]
            yield [s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples]

    def eval_batches(self) -> Iterator[tuple[list, list, list]]:
        for i in range(len(self.images)):
            img, target, meta = self._sample(0, i)
            yield [self.images[i]], [target], [meta]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = dict(state)
