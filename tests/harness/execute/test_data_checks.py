"""Issue 14: every dataset is validated once, before any cell starts; bad input is one line, exit 2;
repairs are counted and recorded; a dataset's own categories train with --classes dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detector.data.coco import subset_annotations
from detector.data.validate import validate_split
from detector.errors import DataError
from tests.resources.bad_data import ANN, CASES, make_root

R50 = "faster-rcnn_r50_fpn_1x_coco"
TINY = """\
title: tiny
axes:
  backbone: [r50]
profiles:
  tiny:
    extends: smoke
    max_iters: 2
    image_scale: [96, 64]
    eval_max_images: 2
    bench_images: 0
    synth_images: 2
"""


def _harness(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def _run(tmp_path: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(TINY)
    return _harness("run", str(matrix), "--profile", "tiny", "--data", str(root), "--runs-dir", str(tmp_path / "runs"), *extra)


@pytest.mark.parametrize("case", [c for c, words in CASES.items() if words])
def test_bad_dataset_is_one_line_before_any_cell(tmp_path: Path, case: str) -> None:
    root = make_root(tmp_path, case)
    t0 = time.monotonic()
    proc = _run(tmp_path, root)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("harness: error: ")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and CASES[case] in errors[0] and "Traceback" not in proc.stderr
    assert str(root) in errors[0]  # names the file
    assert "start" not in proc.stderr  # no cell started
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("case", ["no-iscrowd-no-area", "degenerate-box"])
def test_repairs_are_counted(tmp_path: Path, case: str) -> None:
    root = make_root(tmp_path, case)
    report = validate_split(root / ANN, root / "train2017")
    want = {"no-iscrowd-no-area": "without 'iscrowd', read as 0", "degenerate-box": "1 box(es) under 1 px"}[case]
    assert any(want in note for note in report.notes), report.notes


@pytest.mark.slow
def test_repaired_dataset_trains_evaluates_and_records_the_note(tmp_path: Path) -> None:
    root = make_root(tmp_path, "no-iscrowd-no-area")
    proc = _run(tmp_path, root)
    assert proc.returncode == 0, proc.stderr
    assert "data: instances_train2017.json:" in proc.stderr and "without 'iscrowd'" in proc.stderr
    result = json.loads((tmp_path / "runs" / "tiny" / "tiny" / R50 / "result.json").read_text())
    assert result["status"] == "ok" and any("without 'area'" in n for n in result["notes"])


@pytest.mark.slow
def test_own_categories_train_with_classes_dataset(tmp_path: Path) -> None:
    root = make_root(tmp_path, "own-categories")
    proc = _run(tmp_path, root, "--classes", "dataset")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "runs" / "tiny" / "tiny" / R50 / "result.json").read_text())
    assert result["status"] == "ok"
    assert "data: trained on the dataset's own 3 categories: widget, gadget, gizmo" in result["notes"]
    spec = json.loads((tmp_path / "runs" / "tiny" / "tiny" / R50 / "spec.json").read_text())
    assert spec["config"]["num_classes"] == 3 and spec["config"]["data"]["classes"] == ["widget", "gadget", "gizmo"]
    assert result["categories"] == ["widget", "gadget", "gizmo"]  # what compare judges against the recipe's


def test_the_planner_records_the_categories_each_cell_trains(tmp_path: Path) -> None:
    from harness.execute.data_root import check_data
    from harness.execute.plan import plan_run
    from harness.matrix.parse import load_matrix

    matrix = load_matrix("faster_rcnn")
    cells = matrix.select([R50])
    root = make_root(tmp_path, "own-categories")
    data = check_data(root, log=lambda _line: None)
    kw = {"cells": cells, "seeds": [0], "runs_dir": tmp_path / "runs", "data_root": root, "device": "cpu", "pretrained": {}, "data": data}
    (own,) = plan_run(matrix, matrix.profile("smoke"), classes="dataset", **kw)  # type: ignore[arg-type]
    assert own.categories == ("widget", "gadget", "gizmo")
    with pytest.raises(DataError, match="--classes dataset"):
        plan_run(matrix, matrix.profile("smoke"), **kw)  # type: ignore[arg-type]


def test_subset_never_overwrites(tmp_path: Path) -> None:
    root = make_root(tmp_path, "degenerate-box")
    ann = root / ANN
    before = ann.read_bytes()
    with pytest.raises(DataError, match="is the input annotation file"):
        subset_annotations(ann, ann, categories=None, max_images=1)
    with pytest.raises(DataError, match="is a folder"):
        subset_annotations(ann, tmp_path, categories=None, max_images=1)
    from harness.cli import main

    assert main(["data", "subset", "--ann", str(ann), "--out", str(tmp_path / "new") + "/"]) == 2
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.tmp").exists()
    out = tmp_path / "sub.json"
    subset_annotations(ann, out, categories=None, max_images=1)
    with pytest.raises(DataError, match="exists"):
        subset_annotations(ann, out, categories=None, max_images=1)
    assert ann.read_bytes() == before and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def _procs_writing(path: Path) -> list[int]:
    """Running processes that hold `path` open: a cell holds its stdout.txt for its whole life, whether
    started as a new process or forked by the fork server (whose command line does not name it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                files = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
                running = (proc / "stat").read_text().split(")")[-1].split()[0] != "Z"
            except OSError:
                continue
            if running and str(path) in files:
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_the_harness_leaves_no_orphan_cell(tmp_path: Path) -> None:
    import signal

    (tmp_path / "long").mkdir()
    matrix = tmp_path / "long" / "tiny.yaml"  # the matrix is named after its file
    matrix.write_text(TINY.replace("max_iters: 2", "max_iters: 500"))
    runs = tmp_path / "runs"
    harness = subprocess.Popen([sys.executable, "-m", "harness", "run", str(matrix), "--profile", "tiny", "--runs-dir", str(runs)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    cell = runs / "tiny" / "tiny" / R50
    deadline = time.monotonic() + 240
    while not (cell / "log.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (cell / "log.jsonl").is_file(), "the cell never started training"
    assert _procs_writing(cell / "stdout.txt"), "the cell process is not running"
    harness.send_signal(signal.SIGKILL)
    harness.wait()
    deadline = time.monotonic() + 30
    while _procs_writing(cell / "stdout.txt") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _procs_writing(cell / "stdout.txt") == [], "the cell outlived the killed harness"
    # Its lock is free again: a second runner is not told the cell is busy.
    from harness.execute.cells import CellLock

    lock = CellLock(cell)
    deadline = time.monotonic() + 15  # the kernel releases a dead process's flock as it is reaped
    while not lock.acquire() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert lock.fd is not None, f"still held by {lock.holder()}"
    assert lock.holder() == f"pid {os.getpid()} on {__import__('platform').node()}"
    lock.release()


def test_read_only_or_full_runs_folder_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """As root a chmod cannot make a folder read-only, so the OSError is injected where writes happen."""
    import errno

    import harness.execute.plan
    from harness.cli import main

    for code, words in ((errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")):
        def boom(*_a: object, code: int = code, words: str = words, **_k: object) -> None:
            raise OSError(code, words, "/data/runs/faster_rcnn/smoke/x/spec.json")

        monkeypatch.setattr(harness.execute.plan, "execute_run", boom)
        assert main(["run", "faster_rcnn"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("harness: error: /data/runs/faster_rcnn/smoke/x/spec.json: " + words)


def test_unsafe_checkpoint_message_never_recommends_weights_only_false(tmp_path: Path) -> None:
    import os

    import torch

    from detector.errors import WeightsError
    from detector.model.weights import read_checkpoint

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("true",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "meta": Evil()}, path)
    with pytest.raises(WeightsError) as err:
        read_checkpoint(path)
    assert "never runs code" in str(err.value) and "weights_only=False" not in str(err.value).replace("weights_only=True", "")
    assert "set to `False`" not in str(err.value)
