"""`harness parity`: cells, images, the page and the marks (MMDetection itself is `nox -s parity`'s job;
here its two entry points are stand-ins, so the orchestration is tested without it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

import detector.api as api
from harness.cli import main
from harness.errors import UserError
from harness.parity import PARITY_JSON, PARITY_MD, load_marks, pick_images, render, run_parity

R50 = "faster-rcnn_r50_fpn_1x_coco"


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return api.make_synthetic_coco(tmp_path_factory.mktemp("coco") / "root", images=2, seed=0, val_images=3)


def test_pick_images_takes_the_first_images_with_boxes_as_xyxy(coco_root: Path) -> None:
    picked = pick_images(coco_root, 2)
    ann = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    first = sorted(ann["images"], key=lambda i: i["id"])[0]
    assert picked[0][0] == coco_root / "val2017" / first["file_name"]
    a = next(a for a in ann["annotations"] if a["image_id"] == first["id"])
    x, y, w, h = a["bbox"]
    assert picked[0][1][0][:4] == (x, y, x + w, y + h)
    with pytest.raises(UserError, match="3 images with boxes, --images asks for 9"):
        pick_images(coco_root, 9)
    with pytest.raises(UserError, match="instances_val2017.json or instances_train2017.json"):
        pick_images(coco_root / "nowhere", 1)


def test_without_mmdetection_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    for name in ("mmcv", "mmdet", "mmengine"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as where the parity group is absent
    code = main(["parity", "faster_rcnn", "--only", R50, "--reports-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nox -s parity" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / PARITY_JSON).exists()


def _row(cell: str, ok: bool) -> dict[str, Any]:
    stages = [{"stage": s, "worst": 0.0, "ok": True, "detail": ""} for s in ("state_dict", "params", "backbone")]
    stages.append({"stage": "losses", "worst": 0.0 if ok else 0.02, "ok": ok, "detail": "worst: loss_cls 2 vs 1.96"})
    return {"cell": cell, "config": f"faster_rcnn/{cell}.py", "status": "checked", "stages": stages, "ok": ok, "seconds": 12.3}


def test_run_writes_json_and_page_and_fails_on_a_differing_cell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                coco_root: Path) -> None:
    seen: list[str] = []

    def fake_check(*, name: str, cfg: Any, images: list[Any], seed: int) -> dict[str, Any]:
        seen.append(name)
        assert cfg.name == name and len(images) == 2 and seed == 3
        if name.endswith("giou_1x_coco"):
            return {"cell": name, "config": None, "status": "not shipped", "reason": "MMDetection 3.3.0 ships no config"}
        return _row(name, ok=not name.endswith("_iou_1x_coco"))

    monkeypatch.setattr(api, "parity_check", fake_check, raising=False)
    monkeypatch.setattr(api, "parity_versions", lambda: {"mmdet": "3.3.0", "mmengine": "0.10.7", "mmcv": "2.1.0"}, raising=False)
    lines: list[str] = []
    code = run_parity(matrix="faster_rcnn", only=["faster-rcnn_r50_fpn_*iou*"], data=coco_root, images=2, seed=3,
                      out_dir=tmp_path, log=lines.append)
    assert code == 1 and len(seen) == 3
    assert "  pass (12 s): worst 0 at state_dict" in lines and "  FAIL (12 s): losses: worst: loss_cls 2 vs 1.96 (worst 0.02)" in lines
    doc = json.loads((tmp_path / PARITY_JSON).read_text())
    assert [r["cell"] for r in doc["cells"]] == seen and doc["mmdetection"]["mmdet"] == "3.3.0"
    page = (tmp_path / PARITY_MD).read_text()
    assert "2 cells checked, 1 failed, 1 not checked" in page
    assert "| not shipped: MMDetection 3.3.0 ships no config |" in page
    assert "faster-rcnn_r50_fpn_iou_1x_coco: losses: worst: loss_cls 2 vs 1.96 (worst 0.02). No recorded deviation" in page
    assert all(r["notes"] == [] for r in doc["cells"])  # these cells carry no quirk notes
    marks, fact = load_marks(tmp_path / PARITY_JSON)
    assert marks == {"faster-rcnn_r50_fpn_iou_1x_coco": "✗", "faster-rcnn_r50_fpn_giou_1x_coco": "-",
                     "faster-rcnn_r50_fpn_bounded-iou_1x_coco": "✓"}
    assert fact.startswith("1 of 2 checked cells equal to MMDetection 3.3.0's own model")


def test_render_marks_the_failing_stage() -> None:
    doc = {"matrix": "m", "mmdetection": {"mmdet": "3.3.0", "mmengine": "0.10.7", "mmcv": "2.1.0"}, "torch": "2", "torchvision": "0",
           "python": "3", "commit": "abc", "date": "2026-12-06", "images": ["a.jpg"], "data": "synth",
           "cells": [_row("c1", ok=True), _row("c2", ok=False)]}
    page = render(doc)
    assert "| c1 | faster_rcnn/c1.py | 0 | 0 | n/a | n/a | n/a | 0 | n/a | n/a | n/a | 0 | pass |" in page
    assert "| c2 | faster_rcnn/c2.py | 0 | 0 | n/a | n/a | n/a | 0 | n/a | n/a | n/a | 2.0e-02 ✗ | FAIL |" in page


def test_a_difference_lists_the_cells_recorded_deviations() -> None:
    row = {**_row("c2", ok=False), "notes": ["Q2: caffe normalisation as the v2 checkpoint was trained"]}
    doc = {"matrix": "m", "mmdetection": {"mmdet": "3.3.0", "mmengine": "0.10.7", "mmcv": "2.1.0"}, "torch": "2", "torchvision": "0",
           "python": "3", "commit": "abc", "date": "2026-12-06", "images": ["a.jpg"], "data": "synth", "cells": [row]}
    assert "(worst 0.02). Recorded deviations of this cell: Q2: caffe normalisation" in render(doc)


def test_a_cell_equal_once_its_recorded_deviation_is_applied_passes_and_says_so(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, coco_root: Path) -> None:
    q2 = "faster-rcnn_r101-caffe_fpn_ms-3x_coco"

    def fake_check(*, name: str, cfg: Any, images: list[Any], seed: int) -> dict[str, Any]:
        row = _row(name, ok=name != q2)
        if name == q2:  # as shipped it differs; with Q2 applied to MMDetection's config it is equal
            row["with_deviations"] = {"applied": ["Q2"], "edits": ["data_preprocessor set to ours"], "ok": True,
                                      "stages": _row(name, ok=True)["stages"]}
        return row

    monkeypatch.setattr(api, "parity_check", fake_check, raising=False)
    monkeypatch.setattr(api, "parity_versions", lambda: {"mmdet": "3.3.0", "mmengine": "0.10.7", "mmcv": "2.1.0"}, raising=False)
    code = run_parity(matrix="faster_rcnn", only=["faster-rcnn_r101*_ms-3x_coco"], data=coco_root, images=2, seed=0,
                      out_dir=tmp_path, log=lambda _line: None)
    assert code == 0
    page = (tmp_path / PARITY_MD).read_text()
    assert f"| {q2} | faster_rcnn/{q2}.py | 0 | 0 | n/a | n/a | n/a | 0 | n/a | n/a | n/a | 2.0e-02 ✗ | pass with Q2 applied |" in page
    assert "2 cells checked, 0 failed, 1 equal once their recorded deviation is applied to MMDetection's config" in page
    assert (f"- {q2}: losses: worst: loss_cls 2 vs 1.96 (worst 0.02). Recorded deviations of this cell: Q2: caffe "
            "normalisation") in page
    assert "With Q2 applied (data_preprocessor set to ours): every stage equal (worst 0 at state_dict)." in page
    marks, fact = load_marks(tmp_path / PARITY_JSON)
    assert marks == {"faster-rcnn_r101_fpn_ms-3x_coco": "✓", q2: "✓ Q2"}
    assert fact.startswith("1 of 2 checked cells equal to MMDetection 3.3.0's own model")
    assert ", 1 more once its recorded deviation (Q2) is applied to MMDetection's config, at commit" in fact


def test_a_cell_still_different_with_its_deviation_applied_fails() -> None:
    row = {**_row("c2", ok=False), "notes": ["Q2: caffe"],
           "with_deviations": {"applied": ["Q2"], "edits": ["x"], "ok": False, "stages": _row("c2", ok=False)["stages"]}}
    doc = {"matrix": "m", "mmdetection": {"mmdet": "3.3.0", "mmengine": "0.10.7", "mmcv": "2.1.0"}, "torch": "2", "torchvision": "0",
           "python": "3", "commit": "abc", "date": "2026-12-06", "images": ["a.jpg"], "data": "synth", "cells": [row]}
    page = render(doc)
    assert "| FAIL |" in page and "With Q2 applied (x): still different: losses:" in page
    assert "1 cells checked, 1 failed, 0 not checked" in page


def test_no_parity_file_no_marks(tmp_path: Path) -> None:
    assert load_marks(tmp_path / "absent.json") == ({}, "")


def test_the_commit_named_is_the_one_the_check_started_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          coco_root: Path) -> None:  # fmt: skip
    """A commit made while the cells run is not named for code the check did not run; tracked
    changes at the start are said ("+changes")."""
    import harness.parity as parity

    head = {"git_commit": "a" * 40, "git_dirty": True}

    def fake_check(*, name: str, cfg: Any, images: list[Any], seed: int) -> dict[str, Any]:
        head.update(git_commit="b" * 40, git_dirty=False)  # committed meanwhile
        return _row(name, ok=True)

    monkeypatch.setattr(parity, "git_info", lambda _root: dict(head))
    monkeypatch.setattr(api, "parity_check", fake_check, raising=False)
    monkeypatch.setattr(api, "parity_versions", lambda: {"mmdet": "3.3.0", "mmengine": "0.10.7", "mmcv": "2.1.0"}, raising=False)
    run_parity(matrix="faster_rcnn", only=["faster-rcnn_r50_fpn_1x_coco"], data=coco_root, images=2, seed=0,
               out_dir=tmp_path, log=lambda _line: None)  # fmt: skip
    assert json.loads((tmp_path / PARITY_JSON).read_text())["commit"] == "aaaaaaa+changes"
    assert "Checked at commit `aaaaaaa+changes`" in (tmp_path / PARITY_MD).read_text()
