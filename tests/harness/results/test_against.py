"""harness compare --against: two sets of runs of one profile, judged by the matrix's rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from harness.cli import main
from harness.matrix.parse import load_matrix
from harness.matrix.spec import MatrixSpec
from harness.results.against import AGAINST_COLUMNS, compare_against, format_against
from tests.resources.fake_runs import R50, write_run

R101 = "faster-rcnn_r101_fpn_1x_coco"


@pytest.fixture(scope="module")
def matrix() -> MatrixSpec:
    return load_matrix("faster_rcnn")


def _row(matrix: MatrixSpec, now: Path, then: Path, name: str = R50) -> dict:
    df = compare_against(matrix, "full", now, then)
    assert list(df.columns) == list(AGAINST_COLUMNS) and len(df) == len(matrix.cells)
    return df.set_index("name").loc[name].to_dict()


@pytest.mark.parametrize(("now", "verdicts"), [
    ({}, ("pass", "pass", "pass", "pass")),
    ({"box_ap": 37.8}, ("fail", "fail", "pass", "pass")),           # +0.4: beyond the warn band
    ({"box_ap": 37.7}, ("warn", "warn", "pass", "pass")),           # +0.3: the warn band's edge
    ({"box_ap": 37.2}, ("pass", "pass", "pass", "pass")),           # -0.2: the pass band's edge
    ({"mem_gb": 4.8}, ("fail", "pass", "fail", "pass")),            # +20%: more memory than before fails
    ({"mem_gb": 2.4}, ("pass", "pass", "pass", "pass")),            # -40%: one-sided, less is no regression
    ({"fps": 30.0}, ("warn", "pass", "pass", "warn")),              # +40%: speed only ever warns
    ({"device_class": "H200"}, ("pass", "pass", "pass", "not comparable")),
    ({"mem_kind": "cpu_peak_rss"}, ("pass", "pass", "not comparable", "pass")),
])  # fmt: skip
def test_single_runs_are_judged_by_their_point_difference(matrix: MatrixSpec, tmp_path: Path, now: dict,
                                                          verdicts: tuple[str, ...]) -> None:
    write_run(tmp_path / "then", R50, box_ap=37.4)
    write_run(tmp_path / "now", R50, **{"box_ap": 37.4, **now})
    row = _row(matrix, tmp_path / "now", tmp_path / "then")
    assert (row["verdict"], row["ap_verdict"], row["mem_verdict"], row["fps_verdict"]) == verdicts, row["reason"]
    if "mem_gb" in now:
        assert row["delta_mem_rel"] == pytest.approx(now["mem_gb"] / 4.0 - 1)


def test_seeds_give_a_welch_interval_of_the_difference(matrix: MatrixSpec, tmp_path: Path) -> None:
    """Hand computation: means 37.2 and 37.7, variances 0.04 and 0.04 over 3 seeds each: se^2 = 0.02667,
    Welch-Satterthwaite df = 4, t(0.975, 4) = 2.776, half-width 2.776 * 0.1633 = 0.4533."""
    for seed, (a, b) in enumerate(zip((37.0, 37.2, 37.4), (37.5, 37.7, 37.9))):
        write_run(tmp_path / "now", R50, seed=seed, box_ap=a)
        write_run(tmp_path / "then", R50, seed=seed, box_ap=b)
    row = _row(matrix, tmp_path / "now", tmp_path / "then")
    assert row["delta_box_ap"] == pytest.approx(-0.5)
    assert (row["delta_low"], row["delta_high"]) == (pytest.approx(-0.5 - 0.4533, abs=1e-3), pytest.approx(-0.5 + 0.4533, abs=1e-3))
    assert row["ap_verdict"] == "warn"  # the interval reaches inside the warn band: not clearly moved
    assert "box AP moved by -0.50 (95% interval [-0.95, -0.05]), more than 0.2" in row["reason"]
    assert (row["n_seeds"], row["n_seeds_against"]) == (3, 3)


def test_one_sided_cells_failed_runs_and_other_experiments(matrix: MatrixSpec, tmp_path: Path) -> None:
    now, then = tmp_path / "now", tmp_path / "then"
    write_run(then, R50)
    write_run(now, R101)
    assert _row(matrix, now, then)["verdict"] == "not run" and "no finished run here" in _row(matrix, now, then)["reason"]
    assert _row(matrix, now, then, R101)["reason"] == "no finished run in --against"
    write_run(now, R50, status="failed", error="Traceback ...\nRuntimeError: CUDA out of memory")
    row = _row(matrix, now, then)
    assert row["verdict"] == "fail" and row["reason"] == "1 run(s) failed: RuntimeError: CUDA out of memory"
    write_run(now, R50, eval_images=500)
    write_run(then, R50, eval_images=5000)
    row = _row(matrix, now, then)
    assert row["ap_verdict"] == "not comparable" and math.isnan(row["delta_box_ap"])
    assert "box AP scored on another number of images (500 here, 5000 in --against)" in row["reason"]


def test_cli_exit_codes_and_a_mistyped_against(matrix: MatrixSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now, then = tmp_path / "now", tmp_path / "then"
    write_run(then, R50, box_ap=37.4)
    write_run(now, R50, box_ap=37.4)
    args = ["compare", "faster_rcnn", "--profile", "full", "--runs-dir", str(now), "--against"]
    assert main([*args, str(then)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"now      {now}: torch 2.14.0, torchvision 0.29.0, device Tesla V100-SXM2-32GB, commit 0123456789ab")
    assert "37.4 -> 37.4" in out and "1 pass" in out
    write_run(now, R50, box_ap=38.4)
    assert main([*args, str(then), "--format", "json"]) == 1
    assert main([*args, str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"harness: error: --against {tmp_path / 'typo'}: no run of faster_rcnn / full")


def test_per_category_changes_are_shown_largest_first_and_not_judged(matrix: MatrixSpec, tmp_path: Path) -> None:
    """Means over seeds per side, in points; a category scored on only some runs is left out."""
    now, then = tmp_path / "now", tmp_path / "then"
    write_run(then, R50, box_ap=37.4, category_ap={"person": 0.50, "car": 0.30, "toaster": None, "kite": 0.20})
    write_run(now, R50, seed=0, box_ap=37.4, category_ap={"person": 0.48, "car": 0.33, "toaster": 0.1, "kite": 0.20})
    write_run(now, R50, seed=1, box_ap=37.4, category_ap={"person": 0.46, "car": 0.33, "toaster": 0.1, "kite": 0.21})
    row = _row(matrix, now, then)
    assert row["verdict"] == "pass"  # -3.0 points on one category moves no verdict
    assert row["category_deltas"] == {"person": pytest.approx(-3.0), "car": pytest.approx(3.0), "kite": pytest.approx(0.5)}
    assert list(row["category_deltas"]) == ["car", "person", "kite"]  # |delta| descending, then by name
    df = compare_against(matrix, "full", now, then)
    text = format_against(df, [])
    assert text.splitlines()[-1] == f"  {R50}: car +3.0, person -3.0, kite +0.5"
    write_run(tmp_path / "same", R50, box_ap=37.4, category_ap={"person": 0.50, "car": 0.30})
    assert "Per-category" not in format_against(compare_against(matrix, "full", tmp_path / "same", then), [])  # nothing moved
    # A side whose runs did not all record them, or an AP that is not compared: no per-category line.
    write_run(then, R50, seed=1, box_ap=37.4)
    assert not isinstance(_row(matrix, now, then)["category_deltas"], dict)
    write_run(then, R50, seed=1, box_ap=37.4, eval_images=500, category_ap={"person": 0.5})
    row = _row(matrix, now, then)
    assert row["ap_verdict"] == "not comparable" and not isinstance(row["category_deltas"], dict)
    assert "Per-category" not in format_against(compare_against(matrix, "full", now, then), [])
