"""`python -m detector.run CELL_DIR` end to end on a tiny synthetic COCO root (random init, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from detector import run as R
from detector.config import ProposalConfig, RunConfig
from detector.data.synth import make_synthetic_coco
from detector.errors import ConfigError
from detector.recipes import resolve

SCHEMA_KEYS = {
    "status", "error", "coco", "box_ap", "mem_gb", "mem_kind", "fps", "fps_images", "fps_precision", "iters",
    "epochs", "train_time_s", "eval_time_s", "final_loss", "first_loss", "world_size", "images_per_gpu",
    "total_batch", "lr", "base_lr", "lr_rescaled", "resumed_from_iter", "eval_split", "device", "device_class",
    "deviations", "failed_at_iter", "loss_terms", "train_images_per_s", "s_per_iter", "threads", "phase_s",
    "framework_mem_gb", "eval_images", "category_ap",
}  # fmt: skip
COCO_KEYS = {"bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l", "bbox_AR@100",
             "bbox_AR@300", "bbox_AR@1000", "bbox_AR_s@1000", "bbox_AR_m@1000", "bbox_AR_l@1000"}  # ARCHITECTURE.md
# Times, memory and the resume marker legitimately differ between two runs of the same cell.
VOLATILE = {"train_time_s", "eval_time_s", "mem_gb", "fps", "resumed_from_iter", "train_images_per_s", "s_per_iter", "phase_s"}
# Two cores are shared: one thread per process avoids OpenMP oversubscription (10x slower).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_config():
    """R-50-FPN 1x with a frozen backbone and small samplers / heads: seconds per run on a CPU."""
    cfg = resolve({})
    return replace(
        cfg,
        backbone=replace(cfg.backbone, frozen_stages=4),
        rpn=replace(cfg.rpn, num_samples=64, train=ProposalConfig(nms_pre=200, max_per_img=100),
                    test=ProposalConfig(nms_pre=100, max_per_img=50)),
        roi_head=replace(cfg.roi_head, fc_channels=64, num_samples=64),
    )  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), images=8, seed=0, size=(96, 96), val_images=4)


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cell(cell: Path, data_root: Path, cfg=None, **run: object) -> Path:
    defaults = dict(data_root=str(data_root), max_iters=12, checkpoint_interval=4, log_interval=2, workers=0,
                    image_scale=(96, 64), bench_images=3, bench_warmup=1, progress=False)  # fmt: skip
    spec = {"config": (cfg or tiny_config()).to_dict(), "run": RunConfig(**{**defaults, **run}).to_dict()}
    cell.mkdir(parents=True, exist_ok=True)
    (cell / "spec.json").write_text(json.dumps(spec))
    return cell


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VOLATILE}


def test_cell_writes_schema_log_checkpoints_and_reruns_from_the_final_checkpoint(
    tmp_path: Path, data_root: Path, one_thread: None
) -> None:
    cell = make_cell(tmp_path / "cell", data_root)
    assert R.main([str(cell)]) == 0
    m = json.loads((cell / "metrics.json").read_text())
    assert set(m) == SCHEMA_KEYS and set(m["coco"]) == COCO_KEYS
    assert m["status"] == "ok" and m["error"] is None and m["failed_at_iter"] is None
    assert m["iters"] == 12 and m["epochs"] == 3.0  # 8 images / 2 per batch = 4 iterations per epoch
    assert m["world_size"] == 1 and m["images_per_gpu"] == 2 and m["total_batch"] == 2
    assert m["base_lr"] == 0.02 and m["lr"] == pytest.approx(0.0025) and m["lr_rescaled"] is True
    assert m["eval_split"] == "val2017" and m["eval_images"] == 4 and m["resumed_from_iter"] == 0
    assert m["mem_kind"] == "cpu_peak_rss" and m["mem_gb"] > 0
    # Where the wall time went: every phase in order, start-up (interpreter + imports) included.
    assert list(m["phase_s"]) == ["startup", "build", "data", "train", "eval", "fps"]
    assert m["phase_s"]["startup"] > 0.1 and m["phase_s"]["train"] >= m["train_time_s"] * 0.9
    assert m["fps"] > 0 and m["fps_images"] == 3 and m["fps_precision"] == "fp32"
    assert m["device"] == "cpu" and m["device_class"] == "cpu"
    assert m["box_ap"] == round(m["coco"]["bbox_mAP"] * 100, 1)
    # Every category of the dataset has its AP (mmdet classwise), null where the 4 images have none of it.
    gt = json.loads((data_root / "annotations/instances_val2017.json").read_text())
    assert list(m["category_ap"]) == [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    present = {c["name"] for c in gt["categories"] if any(a["category_id"] == c["id"] for a in gt["annotations"])}
    assert {name for name, ap in m["category_ap"].items() if ap is not None} == present
    assert m["final_loss"] < m["first_loss"]
    devs = "\n".join(m["deviations"])
    for part in ("image scale (96, 64) instead of (1333, 800)", "iteration budget 12", "warmup 4 iterations",
                 "total batch 2", "randomly initialised"):  # fmt: skip
        assert part in devs, part

    log = pd.read_json(cell / "log.jsonl", lines=True)
    assert list(log["iter"]) == [2, 4, 6, 8, 10, 12]
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss", "lr", "memory"} <= set(log.columns)
    assert log["lr"].iloc[-1] == pytest.approx(0.0025 * 0.01)  # both milestones (8, 11) passed
    assert sorted(p.name for p in (cell / "checkpoints").iterdir()) == ["iter_12.pt", "iter_8.pt", "latest.pt"]

    # Started again, the cell finds its final checkpoint: no training, same evaluation.
    assert R.main([str(cell)]) == 0
    again = json.loads((cell / "metrics.json").read_text())
    assert again["resumed_from_iter"] == 12 and stable(again) == stable(m)
    assert len(pd.read_json(cell / "log.jsonl", lines=True)) == 6


def test_missing_val_split_evaluates_on_train(tmp_path: Path, data_root: Path, one_thread: None) -> None:
    cell = make_cell(tmp_path / "cell", data_root, max_iters=2, bench_images=0, val_ann="annotations/nope.json")
    assert R.main([str(cell)]) == 0
    m = json.loads((cell / "metrics.json").read_text())
    assert m["eval_split"] == "train2017" and m["fps"] is None and m["fps_images"] == 0
    assert any("evaluated on train2017" in d for d in m["deviations"])


def test_non_finite_loss_exits_3_with_the_iteration_and_terms(
    tmp_path: Path, data_root: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detector.model.faster_rcnn import FasterRCNN

    forward, calls = FasterRCNN.forward, []

    def diverging(self, images, targets=None, original_sizes=None):
        out = forward(self, images, targets, original_sizes)
        if self.training:
            calls.append(1)
            if len(calls) >= 2:
                out = {**out, "loss_cls": out["loss_cls"] * float("inf")}
        return out

    monkeypatch.setattr(FasterRCNN, "forward", diverging)
    cell = make_cell(tmp_path / "cell", data_root, max_iters=4)
    assert R.main([str(cell)]) == 3
    m = json.loads((cell / "metrics.json").read_text())
    assert set(m) == SCHEMA_KEYS and m["status"] == "failed" and m["failed_at_iter"] == 2
    assert m["loss_terms"]["loss_cls"] == float("inf") and "non-finite loss at iteration 2" in m["error"]
    assert m["world_size"] == 1 and m["coco"] is None


def test_bad_spec_errors_name_the_file_and_field(tmp_path: Path, data_root: Path) -> None:
    with pytest.raises(ConfigError, match="spec.json: not found"):
        R.main([str(tmp_path / "nowhere")])
    cell = make_cell(tmp_path / "cell", data_root)
    spec = json.loads((cell / "spec.json").read_text())
    spec["run"]["max_iter"] = 3
    (cell / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"spec.json: run: unknown field 'max_iter'"):
        R.main([str(cell)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_a_gpu_is_a_config_error(tmp_path: Path, data_root: Path) -> None:
    cell = make_cell(tmp_path / "cell", data_root, device="cuda")
    with pytest.raises(ConfigError, match="run.device: 'cuda' but CUDA is not available"):
        R.main([str(cell)])


def _run(cell: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*extra, "-m", "detector.run", str(cell)] if extra else [sys.executable, "-m", "detector.run", str(cell)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_rerun_gives_the_uninterrupted_metrics(tmp_path: Path, data_root: Path) -> None:
    full = make_cell(tmp_path / "full", data_root)
    done = _run(full)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = make_cell(tmp_path / "killed", data_root)
    proc = subprocess.Popen([sys.executable, "-m", "detector.run", str(killed)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    latest, deadline = killed / "checkpoints" / "latest.pt", time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "metrics.json").exists()

    rerun = _run(killed)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert 4 <= b["resumed_from_iter"] < 12 and a["resumed_from_iter"] == 0
    assert stable(a) == stable(b)  # coco stats, first and final loss, iters, deviations ...
    log_a = pd.read_json(full / "log.jsonl", lines=True)
    log_b = pd.read_json(killed / "log.jsonl", lines=True)
    cols = ["iter", "lr", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss"]
    pd.testing.assert_frame_equal(log_a[cols], log_b[cols])


@pytest.mark.slow
def test_stop_request_checkpoints_where_it_is_then_rerun_gives_the_uninterrupted_metrics(tmp_path: Path, data_root: Path) -> None:
    # What a preempted Slurm job does (SubmititCell.checkpoint writes the stop file): the cell saves a
    # checkpoint at the iteration it reached, between the periodic ones, and exits 75; the requeued
    # run resumes there and ends exactly as an uninterrupted run.
    full = make_cell(tmp_path / "full", data_root, checkpoint_interval=100)
    assert _run(full).returncode == 0
    cell = make_cell(tmp_path / "stopped", data_root, checkpoint_interval=100)
    (cell / "STOP").touch()  # a stale stop file from an earlier stop must not stop the next run at once
    proc = subprocess.Popen([sys.executable, "-m", "detector.run", str(cell)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    log, deadline = cell / "log.jsonl", time.monotonic() + 240
    while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    (cell / "STOP").touch()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped on request at iteration" in err and not (cell / "metrics.json").exists()
    stopped_at = int(err.split("stopped on request at iteration ")[1].split(";")[0])
    assert 2 <= stopped_at < 12 and (cell / "checkpoints" / "latest.pt").exists()

    rerun = _run(cell)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a, b = (json.loads((c / "metrics.json").read_text()) for c in (full, cell))
    assert b["resumed_from_iter"] == stopped_at and stable(a) == stable(b)


@pytest.mark.slow
def test_sigterm_while_training_checkpoints_and_exits_75(tmp_path: Path, data_root: Path) -> None:
    cell = make_cell(tmp_path / "term", data_root, checkpoint_interval=100)
    proc = subprocess.Popen([sys.executable, "-m", "detector.run", str(cell)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    log, deadline = cell / "log.jsonl", time.monotonic() + 240
    while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75 and "checkpoint saved" in err, err[-2000:]


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path, data_root: Path) -> None:
    cell = make_cell(tmp_path / "cell", data_root, max_iters=4, bench_images=2)
    done = _run(cell, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((cell / "metrics.json").read_text())
    assert m["status"] == "ok" and m["world_size"] == 2 and m["images_per_gpu"] == 2 and m["total_batch"] == 4
    assert m["lr"] == pytest.approx(0.005) and m["iters"] == 4 and m["epochs"] == 2.0  # 2 batches per rank-epoch
    assert any("2 process(es) x 2 images = total batch 4" in d for d in m["deviations"])
    assert m["fps_images"] == 2 and set(m["coco"]) == COCO_KEYS
    log = pd.read_json(cell / "log.jsonl", lines=True)
    assert list(log["iter"]) == [2, 4]  # rank 0 alone writes
    assert sorted(p.name for p in (cell / "checkpoints").iterdir()) == ["iter_4.pt", "latest.pt"]


def test_evaluation_wiring_scores_a_perfect_detector_at_100_ap(
    tmp_path: Path, data_root: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that answers each val image with its ground truth must score AP 100: checks the
    original-size rescaling request, label -> category mapping and image ids between run and eval."""
    from detector.data import coco as D
    from detector.model.faster_rcnn import FasterRCNN

    cell = make_cell(tmp_path / "cell", data_root, max_iters=1, bench_images=0)
    cfg, run = R.read_spec(cell)
    val = D.build_dataset(cfg, run, train=False)
    truth = {}
    for i in range(len(val)):
        image, _, meta = val[i]
        boxes, labels = val.annotations(meta["image_id"])  # original-image pixels
        truth[(tuple(image.shape), float(image.float().sum()))] = (boxes, labels)
    forward = FasterRCNN.forward

    def oracle(self, images, targets=None, original_sizes=None):
        if self.training:
            return forward(self, images, targets, original_sizes)
        assert original_sizes is not None  # detections must come back in original pixels
        out = []
        for image in images:
            boxes, labels = truth[(tuple(image.shape), float(image.cpu().sum()))]
            out.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels})
        return out

    monkeypatch.setattr(FasterRCNN, "forward", oracle)
    assert R.main([str(cell)]) == 0
    m = json.loads((cell / "metrics.json").read_text())
    assert m["coco"]["bbox_mAP"] == pytest.approx(1.0) and m["box_ap"] == 100.0


