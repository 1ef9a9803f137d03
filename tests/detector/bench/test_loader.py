"""The data-pipeline rate: the real training loader over a generated COCO root, per worker count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detector.bench import loader
from detector.config import DetectorConfig, RunConfig
from detector.data import coco as D
from detector.data.synth import make_synthetic_coco
from detector.model.faster_rcnn import build_detector
from detector.recipes import resolve


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("coco") / "root", images=6, seed=0)


def test_rates_per_worker_count_and_json(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "loader.json"
    # 6 images in batches of 2: 3 batches an epoch, so 1 + 1 + 5 batches cross epochs.
    assert loader.main(["--data", str(root), "--workers", "0,1", "--batches", "5", "--skip", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["workers"] for r in doc["rows"]] == [0, 1]
    assert all(r["images"] == 10 and r["images_per_s"] > 0 for r in doc["rows"])
    assert "0 workers" in capsys.readouterr().out


def test_synthetic_source_needs_no_dataset(tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    assert loader.main(["--synthetic", "4", "--workers", "0", "--batches", "2", "--skip", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["data"].startswith("synthetic: 4") and doc["rows"][0]["images"] == 4


def test_batches_are_uint8_as_decoded(root: Path) -> None:
    """The loader hands uint8 images on (a quarter of the bytes to pin and copy); the model
    normalises them to the same batch as float copies of them (caffe-style BGR flip included)."""
    run = RunConfig(data_root=str(root), val_ann=None)
    cfg = DetectorConfig()
    images, _, _ = next(iter(D.build_train_loader(D.build_dataset(cfg, run, train=True), 2, 0, 0)))
    assert all(im.dtype == torch.uint8 for im in images)
    for model in (build_detector(cfg), build_detector(resolve({"style": "caffe"}))):
        a, b = model.preprocess(images)[0], model.preprocess([im.float() for im in images])[0]
        assert torch.equal(a, b)


@pytest.mark.parametrize("argv, message", [(["--workers", "a"], "--workers: 'a'"), (["--batches", "0"], "--batches"),
                                            (["--ann", "nope.json"], "is not a file")])  # fmt: skip
def test_bad_options_are_one_line(root: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        loader.main(["--data", str(root), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
