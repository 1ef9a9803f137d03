"""Recorded deviations applied to MMDetection's config (no MMDetection needed: the edit is of a mapping)."""

from __future__ import annotations

from types import SimpleNamespace

from detector.parity.mmdet_side import DEVIATIONS, recorded_deviations
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
