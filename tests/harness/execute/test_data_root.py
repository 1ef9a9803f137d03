from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import UserError
from harness.execute import data_root
from harness.matrix.parse import load_matrix
from tests.resources.fake_runs import empty_coco_root


def test_check_coco_root_names_what_is_missing(tmp_path: Path) -> None:
    root = empty_coco_root(tmp_path, val=False)
    assert data_root.check_coco_root(root, "--data") == root.resolve()
    (root / "train2017").rmdir()
    with pytest.raises(UserError, match=r"--data .*coco: missing train2017/"):
        data_root.check_coco_root(root, "--data")
    with pytest.raises(UserError, match="no such folder"):
        data_root.check_coco_root(tmp_path / "nope", "--data")


def test_synthetic_root_is_generated_once(tmp_path: Path) -> None:
    root = data_root.synthetic_root(tmp_path, images=2, seed=3)
    assert root == tmp_path / "_data" / "synthetic-2-s3"
    ann = root / "annotations" / "instances_train2017.json"
    stamp = ann.stat().st_mtime_ns
    assert data_root.synthetic_root(tmp_path, images=2, seed=3) == root
    assert ann.stat().st_mtime_ns == stamp  # cached, not regenerated
    assert [p.name for p in (tmp_path / "_data").iterdir() if not p.name.startswith(".")] == ["synthetic-2-s3"]


def test_dataset_root_choices(tmp_path: Path) -> None:
    matrix = load_matrix("faster_rcnn")
    full = matrix.profile("full")
    with pytest.raises(UserError, match="--data"):
        data_root.dataset_root(matrix, full, data=None, runs_dir=tmp_path, seed=0, log=print)
    root = empty_coco_root(tmp_path, val=True)
    assert data_root.dataset_root(matrix, full, data=str(root), runs_dir=tmp_path, seed=0, log=print) == root.resolve()
