"""harness.results.collect: runs -> one row per (cell, seed), published numbers joined, "not run" placeholders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from harness.matrix.parse import load_matrix
from harness.matrix.spec import MatrixSpec
from harness.results.collect import (
    COLUMNS,
    RESULTS_CSV_COLUMNS,
    collect,
    load_loss_curves,
    loss_trends,
)
from tests.resources.fake_runs import R50, write_run

DESIGN_CSV_COLUMNS = ("name", "profile", "seed", "status", "box_ap", "mem_gb", "fps", "published_box_ap",
                      "delta_box_ap", "verdict")


@pytest.fixture(scope="module")
def matrix() -> MatrixSpec:
    return load_matrix("faster_rcnn")


def test_one_row_per_cell_and_seed_in_matrix_order(matrix: MatrixSpec, tmp_path: Path) -> None:
    for seed, ap in enumerate((37.3, 37.5, 37.2)):
        write_run(tmp_path, R50, seed=seed, box_ap=ap)
    write_run(tmp_path, "faster-rcnn_r101_fpn_1x_coco", box_ap=39.0)
    df = collect(matrix, "full", tmp_path)

    assert len(df) == len(matrix.cells) - 2 + 3 + 1
    assert list(dict.fromkeys(df["name"])) == [c.name for c in matrix.cells]
    assert set(COLUMNS) <= set(df.columns) and set(DESIGN_CSV_COLUMNS) <= set(RESULTS_CSV_COLUMNS)
    r50 = df[df["name"] == R50]
    assert list(r50["seed"]) == [0, 1, 2]
    assert list(r50["box_ap"]) == [37.3, 37.5, 37.2]
    assert (r50["published_box_ap"] == 37.4).all() and (r50["published_mem_gb"] == 4.0).all()
    assert list(r50["delta_box_ap"]) == pytest.approx([-0.1, 0.1, -0.2])
    assert (r50["backbone"] == "r50").all() and (r50["neck"] == "fpn").all()  # axes columns
    assert r50["git_commit"].iloc[0] == "0123456789abcdef0123" and r50["torch_version"].iloc[0] == "2.14.0"


def test_cells_without_result_are_not_run(matrix: MatrixSpec, tmp_path: Path) -> None:
    df = collect(matrix, "full", tmp_path / "empty")
    assert len(df) == len(matrix.cells)
    assert (df["status"] == "not run").all() and (df["verdict"] == "not run").all()
    assert df["seed"].isna().all() and df["box_ap"].isna().all()
    c4 = df[df["name"] == "faster-rcnn_r50-caffe_c4-1x_coco"].iloc[0]
    assert c4["published_box_ap"] == 35.6 and math.isnan(c4["published_mem_gb"])


def test_cells_outside_the_profile_say_so(matrix: MatrixSpec, tmp_path: Path) -> None:
    df = collect(matrix, "ci", tmp_path)
    ci_cells = {c.name for c in matrix.select(matrix.profile("ci").cells)}
    outside = df[~df["name"].isin(ci_cells)]
    inside = df[df["name"].isin(ci_cells)]
    assert (outside["reason"] == "not in profile ci").all()
    assert (inside["reason"] == "no result.json yet").all()


def test_failed_and_skipped_runs(matrix: MatrixSpec, tmp_path: Path) -> None:
    write_run(tmp_path, R50, status="failed", error="Traceback (most recent call last):\n  ...\nRuntimeError: loss is nan")
    write_run(tmp_path, "faster-rcnn_r101_fpn_1x_coco", status="skipped")
    df = collect(matrix, "full", tmp_path).set_index("name")
    assert df.loc[R50, "status"] == "failed" and df.loc[R50, "verdict"] == "fail"
    assert df.loc[R50, "verdict_reason"] == "run failed: RuntimeError: loss is nan"
    assert math.isnan(df.loc[R50, "box_ap"])  # a failed run's numbers are not results
    assert df.loc["faster-rcnn_r101_fpn_1x_coco", "verdict"] == "not run"
    assert df.loc["faster-rcnn_r101_fpn_1x_coco", "verdict_reason"].startswith("skipped")


def test_notes_come_from_result_json_else_the_recipe(matrix: MatrixSpec, tmp_path: Path) -> None:
    write_run(tmp_path, "faster-rcnn_r101-caffe_fpn_ms-3x_coco", notes=["Q2: as written by the run"])
    df = collect(matrix, "full", tmp_path).set_index("name")
    assert df.loc["faster-rcnn_r101-caffe_fpn_ms-3x_coco", "notes"] == ("Q2: as written by the run",)
    assert df.loc["faster-rcnn_r101-caffe_fpn_ms-3x_coco", "quirks"] == "Q2"
    # Not run: the resolved recipe's notes (Q5 and the FP16 loss-scale note on the amp cell).
    assert df.loc["faster-rcnn_r50_fpn_amp-1x_coco", "quirks"] == "Q5 FP16"
    assert df.loc["faster-rcnn_r50-caffe_fpn_ms-2x_coco", "quirks"] == "Q1"
    assert any(n.startswith("Q1:") for n in matrix.cell("faster-rcnn_r50-caffe-dc5_ms-3x_coco").recipe_notes)


def test_alias_names_and_unknown_folders(matrix: MatrixSpec, tmp_path: Path) -> None:
    folder = write_run(tmp_path, R50, box_ap=37.0)
    result = json.loads((folder / "result.json").read_text())
    result["name"] = "faster_rcnn_r50_fpn_1x_coco"  # the v2 name, an alias of the cell
    (folder / "result.json").write_text(json.dumps(result))
    write_run(tmp_path, "faster-rcnn_r18_removed_coco")  # a cell no longer in the matrix
    df = collect(matrix, "full", tmp_path)
    assert len(df) == len(matrix.cells)
    assert df.set_index("name").loc[R50, "box_ap"] == 37.0


def test_data_root_and_image_scale_from_spec(matrix: MatrixSpec, tmp_path: Path) -> None:
    write_run(tmp_path, R50, data_root="/data/coco")
    row = collect(matrix, "full", tmp_path).set_index("name").loc[R50]
    assert row["data_root"] == "/data/coco" and row["image_scale"] == (160, 128)


def test_unknown_profile_is_a_user_error(matrix: MatrixSpec, tmp_path: Path) -> None:
    from harness.errors import UserError

    with pytest.raises(UserError, match="unknown profile 'nope'"):
        collect(matrix, "nope", tmp_path)


def test_load_loss_curves_skips_non_loss_and_cut_lines(matrix: MatrixSpec, tmp_path: Path) -> None:
    write_run(tmp_path, R50, losses=[3.0, 2.0, 1.5])
    write_run(tmp_path, R50, seed=1, losses=[2.5, 2.0])
    write_run(tmp_path, "faster-rcnn_r101_fpn_1x_coco")  # no log.jsonl
    curves = load_loss_curves(collect(matrix, "full", tmp_path))
    assert list(curves.columns) == ["name", "seed", "iter", "loss"]
    assert len(curves) == 5
    seed0 = curves[(curves["name"] == R50) & (curves["seed"] == 0)]
    assert list(seed0["iter"]) == [1, 2, 3] and list(seed0["loss"]) == [3.0, 2.0, 1.5]
    assert load_loss_curves(collect(matrix, "full", tmp_path / "none")).empty
    assert isinstance(curves, pd.DataFrame)


def test_loss_trends_average_the_first_and_last_quarter() -> None:
    points = [("a", 0, i + 1, loss) for i, loss in enumerate([5.0, 4.0, 9.0, 3.0, 2.0, 2.5, 1.0, 0.5])]
    points += [("b", 0, 1, 2.0), ("b", 0, 2, 3.0)]  # rose
    points += [("c", 0, 1, 2.0)]  # one point: no trend
    trends = loss_trends(pd.DataFrame(points, columns=["name", "seed", "iter", "loss"]).sample(frac=1, random_state=0))
    assert list(trends.columns) == ["name", "seed", "loss_start", "loss_end", "fell"]
    by_name = {r["name"]: r for r in trends.to_dict(orient="records")}
    assert set(by_name) == {"a", "b"}
    # 8 points: quarters of 2, in iteration order whatever the row order; the spike at 3 is not in them
    assert (by_name["a"]["loss_start"], by_name["a"]["loss_end"], by_name["a"]["fell"]) == (4.5, 0.75, True)
    assert (by_name["b"]["loss_start"], by_name["b"]["loss_end"], by_name["b"]["fell"]) == (2.0, 3.0, False)
    assert loss_trends(pd.DataFrame(columns=["name", "seed", "iter", "loss"])).empty


def test_training_throughput_leaves_out_the_first_logged_window(tmp_path: Path) -> None:
    """The first window holds cuDNN autotuning and worker start-up: 10 iterations, 1.4 s then 0.05 s
    each at a total batch of 2 -> 18 images over 0.45 s = 40 images/s (not 20 / 1.85 s)."""
    from harness.matrix.parse import load_matrix
    from harness.results.collect import collect

    folder = write_run(tmp_path, R50, profile="hardware", device_class="H200")
    rows = [{"iter": i, "loss": 1.0, "time": 1.4 if i == 1 else 0.05} for i in range(1, 11)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = json.loads((folder / "result.json").read_text())
    result["metrics"]["total_batch"] = 2
    (folder / "result.json").write_text(json.dumps(result))
    row = collect(load_matrix("faster_rcnn"), "hardware", tmp_path).set_index("name").loc[R50]
    assert row["train_images_per_s"] == pytest.approx(40.0) and row["s_per_iter"] == pytest.approx(0.05)
