"""harness.results.compare / harness.results.verdicts: every verdict reached, the seed interval, the exit code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from detector.api import COCO_CATEGORIES
from harness.matrix.parse import load_matrix
from harness.matrix.spec import MatrixSpec
from harness.metrics import ap_verdict
from harness.results.compare import (
    COMPARE_COLUMNS,
    compare,
    comparison_exit_code,
    comparison_records,
    format_comparison,
    summary_counts,
)
from harness.results.verdicts import interval95, quirk_ids, t_critical
from tests.resources.fake_runs import R50, write_run

R101 = "faster-rcnn_r101_fpn_1x_coco"  # published: Mem 6.0, fps 15.6, box AP 39.4


@pytest.fixture(scope="module")
def matrix() -> MatrixSpec:
    return load_matrix("faster_rcnn")


def _row(matrix: MatrixSpec, runs: Path, name: str = R50, profile: str = "full") -> dict:
    df = compare(matrix, profile, runs)
    assert list(df.columns) == list(COMPARE_COLUMNS) and len(df) == len(matrix.cells)
    return df.set_index("name").loc[name].to_dict()


@pytest.mark.parametrize(
    ("box_ap", "verdict"),
    [(37.4, "pass"), (37.2, "pass"), (37.6, "pass"), (37.1, "warn"), (37.7, "warn"), (37.0, "fail"), (37.9, "fail")],
)
def test_box_ap_bands_single_run(matrix: MatrixSpec, tmp_path: Path, box_ap: float, verdict: str) -> None:
    write_run(tmp_path, R50, box_ap=box_ap)
    row = _row(matrix, tmp_path)
    assert row["ap_verdict"] == verdict and row["verdict"] == verdict
    assert row["delta_box_ap"] == pytest.approx(box_ap - 37.4)
    assert row["n_seeds"] == 1 and math.isnan(row["box_ap_std"])


@pytest.mark.parametrize(("mem_gb", "mem_kind", "verdict"), [
    (4.4, "cuda_max_allocated", "pass"),        # +10%: inside
    (3.6, "cuda_max_allocated", "pass"),        # -10%
    (1.0, "cuda_max_allocated", "pass"),        # -75%: one-sided, using less is no regression
    (4.5, "cuda_max_allocated", "fail"),        # +12.5%
    (9.0, "cpu_peak_rss", "not comparable"),    # CPU RSS is another quantity
])
def test_memory_rule(matrix: MatrixSpec, tmp_path: Path, mem_gb: float, mem_kind: str, verdict: str) -> None:
    write_run(tmp_path, R50, mem_gb=mem_gb, mem_kind=mem_kind)
    row = _row(matrix, tmp_path)
    assert row["mem_verdict"] == verdict
    assert row["verdict"] == ("fail" if verdict == "fail" else "pass")
    if verdict == "not comparable":
        assert "cpu_peak_rss" in row["reason"]


@pytest.mark.parametrize(("fps", "device_class", "verdict", "comparable"), [
    (23.0, "V100", "pass", True),
    (30.0, "V100", "warn", True),                 # +40%: fps only ever warns
    (60.0, "H200", "not comparable", False),
])
def test_fps_only_on_the_published_device_class(matrix: MatrixSpec, tmp_path: Path, fps: float, device_class: str,
                                                verdict: str, comparable: bool) -> None:
    write_run(tmp_path, R50, fps=fps, device_class=device_class)
    row = _row(matrix, tmp_path)
    assert row["fps_verdict"] == verdict and row["fps_comparable"] is comparable
    assert row["verdict"] == ("warn" if verdict == "warn" else "pass")
    if not comparable:
        assert "published on V100" in row["reason"]


def test_toy_profiles_are_not_comparable_with_a_reason(matrix: MatrixSpec, tmp_path: Path) -> None:
    write_run(tmp_path, R50, profile="smoke", box_ap=37.4)
    write_run(tmp_path, R50, profile="ci", box_ap=12.0)
    smoke = _row(matrix, tmp_path, profile="smoke")
    ci = _row(matrix, tmp_path, profile="ci")
    assert smoke["verdict"] == ci["verdict"] == "not comparable"
    assert "toy scale" in smoke["reason"] and "compares against nothing" in smoke["reason"]
    assert "stored baselines" in ci["reason"]


def test_train_split_evaluation_is_not_comparable(matrix: MatrixSpec, tmp_path: Path) -> None:
    write_run(tmp_path, R50, eval_split="train2017")
    row = _row(matrix, tmp_path)
    assert row["verdict"] == "not comparable" and "train2017" in row["reason"]
    assert math.isnan(row["delta_box_ap"])  # no delta beside an AP that is not compared


def test_a_dataset_s_own_categories_are_not_comparable(matrix: MatrixSpec, tmp_path: Path) -> None:
    """`--classes dataset` on another dataset: an AP near the published one is not a pass (nor a fail)."""
    write_run(tmp_path, R50, box_ap=37.3, categories=["widget", "gizmo", "sprocket"])
    write_run(tmp_path, R101, box_ap=39.4, categories=[name for _id, name, _s in COCO_CATEGORIES][::-1])
    own, coco = _row(matrix, tmp_path), _row(matrix, tmp_path, R101)
    assert own["verdict"] == own["ap_verdict"] == "not comparable" and math.isnan(own["delta_box_ap"])
    assert "trained 3 categories of its own (widget, gizmo, sprocket), not the recipe's 80" in own["reason"]
    assert own["other_categories"] == "3 categories of its own (widget, gizmo, sprocket), not the recipe's 80"
    assert coco["ap_verdict"] == "pass" and not isinstance(coco["other_categories"], str)  # COCO's 80, in another label order


@pytest.mark.parametrize(("images", "ap_verdict"), [(5000, "pass"), (500, "not comparable"), (None, "pass")])
def test_box_ap_over_part_of_val2017_is_not_compared(matrix: MatrixSpec, tmp_path: Path, images: int | None,
                                                     ap_verdict: str) -> None:
    """A val2017 of 500 images (a user's subset) is not the published experiment; Mem is still judged
    (None: a run recorded before the count was, judged as before)."""
    write_run(tmp_path, R50, box_ap=37.4, mem_gb=4.5, eval_images=images)
    row = _row(matrix, tmp_path)
    assert row["ap_verdict"] == ap_verdict and row["mem_verdict"] == "fail" and row["verdict"] == "fail"
    if ap_verdict == "not comparable":
        assert "box AP over 500 images; the published box AP is over the 5,000 of COCO val2017" in row["reason"]
        assert math.isnan(row["delta_box_ap"])


def test_not_run_and_failed_cells(matrix: MatrixSpec, tmp_path: Path) -> None:
    write_run(tmp_path, R50, status="failed", error="RuntimeError: CUDA out of memory")
    write_run(tmp_path, R50, seed=1, box_ap=37.4)
    df = compare(matrix, "full", tmp_path).set_index("name")
    assert df.loc[R50, "verdict"] == "fail" and df.loc[R50, "status"] == "failed"
    assert "1 of 2 seed(s) failed" in df.loc[R50, "reason"] and "out of memory" in df.loc[R50, "reason"]
    assert df.loc[R101, "verdict"] == "not run" and df.loc[R101, "reason"] == "no result.json yet"
    # A failed run fails even on the smoke profile: the cell does not work at all.
    write_run(tmp_path, R50, profile="smoke", status="failed", error="boom")
    assert _row(matrix, tmp_path, profile="smoke")["verdict"] == "fail"


def test_a_finished_run_without_box_ap_fails(matrix: MatrixSpec, tmp_path: Path) -> None:
    folder = write_run(tmp_path, R50)
    result = json.loads((folder / "result.json").read_text())
    del result["metrics"]["box_ap"]
    (folder / "result.json").write_text(json.dumps(result))
    row = _row(matrix, tmp_path)
    assert row["verdict"] == "fail" and "without a box AP" in row["reason"]


def test_seed_interval_matches_a_hand_computation(matrix: MatrixSpec, tmp_path: Path) -> None:
    for seed, ap in enumerate((37.3, 37.5, 37.4)):
        write_run(tmp_path, R50, seed=seed, box_ap=ap)
    row = _row(matrix, tmp_path)
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    assert row["n_seeds"] == 3
    assert row["box_ap"] == pytest.approx(37.4) and row["box_ap_std"] == pytest.approx(0.1)
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((37.4 - half, 37.4 + half))
    # The mean is spot on, but 3 seeds leave an interval wider than the pass band: warn, not pass.
    assert row["verdict"] == "warn" and "95% interval" in row["reason"]


def test_seed_interval_pass_and_fail(matrix: MatrixSpec, tmp_path: Path) -> None:
    for seed, ap in enumerate([37.35, 37.45] * 5):
        write_run(tmp_path / "tight", R50, seed=seed, box_ap=ap)
    assert _row(matrix, tmp_path / "tight")["verdict"] == "pass"
    for seed, ap in enumerate((36.9, 37.0, 36.95)):
        write_run(tmp_path / "low", R50, seed=seed, box_ap=ap)
    assert _row(matrix, tmp_path / "low")["verdict"] == "fail"


def test_t_table_and_interval_helpers() -> None:
    assert t_critical(1) == 12.706 and t_critical(2) == 4.303 and t_critical(30) == 2.042
    assert t_critical(31) == 1.96 and t_critical(1000) == 1.96
    with pytest.raises(ValueError):
        t_critical(0)
    mean, std, low, high = interval95([37.0])
    assert (mean, low, high) == (37.0, 37.0, 37.0) and math.isnan(std)
    assert ap_verdict(37.15, 37.65, 37.4, pass_band=0.2, warn_band=0.3) == "warn"
    assert ap_verdict(37.75, 38.0, 37.4, pass_band=0.2, warn_band=0.3) == "fail"
    assert quirk_ids(["Q5: a", "FP16: b", "plain: c", "Q5: again"]) == ("Q5", "FP16")


def test_exit_code(matrix: MatrixSpec, tmp_path: Path) -> None:
    assert comparison_exit_code(compare(matrix, "full", tmp_path)) == 0  # all "not run"
    write_run(tmp_path, R50, box_ap=37.1)  # warn
    write_run(tmp_path, R101, box_ap=39.4, mem_gb=6.0, fps=60.0, device_class="H200")  # pass (fps not comparable)
    assert comparison_exit_code(compare(matrix, "full", tmp_path)) == 0
    write_run(tmp_path, "faster-rcnn_r50_fpn_2x_coco", box_ap=30.0)  # fail
    df = compare(matrix, "full", tmp_path)
    assert comparison_exit_code(df) == 1
    assert summary_counts(df) == {"pass": 1, "warn": 1, "fail": 1, "not comparable": 0, "not run": len(matrix.cells) - 3}


def test_quirk_notes_stay_in_the_frame(matrix: MatrixSpec, tmp_path: Path) -> None:
    write_run(tmp_path, "faster-rcnn_r101-caffe_fpn_ms-3x_coco", notes=["Q2: caffe normalisation kept"])
    df = compare(matrix, "full", tmp_path).set_index("name")
    assert df.loc["faster-rcnn_r101-caffe_fpn_ms-3x_coco", "notes"] == ("Q2: caffe normalisation kept",)
    assert df.loc[R50, "quirks"] == "Q5"
    assert "Q1" in df.loc["faster-rcnn_r50-caffe_fpn_ms-2x_coco", "quirks"]
    assert df.loc["faster-rcnn_r50_fpn_amp-1x_coco", "quirks"] == "Q5 FP16"


def test_format_and_records(matrix: MatrixSpec, tmp_path: Path) -> None:
    write_run(tmp_path, R50, box_ap=37.0)
    df = compare(matrix, "full", tmp_path)
    text = format_comparison(df)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["cell", "seeds", "box"]
    r50 = next(line for line in lines if line.startswith(R50))
    assert "[Q5]" in r50 and "37.0" in r50 and "-0.4" in r50 and "fail" in r50
    assert lines[-1] == f"{len(matrix.cells)} cells: 0 pass, 0 warn, 1 fail, 0 not comparable, {len(matrix.cells) - 1} not run"
    records = comparison_records(df)
    back = json.loads(json.dumps(records, allow_nan=False))  # NaN would not survive allow_nan=False
    r = next(x for x in back if x["name"] == R50)
    assert r["box_ap"] == 37.0 and r["box_ap_std"] is None and r["verdict"] == "fail" and isinstance(r["notes"], list)


def test_hardware_profile_compares_mem_and_fps_not_ap(matrix: MatrixSpec, tmp_path: Path) -> None:
    # A full-scale hardware run on an H200: Mem judged one-sided, fps shown but another device class,
    # AP from 10 iterations not compared and its delta left blank.
    write_run(tmp_path, R50, profile="hardware", box_ap=0.0, mem_gb=2.5, fps=31.5, device_class="H200")
    row = _row(matrix, tmp_path, profile="hardware")
    assert (row["ap_verdict"], row["mem_verdict"], row["fps_verdict"]) == ("not comparable", "pass", "not comparable")
    assert row["verdict"] == "pass" and math.isnan(row["delta_box_ap"])
    assert row["delta_mem_rel"] == pytest.approx(2.5 / 4.0 - 1)
    write_run(tmp_path, R50, profile="hardware", box_ap=0.0, mem_gb=4.5, fps=31.5, device_class="H200")
    row = _row(matrix, tmp_path, profile="hardware")
    assert row["verdict"] == "fail" and "more than 10% above the published" in row["reason"]


def test_smoke_verdicts_agree_in_json(matrix: MatrixSpec, tmp_path: Path) -> None:
    """A toy profile: every per-metric verdict says "not comparable" like the cell's (not "fail")."""
    write_run(tmp_path, R50, profile="smoke", box_ap=0.0, mem_kind="cpu_peak_rss", device_class="cpu")
    rec = next(r for r in comparison_records(compare(matrix, "smoke", tmp_path)) if r["name"] == R50)
    assert {rec["verdict"], rec["ap_verdict"], rec["mem_verdict"], rec["fps_verdict"]} == {"not comparable"}
    assert rec["delta_box_ap"] is None