def test_batch_deviations_keep_the_lr_for_the_recipes_total_batch() -> None:
    from detector.run import batch_deviations

    assert batch_deviations(8, 2, base_lr=0.02, lr=0.02) == []
    (one,) = batch_deviations(1, 16, base_lr=0.02, lr=0.02)
    assert "= the recipe's total batch 16 (8 GPUs x 2): lr 0.02 unchanged" in one and "largest of its 16 images" in one
    (four,) = batch_deviations(4, 4, base_lr=0.02, lr=0.02)
    assert "4 process(es) x 4 images" in four and "unchanged" in four
    (small,) = batch_deviations(1, 2, base_lr=0.02, lr=0.0025)
    assert small.endswith("total batch 2 instead of 8 GPUs x 2 = 16; lr 0.02 -> 0.0025 (linear scaling)")


def test_framework_memory_is_only_measured_where_torchvision_has_the_cell() -> None:
    """torchvision's memory beside ours: asked for by the profile, R-50-FPN pytorch-style cells, on
    CUDA; None everywhere else (no measurement, no cost)."""
    from detector.run import _framework_memory
    from detector.train import solver

    cpu = torch.device("cpu")
    asked = RunConfig(data_root=".", framework_memory=True)
    assert _framework_memory(resolve({}), asked, cpu, solver.resolve_amp("fp32", cpu)) is None  # not CUDA
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        fp32 = solver.resolve_amp("fp32", cuda)
        assert _framework_memory(resolve({}), RunConfig(data_root="."), cuda, fp32) is None  # not asked
        assert _framework_memory(resolve({"style": "caffe"}), asked, cuda, fp32) is None  # no counterpart
        assert _framework_memory(resolve({"backbone": "r101"}), asked, cuda, fp32) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_framework_memory_on_cuda_is_torchvision_alone() -> None:
    from detector.run import _framework_memory
    from detector.train import solver

    cuda = torch.device("cuda")
    resident = torch.empty(2**28, device=cuda)  # 1 GiB of "our model" that must not be counted
    run = RunConfig(data_root=".", framework_memory=True, image_scale=(666, 400))
    gb = _framework_memory(resolve({}), run, cuda, solver.resolve_amp("fp32", cuda))
    assert gb is not None and 0.2 < gb < 3.0, gb
    del resident
