"""Stage-by-stage comparison of the bundled detector with MMDetection's model on the same inputs.

Both models hold the same weights (MMDetection's, through an MMDetection checkpoint file and
`detector.model.weights.load_detector`) and see the same images: MMDetection's own test pipeline
output, given to ours as RGB. The stages, in the order data flows:

- `preprocess`: normalised, padded batch;
- `backbone`, `neck`: every output level;
- `proposals`: the RPN's test-time proposals of each image;
- `detections`: boxes, scores and labels in original-image pixels;
- `losses`: the four training losses with deterministic sampling (first N candidates in index
  order on both sides, since the two random generators cannot be made to agree).

The data pipeline is compared on its own (`pipeline`): our decode + resize against MMDetection's
`LoadImageFromFile` + `Resize`, image by image.

Tolerances (`TOLERANCES`, relative to the largest magnitude of the reference tensor): ours runs its
plain path here (BN not folded, NCHW), where both models call the same kernels in the same order, so
dense stages allow 1e-6 and measure 0; our fast path equals the plain path to float rounding (its
own tests). Proposal and detection sets pass when every row has a partner (same image and label,
IoU > 0.99, score within 1e-3) and matched rows agree to 1e-6; up to 1% of rows may lack one, the
documented tie case (two exactly equal scores at a cut or in NMS, which two sorts may break
differently). Losses allow 1e-5 (summation order; measured ~1e-7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detector.model.faster_rcnn import FasterRCNN

TOLERANCES = {"pipeline": 0.0, "preprocess": 1e-6, "backbone": 1e-6, "neck": 1e-6, "sets": 1e-6, "losses": 1e-5}
SET_TOLERANCE = 0.01  # fraction of proposal / detection rows allowed without a partner (tie cases)
ROW_IOU, ROW_SCORE = 0.99, 1e-3


@dataclass(frozen=True, kw_only=True)
class StageResult:
    """One stage of one cell: `worst` is the largest relative difference (for sets: of the matched
    rows), `detail` says where it is and, for sets, how many rows had no partner."""

    stage: str
    worst: float
    ok: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "worst": self.worst, "ok": self.ok, "detail": self.detail}


def relative(ours: Tensor, ref: Tensor) -> float:
    """max |ours - ref| / max |ref| (0 for two empty or equal tensors)."""
    if ours.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    diff = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def compare_dense(stage: str, ours: list[Tensor], ref: list[Tensor]) -> StageResult:
    """Level by level (or image by image); the worst level is named."""
    if len(ours) != len(ref):
        return StageResult(stage=stage, worst=float("inf"), ok=False, detail=f"{len(ours)} outputs vs {len(ref)}")
    worst, where = 0.0, ""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a.shape != b.shape:
            return StageResult(stage=stage, worst=float("inf"), ok=False,
                               detail=f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        r = relative(a, b)
        if r >= worst:
            worst, where = r, f"output {i} {tuple(b.shape)}"
    return StageResult(stage=stage, worst=worst, ok=worst <= TOLERANCES[stage], detail=f"worst at {where}")


def compare_sets(stage: str, ours: list[dict[str, Tensor]], ref: list[dict[str, Tensor]]) -> StageResult:
    """Per image, each reference row's partner among ours: same label, IoU > ROW_IOU, score within
    ROW_SCORE (greedy, best IoU first). `worst` is over matched rows (boxes relative to the image's
    largest coordinate, scores absolute)."""
    unmatched = total = 0
    worst = 0.0
    for a, b in zip(ours, ref):
        total += b["boxes"].shape[0]
        if b["boxes"].numel() == 0 or a["boxes"].numel() == 0:
            unmatched += abs(a["boxes"].shape[0] - b["boxes"].shape[0])
            continue
        iou = box_iou(b["boxes"].double(), a["boxes"].double())
        same = (b["labels"][:, None] == a["labels"][None, :]) & ((b["scores"][:, None] - a["scores"][None, :]).abs() <= ROW_SCORE)
        iou = torch.where(same, iou, torch.zeros_like(iou))
        taken = torch.zeros(a["boxes"].shape[0], dtype=torch.bool)
        scale = b["boxes"].abs().max().item() or 1.0
        for i in range(iou.shape[0]):
            cand = iou[i].masked_fill(taken, -1.0)
            j = int(cand.argmax())
            if cand[j] <= ROW_IOU:
                unmatched += 1
                continue
            taken[j] = True
            worst = max(worst, (a["boxes"][j].double() - b["boxes"][i].double()).abs().max().item() / scale,
                        abs(a["scores"][j].item() - b["scores"][i].item()))
        unmatched += int((~taken).sum())  # rows of ours that no reference row claimed
    if len(ours) != len(ref):
        return StageResult(stage=stage, worst=float("inf"), ok=False, detail=f"{len(ours)} images vs {len(ref)}")
    frac = unmatched / max(total, 1)
    ok = frac <= SET_TOLERANCE and worst <= TOLERANCES["sets"]
    return StageResult(stage=stage, worst=worst, ok=ok, detail=f"{unmatched} of {total} rows without a partner")


def first_n_keys(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """`detector.model.sampling.random_keys` that makes the sampler take the first candidates in
    index order: keys decreasing along each row, all in (0, 1]."""
    p = shape[-1]
    return (1.0 - torch.arange(p, dtype=torch.float64, device=device) / max(p, 1)).expand(shape)


def first_n_sampling() -> Any:
    """Patch the bundled detector's sampler (both heads) to draw with `first_n_keys`."""
    return mock.patch("detector.model.sampling.random_keys", first_n_keys)


