"""Recorded deviations applied to MMDetection's config (no MMDetection needed: the edit is of a mapping),
and the BN calibration (a stand-in detector)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from detector.parity.mmdet_side import CALIBRATION_PROPOSALS, DEVIATIONS, calibrate_norms, recorded_deviations
from detector.recipes import resolve

R101_CAFFE_MS3X = {"backbone": "r101", "style": "caffe", "schedule": "3x", "train_scale": "ms-range"}


def test_q2_is_the_recorded_deviation_of_the_r101_caffe_3x_cell_only() -> None:
    assert recorded_deviations(resolve(R101_CAFFE_MS3X).notes) == ["Q2"]
    assert recorded_deviations(resolve({}).notes) == []
    assert recorded_deviations(["Q5: old defaults", "FP16: static scale", "Q2: caffe normalisation", "see Q2: no"]) == ["Q2"]


def test_q2_gives_mmdetections_preprocessor_the_cells_caffe_normalisation() -> None:
    cfg = resolve(R101_CAFFE_MS3X)
    # What MMDetection 3.3.0's config of that name ships: the pytorch preprocessor (its bug, quirk Q2).
    shipped = {"type": "DetDataPreprocessor", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
               "bgr_to_rgb": True, "pad_size_divisor": 32}
    mcfg = SimpleNamespace(model=SimpleNamespace(data_preprocessor=dict(shipped)))
    DEVIATIONS["Q2"].apply(mcfg, cfg)
    # mmdet's caffe preprocessor (e.g. faster-rcnn_r50-caffe_fpn_1x_coco.py): BGR mean, std 1, no flip.
    assert mcfg.model.data_preprocessor == {**shipped, "mean": [103.53, 116.28, 123.675], "std": [1.0, 1.0, 1.0],
                                            "bgr_to_rgb": False}


class _Detector(nn.Module):
    """What `calibrate_norms` touches of an MMDetection two-stage detector."""

    with_rpn = True

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.rpn_head = SimpleNamespace(test_cfg=SimpleNamespace(max_per_img=1000))
        self.seen: list[int] = []

    def data_preprocessor(self, packed: dict[str, Any], training: bool) -> dict[str, Any]:
        return {"inputs": packed["inputs"], "data_samples": None}

    def predict(self, inputs: torch.Tensor, _samples: Any) -> None:
        self.seen.append(self.rpn_head.test_cfg.max_per_img)
        self.norm(inputs)


def test_calibration_caps_the_proposals_for_its_pass_only_and_sets_the_statistics() -> None:
    model = _Detector()
    inputs = 3.0 + 2.0 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calibrate_norms(model, {"inputs": inputs})
    assert model.seen == [CALIBRATION_PROPOSALS] and model.rpn_head.test_cfg.max_per_img == 1000
    assert torch.allclose(model.norm.running_mean, inputs.mean(dim=(0, 2, 3)))
    assert not model.norm.training and model.norm.momentum == 0.1
