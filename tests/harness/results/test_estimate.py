"""harness.results.estimate: the GPU-hours arithmetic against a hand-computed example, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.matrix.parse import load_matrix
from harness.matrix.spec import MatrixSpec
from harness.results.estimate import (
    COCO_TRAIN_IMAGES,
    estimate,
    gpu_hours,
)
from tests.resources.fake_runs import R50, write_run


@pytest.fixture(scope="module")
def matrix() -> MatrixSpec:
    return load_matrix("faster_rcnn")


def test_gpu_hours_by_hand() -> None:
    # 12 epochs x 117,266 images at 20 images/s = 70,359.6 s = 19.544 GPU-hours.
    assert gpu_hours(epochs=12, images=117_266, images_per_s=20.0) == pytest.approx(12 * 117_266 / 20 / 3600)
    assert gpu_hours(epochs=12, images=117_266, images_per_s=20.0) == pytest.approx(19.544333, rel=1e-6)
    with pytest.raises(ValueError):
        gpu_hours(epochs=1, images=1, images_per_s=0.0)


def test_recipe_epochs_include_repeat_dataset(matrix: MatrixSpec) -> None:
    assert matrix.cell(R50).epochs == 12
    assert matrix.cell("faster-rcnn_r50_fpn_2x_coco").epochs == 24
    assert matrix.cell("faster-rcnn_r50_fpn_ms-3x_coco").epochs == 36


def test_estimate_from_runs_and_cli(matrix: MatrixSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_run(tmp_path, R50, profile="hardware", device_class="H200")
    result = json.loads((folder / "result.json").read_text())
    result["metrics"].update(train_images_per_s=20.0, s_per_iter=0.1, total_batch=2, world_size=1)
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "log.jsonl").unlink(missing_ok=True)  # the whole-loop rate from metrics.json
    df = estimate(matrix, "hardware", tmp_path, gpus=8).set_index("name")
    assert df.loc[R50, "gpu_hours"] == pytest.approx(12 * COCO_TRAIN_IMAGES / 20 / 3600)
    assert df.loc[R50, "wall_hours"] == pytest.approx(df.loc[R50, "gpu_hours"] / 8)
    assert df["gpu_hours"].notna().sum() == 1
    assert main(["estimate", "faster_rcnn", "--runs-dir", str(tmp_path), "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "19.5" in out and "1 measured cell" in out and "on 4 GPUs" in out