def _instances(res: Any) -> dict[str, Tensor]:
    return {"boxes": res.bboxes.detach().float(), "scores": res.scores.detach().float(),
            "labels": res.labels.detach() if "labels" in res else torch.zeros_like(res.scores, dtype=torch.long)}


def _proposal_sets(rois: Tensor, n: int) -> list[dict[str, Tensor]]:
    img = rois[:, 0].long()
    return [{"boxes": rois[img == i, 1:], "scores": torch.zeros(int((img == i).sum())),
             "labels": torch.zeros(int((img == i).sum()), dtype=torch.long)} for i in range(n)]


@torch.no_grad()
def eval_stages(ours: FasterRCNN, theirs: Any, packed: dict[str, Any]) -> list[StageResult]:
    """`packed`: MMDetection's collated test batch (`inputs`: BGR uint8 images, `data_samples`)."""
    ours.eval()
    theirs.eval()
    data = theirs.data_preprocessor(packed, training=False)
    samples = data["data_samples"]
    images = [im.flip(0) for im in packed["inputs"]]  # ours takes RGB, as our pipeline yields it
    batch, image_sizes, pad_shapes = ours.preprocess(images)
    results = [compare_dense("preprocess", [batch.contiguous()], [data["inputs"]])]

    ref_b = list(theirs.backbone(data["inputs"]))
    feats = ours.backbone(batch)
    results.append(compare_dense("backbone", [f.contiguous() for f in feats], ref_b))
    ref_n = list(theirs.neck(ref_b)) if theirs.with_neck else ref_b
    if ours.neck is not None:
        feats = ours.neck(feats)
        results.append(compare_dense("neck", [f.contiguous() for f in feats], ref_n))

    ref_props = theirs.rpn_head.predict(tuple(ref_n), samples, rescale=False)
    rois, _ = ours.rpn_head(feats, image_sizes, pad_shapes)
    # Proposals leave our RPN without scores: boxes are compared (labels and scores all 0).
    ref_sets = [{"boxes": p.bboxes.float(), "scores": torch.zeros(p.bboxes.shape[0]),
                 "labels": torch.zeros(p.bboxes.shape[0], dtype=torch.long)} for p in ref_props]
    results.append(compare_sets("proposals", _proposal_sets(rois, len(images)), ref_sets))

    ref_dets = theirs.roi_head.predict(tuple(ref_n), [p.clone() for p in ref_props], samples, rescale=True)
    orig = [(int(s.metainfo["ori_shape"][0]), int(s.metainfo["ori_shape"][1])) for s in samples]
    dets = ours.roi_head.predict(feats, rois, image_sizes, ours.scale_factors(image_sizes, orig))
    results.append(compare_sets("detections", dets, [_instances(d) for d in ref_dets]))
    return results


def loss_stage(ours: FasterRCNN, theirs: Any, packed: dict[str, Any], deterministic: Any) -> StageResult:
    """The four training losses, deterministic sampling on both sides. mmdet returns the RPN terms
    per level (each already divided by the batch's sample count): their sum is our one term."""
    ours.train()
    theirs.train()
    data = theirs.data_preprocessor(packed, training=True)
    with deterministic, torch.no_grad():
        ref = theirs.loss(data["inputs"], data["data_samples"])
    ref_losses = {k: torch.stack(list(v)).sum() if isinstance(v, (list, tuple)) else v for k, v in ref.items() if k.startswith("loss")}
    targets = [{"boxes": s.gt_instances.bboxes.tensor if hasattr(s.gt_instances.bboxes, "tensor") else s.gt_instances.bboxes,
                "labels": s.gt_instances.labels} for s in data["data_samples"]]
    images = [im.flip(0) for im in packed["inputs"]]
    with first_n_sampling(), torch.no_grad():
        got = ours(images, targets)
    ours.eval()
    theirs.eval()
    worst, where, missing = 0.0, "", sorted(set(ref_losses) ^ set(got))
    if missing:
        return StageResult(stage="losses", worst=float("inf"), ok=False, detail=f"terms on one side only: {', '.join(missing)}")
    for key in sorted(ref_losses):
        r = relative(got[key].detach().reshape(1), ref_losses[key].detach().reshape(1))
        if r >= worst:
            worst, where = r, f"{key} {got[key].item():.6g} vs {ref_losses[key].item():.6g}"
    return StageResult(stage="losses", worst=worst, ok=worst <= TOLERANCES["losses"], detail=f"worst: {where}")
