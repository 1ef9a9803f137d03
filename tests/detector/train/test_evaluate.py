from __future__ import annotations

import pytest
import torch

from detector.train import evaluate
from tests.resources.fakes_engine import TinyDetector, TinySource

CPU = torch.device("cpu")


def test_predict_returns_cpu_detections_in_original_size() -> None:
    model, source = TinyDetector(), TinySource()
    outputs, metas = evaluate.predict(model, source.eval_batches(), device=CPU)
    assert len(outputs) == len(metas) == 12 and model.training  # mode restored
    assert set(outputs[0]) == {"boxes", "scores", "labels"} and outputs[0]["boxes"].shape == (1, 4)
    assert (outputs[0]["boxes"] <= 16).all()


def test_original_size_reads_either_meta_key_and_names_a_missing_one() -> None:
    assert evaluate.original_size({"orig_size": (480, 640)}) == (480, 640)
    assert evaluate.original_size({"original_size": torch.tensor([480, 640])}) == (480, 640)
    with pytest.raises(KeyError, match="orig_size"):
        evaluate.original_size({"image_id": 1})
