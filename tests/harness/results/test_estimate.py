"""harness.results.estimate: the GPU-hours arithmetic against a hand-computed example, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.matrix.parse import load_matrix
from harness.matrix.spec import MatrixSpec
from harness.results.estimate import (
    COCO_TRAIN_IMAGES,
    estimate,
    format_estimate,
    gpu_hours,
    summary_line,
    unit,
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


def _measured(runs_dir: Path, cell: str, *, profile: str, device_class: str = "H200", spec_run: dict[str, object] | None = None,
              rate: float = 20.0) -> Path:
    """A finished run with a whole-loop throughput of `rate` images/s and its spec.json's run section."""
    folder = write_run(runs_dir, cell, profile=profile, device_class=device_class)
    result = json.loads((folder / "result.json").read_text())
    result["metrics"].update(train_images_per_s=rate, s_per_iter=0.1, total_batch=2, world_size=1)
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "spec.json").write_text(json.dumps({"config": {}, "run": spec_run or {"image_scale": None, "proposal_cap": None}}))
    return folder


def test_runs_that_do_not_train_as_the_recipe_are_left_out(matrix: MatrixSpec, tmp_path: Path) -> None:
    """A 160x128 or proposal-capped run measures another workload than the full recipe's epoch."""
    _measured(tmp_path, R50, profile="hardware")
    _measured(tmp_path, "faster-rcnn_r50_fpn_2x_coco", profile="hardware", spec_run={"image_scale": [160, 128]}, rate=500.0)
    _measured(tmp_path, "faster-rcnn_r101_fpn_1x_coco", profile="hardware", spec_run={"proposal_cap": 64}, rate=500.0)
    df = estimate(matrix, "hardware", tmp_path).set_index("name")
    assert df.loc[R50, "gpu_hours"] == pytest.approx(12 * COCO_TRAIN_IMAGES / 20 / 3600)
    assert df["gpu_hours"].notna().sum() == 1
    assert "160x128" in df.loc["faster-rcnn_r50_fpn_2x_coco", "left_out"]
    assert "capped at 64" in df.loc["faster-rcnn_r101_fpn_1x_coco", "left_out"]
    assert pd.isna(df.loc[R50, "left_out"])
    text = format_estimate(df.reset_index(), gpus=8)
    assert "left out: 2 cell(s)" in text and "1 measured cell" in text


def test_a_profile_with_no_recipe_scale_run_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _measured(tmp_path, R50, profile="smoke", device_class="cpu", spec_run={"image_scale": [160, 128], "proposal_cap": 64})
    assert main(["estimate", "faster_rcnn", "--profile", "smoke", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "160x128" in err and "--profile hardware" in err


def test_no_runs_at_all_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "faster_rcnn", "--runs-dir", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no run of faster_rcnn / hardware" in err


def test_cpu_runs_are_counted_in_cpu_hours(matrix: MatrixSpec, tmp_path: Path) -> None:
    _measured(tmp_path, R50, profile="hardware", device_class="cpu", rate=0.5)
    df = estimate(matrix, "hardware", tmp_path)
    assert unit(df) == "CPU"
    text = format_estimate(df, gpus=8)
    assert "CPU-hours" in text and "GPU-hours" not in text
    line = summary_line(df)
    assert line is not None and "CPU-hours" in line
