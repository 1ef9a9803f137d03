"""harness.publish.metafile: OpenMMLab metafile of the published and of the measured results; yaml.safe_load parses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.matrix.parse import load_matrix
from harness.matrix.spec import MatrixSpec
from harness.publish.metafile import (
    measured_metafile,
    published_metafile,
    write_metafile,
)
from harness.results.collect import collect
from harness.results.compare import compare
from tests.resources.fake_runs import R50, write_run


@pytest.fixture(scope="module")
def matrix() -> MatrixSpec:
    return load_matrix("faster_rcnn")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_published_metafile_matches_mmdetection_fields(matrix: MatrixSpec, tmp_path: Path) -> None:
    meta = _load(write_metafile(published_metafile(matrix), tmp_path / "metafile.yml"))
    assert [c["Name"] for c in meta["Collections"]] == ["Faster R-CNN"]
    models = {m["Name"]: m for m in meta["Models"]}
    assert list(models) == [c.name for c in matrix.cells]
    r50 = models[R50]
    assert r50["In Collection"] == "Faster R-CNN" and r50["Config"] == f"configs/faster_rcnn/{R50}.py"
    assert r50["Metadata"]["Training Memory (GB)"] == 4.0 and r50["Metadata"]["Epochs"] == 12
    # MMDetection's metafile stores 1000 / README fps, 2 decimals (reference 1.5): 21.4 -> 46.73.
    inf = r50["Metadata"]["inference time (ms/im)"][0]
    assert inf == {"value": 46.73, "hardware": "V100", "backend": "PyTorch", "batch size": 1, "mode": "FP32",
                   "resolution": "(800, 1333)"}
    assert models["faster-rcnn_r50_fpn_amp-1x_coco"]["Metadata"]["inference time (ms/im)"][0]["value"] == 34.72
    assert models["faster-rcnn_r50_fpn_amp-1x_coco"]["Metadata"]["inference time (ms/im)"][0]["mode"] == "FP16"
    assert r50["Results"] == [{"Task": "Object Detection", "Dataset": "COCO", "Metrics": {"box AP": 37.4}}]
    assert r50["Weights"].startswith("https://")
    assert "Training Memory (GB)" not in models["faster-rcnn_r50_fpn_2x_coco"]["Metadata"]  # "-" in the README
    assert models["faster-rcnn_r50_fpn_2x_coco"]["Metadata"]["Epochs"] == 24


def test_recipe_epochs_count_repeats(matrix: MatrixSpec) -> None:
    assert matrix.cell("faster-rcnn_r50_fpn_ms-3x_coco").epochs == 36  # RepeatDataset x3 of 12 (Q4)
    assert matrix.cell("faster-rcnn_r50-caffe-dc5_ms-3x_coco").epochs == 36
    assert matrix.cell("faster-rcnn_r50-caffe_fpn_ms-2x_coco").epochs == 24


def test_measured_metafile_holds_every_ok_cell(matrix: MatrixSpec, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, R50, profile="smoke", box_ap=1.25, fps=4.0, device_class="cpu", mem_kind="cpu_peak_rss", checkpoint=True)
    write_run(runs, R50, profile="smoke", seed=1, box_ap=1.75, fps=4.0, device_class="cpu", mem_kind="cpu_peak_rss")
    write_run(runs, "faster-rcnn_r101_fpn_1x_coco", profile="smoke", box_ap=0.5, device_class="H200")
    write_run(runs, "faster-rcnn_r50_fpn_giou_1x_coco", profile="smoke", status="failed", error="boom")
    frame = collect(matrix, "smoke", runs)
    data = measured_metafile(matrix, compare(matrix, "smoke", runs), frame, synthetic=True, repo=tmp_path)
    meta = _load(write_metafile(data, tmp_path / "out" / "metafile.yml"))
    ok_cells = set(frame.loc[frame["status"] == "ok", "name"])
    models = {m["Name"]: m for m in meta["Models"]}
    assert set(models) == ok_cells == {R50, "faster-rcnn_r101_fpn_1x_coco"}
    r50 = models[R50]
    assert r50["Results"][0]["Metrics"]["box AP"] == 1.5 and r50["Results"][0]["Dataset"] == "Synthetic COCO-format"
    assert r50["Metadata"]["Seeds"] == 2 and r50["Metadata"]["Training Memory kind"] == "cpu_peak_rss"
    inf = r50["Metadata"]["inference time (ms/im)"][0]
    assert inf["value"] == 250.0 and inf["hardware"] == "cpu" and inf["resolution"] == "(800, 1333)"
    assert r50["Weights"] == f"runs/faster_rcnn/smoke/{R50}/checkpoints/latest.pt"
    assert "Weights" not in models["faster-rcnn_r101_fpn_1x_coco"]
    assert models["faster-rcnn_r101_fpn_1x_coco"]["Metadata"]["inference time (ms/im)"][0]["hardware"] == "H200"
