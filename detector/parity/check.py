"""One cell's parity check: MMDetection 3.3.0's model from its own config vs the bundled detector.

`parity_check(name=..., cfg=..., images=...)` builds MMDetection's model from the config it ships under
the cell's name, saves it as an MMDetection checkpoint, loads that file into our model through the
published-checkpoint loader (so `detector.model.weights` is what is tested), and compares parameter
counts, the training recipe (`recipe`), the data pipeline and every stage of `stages`. It returns a plain dict (reports/parity.json's
row): `status` is "checked", "not shipped" (3.3.0 has no config of that name) or "cannot build"
(with the reason); a checked cell lists its stages, each with its worst relative difference, and,
when it differs, the same stages again with its recorded deviations applied to MMDetection's config.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.config import DetectorConfig
from detector.data.coco import read_image
from detector.data.transforms import build_transform
from detector.errors import WeightsError
from detector.model.backbones import set_fold_bn_
from detector.model.faster_rcnn import build_detector, count_parameters
from detector.model.weights import load_detector
from detector.parity import mmdet_side
from detector.parity.recipe import recipe_stage
from detector.parity.stages import StageResult, eval_stages, loss_stage

# One image = (path, [(x1, y1, x2, y2, label), ...]) in original pixels.
Image = tuple[Path, list[tuple[float, float, float, float, int]]]


def _classes(mcfg: Any, num_classes: int) -> tuple[str, ...]:
    """The class names the config trains on: its `metainfo`, else COCO's 80."""
    meta = mcfg.get("metainfo") or {}
    if meta.get("classes"):
        return tuple(meta["classes"])
    from mmdet.datasets import CocoDataset

    classes = tuple(CocoDataset.METAINFO["classes"])
    return classes if len(classes) == num_classes else tuple(f"class{i}" for i in range(num_classes))


def _pipeline(mcfg: Any) -> list[Any]:
    from mmdet.registry import TRANSFORMS

    return [TRANSFORMS.build(t) for t in mcfg.test_dataloader.dataset.pipeline]


