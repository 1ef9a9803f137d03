"""The side-by-side benchmark: both models built alike, paired timing, the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from detector.bench import timing
from detector.bench import vs_torchvision as bench
from detector.bench.report import render_ablation
from detector.config import DetectorConfig

SMALL = bench.BenchSettings(size=(64, 96), pairs=1, train_pairs=1, warmup=0, gt_per_image=3, memory=False)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return bench.build_pair(SMALL)


def test_torchvision_is_configured_like_ours(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    ours, theirs = pair
    cfg = DetectorConfig()
    rpn = theirs.rpn
    assert rpn._pre_nms_top_n == {"training": cfg.rpn.train.nms_pre, "testing": cfg.rpn.test.nms_pre} == {"training": 2000, "testing": 1000}
    assert rpn._post_nms_top_n == {"training": cfg.rpn.train.max_per_img, "testing": cfg.rpn.test.max_per_img} == {"training": 1000, "testing": 1000}
    assert rpn.nms_thresh == cfg.rpn.test.nms_iou
    roi = theirs.roi_heads
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (cfg.roi_head.score_thr, cfg.roi_head.nms_iou, 100)
    assert roi.box_predictor.cls_score.out_features == ours.roi_head.bbox_head.fc_cls.out_features == 81
    # The transform keeps the bench image's size: min_size / max_size are its sides.
    assert theirs.transform.min_size == (min(SMALL.size),) and theirs.transform.max_size == max(SMALL.size)
    # Same frozen part: stem and res2 (ours frozen_stages=1, torchvision trainable_layers=3).
    frozen_tv = {n.split(".")[0] for n, p in theirs.backbone.body.named_parameters() if not p.requires_grad}
    assert frozen_tv == {"conv1", "layer1"}
    assert not any(p.requires_grad for p in ours.backbone.layer1.parameters())
    assert all(p.requires_grad for n, p in ours.backbone.layer2.named_parameters() if "bn" not in n)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in theirs.backbone.body.modules())


def test_torchvision_model_is_fasterrcnn_resnet50_fpns_architecture(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    _, theirs = pair
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    ref = {k: v.shape for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in theirs.state_dict().items()} == ref


def test_same_weights_give_same_features_and_class_layout(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    ours, theirs = pair
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(ours.backbone(x), theirs.backbone.body(x).values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ours_bias = ours.roi_head.bbox_head.fc_cls.bias
    theirs_bias = theirs.roi_heads.box_predictor.cls_score.bias
    assert torch.equal(theirs_bias[1:], ours_bias[:-1]) and theirs_bias[0] == ours_bias[-1]
    assert (ours_bias[: SMALL.det_classes] == SMALL.det_bias).all()


def test_time_pairs_alternates_and_takes_the_median_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    durations = {"ours": iter([9, 1, 2, 3]), "theirs": iter([9, 2, 2, 2])}  # warm-up first

    def fake(name: str):
        def fn() -> None:
            calls.append(name)
            now[0] += next(durations[name])
        return fn

    out = bench.time_pairs(fake("ours"), fake("theirs"), pairs=3, warmup=1)
    assert calls == ["ours", "theirs", "ours", "theirs", "theirs", "ours", "ours", "theirs"]
    assert out["ours_s"] == [1, 2, 3] and out["theirs_s"] == [2, 2, 2]
    assert out["ratios"] == [0.5, 1.0, 1.5] and out["ratio"] == 1.0
    with pytest.raises(ValueError, match="--pairs"):
        bench.time_pairs(fake("ours"), fake("theirs"), pairs=0, warmup=0)


def test_time_rounds_runs_each_setup_untimed_before_its_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def step(name: str, seconds: float):
        def fn() -> None:
            calls.append(name)
            now[0] += seconds
        return fn

    times = timing.time_rounds({"a": step("a", 1.0), "b": step("b", 2.0)}, rounds=2, warmup=1,
                               setup={"a": step("setup a", 100.0)})  # fmt: skip
    assert calls == ["setup a", "a", "b", "setup a", "a", "b", "b", "setup a", "a"]
    assert times == {"a": [1.0, 1.0], "b": [2.0, 2.0]}  # the setup's 100 s in no timing


def test_tiny_run_writes_bench_json_and_keeps_notes(tmp_path: Path) -> None:
    doc = bench.run(SMALL, log=lambda _: None)
    assert min(doc["detections_per_image"].values()) > 0
    (tmp_path / "benchmarks.md").write_text("# Title\n\nhand-written notes\n", encoding="utf-8")
    json_path, md_path = bench.write_reports(doc, tmp_path)
    loaded = json.loads(json_path.read_text(encoding="utf-8"))
    for key in ("infer_ratio", "train_ratio", "infer", "train", "machine", "settings", "differences"):
        assert key in loaded
    assert loaded["infer"]["ours_s"] and loaded["infer"]["theirs_s"] and loaded["train"]["ratios"]
    assert loaded["infer_ratio"] == loaded["infer"]["ratio"] > 0
    assert loaded["machine"]["cpus_usable"] >= 1 and loaded["machine"]["torch"] == torch.__version__
    first = md_path.read_text(encoding="utf-8")
    assert "hand-written notes" in first and first.count(bench.BEGIN) == 1
    bench.write_reports(doc, tmp_path)  # the block is replaced, not appended again
    second = md_path.read_text(encoding="utf-8")
    assert second == first and "| inference, batch 1" in second
    ops = loaded["operators"]
    assert all(ops[mode][which]["kernels"] > 0 for mode in ("infer", "train") for which in ("ours", "theirs"))
    assert f"infer ours {ops['infer']['ours']['kernels']} / torchvision {ops['infer']['theirs']['kernels']}" in second


@pytest.mark.slow  # a fresh interpreter imports torch and builds both models
def test_memory_is_measured_in_a_fresh_process() -> None:
    out = bench.measure_memory(SMALL, modes=("infer",), models=("theirs",))
    row = out["infer"]
    assert row["theirs"]["peak_reset"] and 0 < row["theirs"]["increase_mib"] < row["theirs"]["peak_mib"]
    assert "ratio" not in row  # only with both models


@pytest.mark.parametrize("argv", [["--size", "800"], ["--size", "32x32"], ["--pairs", "0"], ["--threads", "x"]])
def test_bad_flags_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2


def test_ablation_adds_one_fast_path_per_variant_and_restores_them(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    ours, _ = pair
    seen: list[tuple[bool, bool, bool, bool]] = []

    weight = ours.backbone.layer1[0].conv2.weight

    def ours_call() -> None:
        fold = all(m.fold_bn == "auto" for m in ours.modules() if hasattr(m, "fold_bn"))
        nhwc = weight.is_contiguous(memory_format=torch.channels_last)  # the weights follow the batches' layout
        pooler = ours.roi_head.bbox_roi_extractor
        seen.append((ours.cpu_channels_last and nhwc, fold, pooler.cpu_threads, pooler.cpu_sparse_grad))

    rows = bench.ablation(ours, ours_call, lambda: None, rounds=1, warmup=0)
    assert [r["variant"] for r in rows] == ["torchvision", "none", "+channels_last", "+fold_bn", "+roi_threads", "+roi_grad"]
    assert seen == [(False, False, False, False), (True, False, False, False), (True, True, False, False), (True, True, True, False),
                    (True, True, True, True)]
    ours_call()
    assert seen[-1] == (True, True, True, True)
    assert not weight.is_contiguous()  # NCHW only while "none" ran
    table = render_ablation({"infer": rows, "train": None})
    assert [line.split(" | ")[0] for line in table if line.startswith("| ")][1:] == [
        "| torchvision", "| none", "| +channels_last", "| +fold_bn", "| +roi_threads", "| +roi_grad"]
    assert table[-1].endswith("| - | - |")  # no training rows
