from __future__ import annotations

from pathlib import Path

import pytest

from detector.config import DetectorConfig, RunConfig
from detector.recipes import resolve
from harness.errors import UserError
from harness.execute import plan as planning
from harness.matrix.parse import load_matrix
from tests.resources.fake_runs import empty_coco_root

R50 = "faster-rcnn_r50_fpn_1x_coco"
C4 = "faster-rcnn_r50-caffe_c4-1x_coco"


def test_run_config_from_profile(tmp_path: Path) -> None:
    smoke = load_matrix("faster_rcnn").profile("smoke")
    root = empty_coco_root(tmp_path, val=False)
    run = planning.run_config(smoke, data_root=root, device="cpu", seed=4)
    assert isinstance(run, RunConfig)
    assert run.val_ann is None and run.val_images is None  # no val split: evaluation uses train
    assert (run.max_iters, run.image_scale, run.images_per_gpu, run.seed) == (smoke.budget.max_iters, smoke.budget.image_scale, smoke.images_per_gpu, 4)
    assert (run.eval_max_images, run.bench_images, run.checkpoint_interval, run.workers) == (
        smoke.budget.eval_max_images, smoke.budget.bench_images, smoke.budget.checkpoint_interval, smoke.workers,
    )  # fmt: skip
    # The smoke profile trains a few iterations: every one is logged, so its loss curve has points.
    assert run.log_interval == smoke.budget.log_interval == 1
    assert run.checkpoint_interval is None  # no checkpoints: a smoke cell re-runs in seconds
    with_val = planning.run_config(smoke, data_root=empty_coco_root(tmp_path / "v", val=True), device="cpu", seed=0)
    assert with_val.val_ann == "annotations/instances_val2017.json" and with_val.val_images == "val2017"
    assert RunConfig.from_dict(run.to_dict()) == run


def test_parse_pretrained(tmp_path: Path) -> None:
    weights = tmp_path / "r50.pth"
    weights.write_bytes(b"x")
    assert planning.parse_pretrained([f"torchvision://resnet50={weights}"]) == {"torchvision://resnet50": weights.resolve()}
    with pytest.raises(UserError, match="NAME=FILE"):
        planning.parse_pretrained(["r50.pth"])
    with pytest.raises(UserError, match="no such file"):
        planning.parse_pretrained([f"torchvision://resnet50={tmp_path / 'missing.pth'}"])


def test_plan_run_seeds_specs_and_pretrained(tmp_path: Path) -> None:
    matrix = load_matrix("faster_rcnn")
    smoke = matrix.profile("smoke")
    cells = matrix.select([R50, "faster-rcnn_r101_fpn_1x_coco"])
    weights = tmp_path / "r50.pth"
    weights.write_bytes(b"x")
    jobs = planning.plan_run(matrix, smoke, cells=cells, seeds=[0, 1], runs_dir=tmp_path / "runs", data_root=tmp_path,
                             device="cpu", pretrained={"torchvision://resnet50": weights})  # fmt: skip
    assert [(j.name, j.seed) for j in jobs] == [(c.name, s) for c in cells for s in (0, 1)]
    r50 = jobs[0]
    assert r50.folder == tmp_path / "runs" / "faster_rcnn" / "smoke" / R50 and jobs[1].folder == r50.folder / "seed-1"
    assert DetectorConfig.from_dict(r50.spec["config"]) == resolve(dict(cells[0].axes), name=R50)
    assert r50.spec["run"]["pretrained_path"] == str(weights) and jobs[2].spec["run"]["pretrained_path"] is None
    assert r50.notes == resolve(dict(cells[0].axes), name=R50).notes and r50.skip_reason is None
    assert r50.config_hash != jobs[1].config_hash  # the seed is part of the spec
    with pytest.raises(UserError, match="no selected cell uses it"):
        planning.plan_run(matrix, smoke, cells=cells, seeds=[0], runs_dir=tmp_path, data_root=tmp_path, device="cpu",
                          pretrained={"open-mmlab://resnext101_64x4d": weights})  # fmt: skip


def test_a_cell_the_detector_cannot_build_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import detector.model.faster_rcnn

    real = detector.model.faster_rcnn.build_detector

    def no_c4(cfg: DetectorConfig) -> object:
        if cfg.roi_head.kind == "res5":
            raise NotImplementedError("res5 shared head")
        return real(cfg)

    monkeypatch.setattr(detector.model.faster_rcnn, "build_detector", no_c4)
    matrix = load_matrix("faster_rcnn")
    jobs = planning.plan_run(matrix, matrix.profile("smoke"), cells=matrix.select([C4, R50]), seeds=[0],
                             runs_dir=tmp_path, data_root=tmp_path, device="cpu", pretrained={})  # fmt: skip
    by_name = {j.name: j for j in jobs}
    assert by_name[C4].skip_reason == "the detector cannot build this cell: NotImplementedError: res5 shared head"
    assert by_name[R50].skip_reason is None


def test_the_proposal_cap_follows_the_cells_neck(tmp_path: Path) -> None:
    """smoke caps C4 (its res5 head runs once per RoI) lower than the FPN and DC5 cells."""
    matrix = load_matrix("faster_rcnn")
    smoke = matrix.profile("smoke")
    dc5 = "faster-rcnn_r50-caffe-dc5_1x_coco"
    jobs = planning.plan_run(matrix, smoke, cells=matrix.select([C4, R50, dc5]), seeds=[0], runs_dir=tmp_path, data_root=tmp_path,
                             device="cpu", pretrained={})  # fmt: skip
    caps = {j.name: j.spec["run"]["proposal_cap"] for j in jobs}
    assert smoke.budget.proposal_cap == {"default": 48, "c4": 24}
    assert caps == {C4: 24, R50: 48, dc5: 48}
    assert planning.run_config(smoke, data_root=tmp_path, device="cpu", seed=0).proposal_cap == 48  # no neck: the default