def _packed(pipeline: list[Any], images: list[Image], num_classes: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """MMDetection's collated batch of `images` through its test pipeline (with the boxes, for the
    losses), and each image's state right after `LoadImageFromFile` (for the decode check)."""
    inputs, samples, decoded = [], [], []
    for i, (path, boxes) in enumerate(images):
        result: dict[str, Any] = {
            "img_path": str(path), "img_id": i,
            "instances": [{"bbox": list(b[:4]), "bbox_label": int(b[4]) % num_classes, "ignore_flag": 0} for b in boxes],
        }
        for j, transform in enumerate(pipeline):
            result = transform(result)
            if j == 0:
                decoded.append({"img": result["img"].copy()})
        inputs.append(result["inputs"])
        samples.append(result["data_samples"])
    return {"inputs": inputs, "data_samples": samples}, decoded


def pipeline_stage(images: list[Image], decoded: list[dict[str, Any]], packed: dict[str, Any], cfg: DetectorConfig) -> StageResult:
    """Our decode (PIL) and our test transform (the cell's scale, cv2 resize), each against
    MMDetection's: exact equality expected. The resize is fed MMDetection's decoded pixels, so a
    decode difference does not hide in it; a different test scale shows as a shape difference."""
    transform = build_transform(cfg.data, train=False)
    dec_diff = res_diff = 0
    dec_max = res_max = 0
    values = 0
    for (path, _), dec, ref in zip(images, decoded, packed["inputs"]):
        theirs_rgb = torch.from_numpy(np.ascontiguousarray(dec["img"][..., ::-1])).permute(2, 0, 1)
        ours_rgb = read_image(path)
        d = (ours_rgb.int() - theirs_rgb.int()).abs() if ours_rgb.shape == theirs_rgb.shape else None
        dec_diff += int((d > 0).sum()) if d is not None else theirs_rgb.numel()
        dec_max = max(dec_max, int(d.max()) if d is not None else 255)
        resized, _, _ = transform(theirs_rgb, torch.zeros(0, 4))
        ref_rgb = ref.flip(0)
        r = (resized.int() - ref_rgb.int()).abs() if resized.shape == ref_rgb.shape else None
        res_diff += int((r > 0).sum()) if r is not None else ref_rgb.numel()
        res_max = max(res_max, int(r.max()) if r is not None else 255)
        values += ref_rgb.numel()
    worst = max(dec_max, res_max) / 255
    detail = (f"decode: {dec_diff} values differ (max {dec_max}); resize: {res_diff} of {values} values differ "
              f"({100 * res_diff / max(values, 1):.2f}%, max {res_max})")
    return StageResult(stage="pipeline", worst=worst, ok=dec_diff == 0 and res_diff == 0, detail=detail)


def parity_check(*, name: str, cfg: DetectorConfig, images: list[Image], seed: int = 0, plain: bool = True) -> dict[str, Any]:
    """Compare the cell `name` (its resolved config `cfg`) with MMDetection's model of that name.

    A cell that differs and carries a recorded deviation MMDetection's config can be given
    (`mmdet_side.DEVIATIONS`, for example Q2) is compared a second time with that deviation applied
    to MMDetection's config: `row["with_deviations"]` then says whether everything else is equal.
    """
    mmdet_side.install_ops()
    started = time.perf_counter()
    row: dict[str, Any] = {"cell": name, "config": None, "status": "checked", "stages": []}
    path = mmdet_side.config_path(name)
    if path is None:
        return {**row, "status": "not shipped", "reason": f"MMDetection {mmdet_side.VERSION} ships no config {name}.py"}
    row["config"] = str(path.relative_to(mmdet_side.config_dir()))
    mcfg = mmdet_side.load_config(path)
    stages = _stages(name, cfg, mcfg, images, seed=seed, plain=plain)
    if isinstance(stages, str):
        return {**row, "status": "cannot build", "reason": stages}
    row.update(stages=[s.to_dict() for s in stages], ok=all(s.ok for s in stages))
    applied = mmdet_side.recorded_deviations(cfg.notes)
    if not row["ok"] and applied:
        for quirk in applied:
            mmdet_side.DEVIATIONS[quirk].apply(mcfg, cfg)
        again = _stages(name, cfg, mcfg, images, seed=seed, plain=plain)
        edits = [mmdet_side.DEVIATIONS[q].what for q in applied]
        row["with_deviations"] = (
            {"applied": applied, "edits": edits, "ok": False, "reason": again, "stages": []} if isinstance(again, str)
            else {"applied": applied, "edits": edits, "ok": all(s.ok for s in again), "stages": [s.to_dict() for s in again]}
        )  # fmt: skip
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _stages(name: str, cfg: DetectorConfig, mcfg: Any, images: list[Image], *, seed: int, plain: bool) -> list[StageResult] | str:
    """Every stage of one comparison of our model with the model of `mcfg`; a string: why
    MMDetection's model could not be built."""
    try:
        theirs = mmdet_side.build_model(mcfg, seed=seed)
    except Exception as exc:  # noqa: BLE001 - any failure to build is the reason, recorded as such
        return f"{type(exc).__name__}: {exc}"
    classes = _classes(mcfg, cfg.num_classes)
    packed, decoded = _packed(_pipeline(mcfg), images, cfg.num_classes)
    mmdet_side.calibrate_norms(theirs, packed)
    ours = build_detector(cfg)
    if plain:
        set_fold_bn_(ours, "off")
        ours.cpu_channels_last = ours.cpu_channels_last_train = False
    stages: list[StageResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{name}.pth"
        mmdet_side.save_checkpoint(theirs, ckpt, classes)
        try:
            report = load_detector(ours, ckpt, cfg=cfg, classes=classes)
            strict = not (report.skipped or report.ignored or report.kept)
            stages.append(StageResult(stage="state_dict", worst=0.0, ok=strict,
                                      detail=f"{len(report.loaded)} tensors loaded" + ("" if strict else f"; {report.summary()}")))
        except WeightsError as exc:
            return [StageResult(stage="state_dict", worst=float("inf"), ok=False, detail=str(exc))]
    mine, ref = count_parameters(ours), count_parameters(theirs)
    stages.append(StageResult(stage="params", worst=0.0 if mine == ref else float("inf"), ok=mine == ref,
                              detail=f"total / trainable {mine[0]:,} / {mine[1]:,} vs {ref[0]:,} / {ref[1]:,}"))
    stages.append(recipe_stage(cfg, mcfg))
    stages.append(pipeline_stage(images, decoded, packed, cfg))
    stages += eval_stages(ours, theirs, packed)
    stages.append(loss_stage(ours, theirs, packed, mmdet_side.deterministic_sampling()))
    return stages
