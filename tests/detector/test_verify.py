"""detector.verify: a checkpoint saved from a model, evaluated on a tiny synthetic COCO root."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from detector.config import DetectorConfig
from detector.data.synth import make_synthetic_coco
from detector.errors import WeightsError
from detector.model.faster_rcnn import build_detector
from detector.verify import verify


def test_verify_end_to_end(tmp_path: Path) -> None:
    root = make_synthetic_coco(tmp_path / "data", images=1, val_images=2, size=(96, 64), seed=0)
    ann = json.loads((Path(root) / "annotations/instances_val2017.json").read_text())
    classes = tuple(c["name"] for c in sorted(ann["categories"], key=lambda c: c["id"]))
    cfg = dataclasses.replace(DetectorConfig(), data=dataclasses.replace(DetectorConfig().data, scale=(96, 64)))
    model = build_detector(cfg)  # a freshly initialised model, as if trained: its file is "published"
    ckpt = tmp_path / "published.pth"
    torch.save({"meta": {"CLASSES": classes}, "state_dict": model.state_dict()}, ckpt)
    out = verify(cfg, checkpoint=ckpt, data_root=root, workers=0)
    assert out["eval_split"] == "val2017" and out["images"] == 2 and out["classes_checked"] is True
    stats = {k: v for k, v in out.items() if k.startswith("bbox_")}
    assert len(stats) == 12 and all(-1.0 <= v <= 1.0 for v in stats.values())
    assert out["box_ap"] == round(out["bbox_mAP"] * 100, 1)
    assert list(out["per_category"]) == list(classes)  # mmdet's classwise table, every category in id order
    bad = tmp_path / "reversed.pth"
    torch.save({"meta": {"CLASSES": classes[::-1]}, "state_dict": model.state_dict()}, bad)
    with pytest.raises(WeightsError, match="class order"):
        verify(cfg, checkpoint=bad, data_root=root, workers=0, max_images=1)
