"""The accelerator benchmark: a CPU dry run of the whole path, the goals arithmetic, the report
block, the candidate fast paths keeping the outputs, and (marked `gpu`) the real thing on CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detector.bench import gpu
from detector.bench.gpu_report import BEGIN_GPU, END_GPU, render_gpu_block
from detector.bench.pair import BenchSettings, build_pair, make_inputs
from detector.bench.report import BEGIN, END
from detector.bench.vs_torchvision import main as cpu_main
from detector.model.faster_rcnn import set_cuda_channels_last_

TINY = ["--size", "64x96", "--pairs", "1", "--warmup", "0"]


@pytest.fixture
def light_roi_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both models of the pair with 64 sampled RoIs an image and 100 proposals instead of the recipe's
    512 and 1000 (torchvision's built from the same config): these tests check the run's plumbing.
    Why: where the CPU has no native bf16 (AVX2), torch's bf16 matmul fallback made the RoI head's
    backward ~36 s of each 2-image AMP step at the recipe's counts, 3.6 min for this file's dry run."""
    import dataclasses

    from detector.bench import pair
    from detector.config import DetectorConfig, ProposalConfig

    cfg = DetectorConfig()
    light = dataclasses.replace(
        cfg,
        rpn=dataclasses.replace(cfg.rpn, train=ProposalConfig(nms_pre=300, max_per_img=100), test=ProposalConfig(nms_pre=300, max_per_img=100)),
        roi_head=dataclasses.replace(cfg.roi_head, num_samples=64),
    )
    monkeypatch.setattr(pair, "our_config", lambda: light)


def test_cpu_dry_run_writes_json_and_block_keeping_the_cpu_block(tmp_path: Path, light_roi_head: None) -> None:
    md = tmp_path / "benchmarks.md"
    md.write_text(f"# notes\n\nhand-written\n\n{BEGIN}\nCPU numbers\n{END}\n\nmore notes\n", encoding="utf-8")
    # Without the profile here: profiling the AMP training step doubled this test's 68 s on a CPU
    # without native bf16; the second run below profiles (the same `profile_call` for every case).
    assert gpu.main(["--device", "cpu", *TINY, "--cases", "infer1,train2", "--no-profile", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert set(doc["results"]) == {"infer1/fp32", "train2/fp32", "infer1/amp", "train2/amp"}
    row = doc["results"]["train2/amp"]
    assert row["images"] == 2 and row["ours_median_s"] > 0 and row["theirs_median_s"] > 0
    assert row["ours_peak_gib"] is None and row["ours_syncs"] is None  # CUDA-only columns
    assert "ours_profile" not in row
    assert doc["results"]["infer1/fp32"]["ours_fps"] > 0
    goals = {g["goal"]: g for g in doc["goals"]}
    assert all(g["value"] is not None for g in goals.values())
    text = md.read_text()
    assert "hand-written" in text and "CPU numbers" in text and "more notes" in text  # kept
    assert text.count(BEGIN_GPU) == 1 and "| train2 (2 img) | amp |" in text
    # A second run replaces the block instead of adding one.
    assert gpu.main(["--device", "cpu", *TINY, "--cases", "infer1", "--precisions", "fp32", "--out", str(tmp_path)]) == 0
    profile = json.loads((tmp_path / "bench_gpu.json").read_text())["results"]["infer1/fp32"]["ours_profile"]
    assert profile["wall_ms"] > 0 and profile["top"]
    text = md.read_text()
    assert text.count(BEGIN_GPU) == 1 and text.count(END_GPU) == 1 and "| train2 (2 img)" not in text


def test_each_row_is_written_as_it_is_measured(tmp_path: Path, light_roi_head: None) -> None:
    """A device call killed at its time limit keeps the rows measured before: the document is handed
    over (and `main` writes it) after every row, marked partial until the end."""
    seen: list[dict] = []
    settings = gpu.GpuBenchSettings(device="cpu", size=(64, 96), pairs=1, warmup=0, cases=("infer1", "train2"),
                                    precisions=("fp32",), profile=False)  # fmt: skip
    final = gpu.run(settings, log=lambda _: None, progress=lambda doc: seen.append(json.loads(json.dumps(doc))))
    assert [sorted(d["results"]) for d in seen] == [["infer1/fp32"], ["infer1/fp32", "train2/fp32"]]
    assert not any(d["complete"] for d in seen) and final["complete"]
    first = render_gpu_block(seen[0])
    assert "**Partial run**" in first and "| infer1 (1 img) | fp32 |" in first and "train2 (2 img)" not in first
    assert "**Partial run**" not in render_gpu_block(final)


def test_nox_bench_device_cuda_goes_to_the_gpu_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str] | None] = []
    monkeypatch.setattr(gpu, "main", lambda argv=None: seen.append(argv) or 0)
    assert cpu_main(["--device", "cuda", "--pairs", "3"]) == 0
    assert seen == [["--device", "cuda", "--pairs", "3"]]


@pytest.mark.parametrize("argv, message", [(["--cases", "infer3"], "--cases: infer3 not allowed"),
                                            (["--precisions", "fp8"], "--precisions: fp8 not allowed"),
                                            (["--size", "big"], "--size: 'big' is not HxW")])  # fmt: skip
def test_bad_options_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--device", "cpu", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_goals_from_a_hand_made_result() -> None:
    def row(ours: float, theirs: float, images: int = 2) -> dict[str, float]:
        return {"ours_median_s": ours, "theirs_median_s": theirs, "ratio": round(ours / theirs, 4), "ours_fps": images / ours}

    results = {"train2/fp32": row(0.060, 0.080), "train2/amp": row(0.030, 0.050),
               "infer1/fp32": row(0.008, 0.010, 1), "infer1/amp": row(0.010, 0.010, 1)}  # fmt: skip
    goals = {g["goal"]: (g["value"], g["met"]) for g in gpu.evaluate_goals(results)}
    assert goals["training step (2 images) ours / torchvision, fp32 <= 0.8"] == (0.75, True)
    assert goals["training step (2 images) ours / torchvision, AMP <= 0.7"] == (0.6, True)
    assert goals["our training step (2 images) AMP / fp32 <= 0.7"] == (0.5, True)
    assert goals["our batch-1 inference AMP / fp32 < 1 (AMP faster)"] == (1.25, False)
    assert goals["our batch-1 inference fp32 >= 100 fps"] == (125.0, True)
    assert goals["our batch-1 inference AMP >= 150 fps"] == (100.0, False)
    assert {g["met"] for g in gpu.evaluate_goals({})} == {None}  # not measured is said, not guessed


def test_block_renders_cuda_columns_and_the_ablation() -> None:
    doc = {
        "machine": {"gpu": "NVIDIA H200", "cpu": "x", "torch": "2.11.0+cu130", "torchvision": "0.26.0", "python": "3.12"},
        "settings": {"size": [800, 1333], "pairs": 10, "warmup": 3, "fp32": "tf32", "amp": "fp16"},
        "results": {"train2/amp": {"images": 2, "ours_median_s": 0.05, "theirs_median_s": 0.06, "ratio": 0.833,
                                   "ours_peak_gib": 1.5, "theirs_peak_gib": 2.7, "ours_syncs": 12, "theirs_syncs": 9,
                                   "ours_profile": {"wall_ms": 50.0, "gpu_busy_ms": 30.0, "kernels": 900,
                                                    "top": [{"name": "nms_kernel", "ms": 5.0, "share": 0.2}]}}},
        "goals": [{"goal": "g", "value": 0.833, "met": False}],
        "ablation": {"amp": [{"variant": "+channels_last", "train2": 0.04}]},
    }  # fmt: skip
    text = render_gpu_block(doc)
    assert "NVIDIA H200" in text and "| 1.50 / 2.70 | 12 / 9 |" in text and "| 50.0 | 30.0 | 900 | nms_kernel 20% |" in text
    assert "| amp | defaults | - | 50.0 |" in text and "| amp | +channels_last | - | 40.0 |" in text and "**NOT met**" in text


def test_a_failing_candidate_costs_only_its_row() -> None:
    """A fast path that fails on the device (a CUDA graph capture, say) is recorded with its error;
    the other candidates are still timed and every switch is back at its default afterwards."""
    from detector.config import DetectorConfig
    from detector.model.faster_rcnn import build_detector

    ours = build_detector(DetectorConfig())

    def infer() -> None:
        if ours.cuda_graphs:
            raise RuntimeError("operation not permitted when stream is capturing")

    rows = gpu.ablation_rows(ours, {"infer1": infer}, gpu.GpuBenchSettings(device="cpu", pairs=1, warmup=0))
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["+cuda_graphs"] == {"variant": "+cuda_graphs", "error": "RuntimeError: operation not permitted when stream is capturing"}
    assert all("infer1" in r for v, r in by_variant.items() if v != "+cuda_graphs") and len(rows) == len(gpu.ABLATION)
    assert not ours.cuda_graphs and ours.backbone.conv1.weight.is_contiguous()
    doc = {"machine": {"gpu": "NVIDIA H200", "cpu": "x", "torch": "2.11.0", "torchvision": "0.26.0", "python": "3.12"},
           "settings": {"size": [800, 1333], "pairs": 1, "warmup": 0, "fp32": "tf32", "amp": "fp16"},
           "results": {"infer1/fp32": {"images": 1, "ours_median_s": 0.01, "theirs_median_s": 0.01, "ratio": 1.0,
                                       "ours_peak_gib": 1.0, "theirs_peak_gib": 1.0, "ours_syncs": 3, "theirs_syncs": 3}},
           "goals": [], "ablation": {"fp32": rows}}  # fmt: skip
    assert "| fp32 | +cuda_graphs | failed: RuntimeError: operation not permitted when stream is capturing |  |" in render_gpu_block(doc)


@pytest.mark.slow
def test_cuda_channels_last_switch_keeps_the_outputs() -> None:
    """The NHWC candidate converts the weights; on CPU (where the flag itself does not apply) the
    model computes the same losses and detections with the converted weights, and switching back
    restores contiguous weights."""
    settings = BenchSettings(size=(96, 128), gt_per_image=3)
    ours, _ = build_pair(settings)
    images, targets = make_inputs(settings, 2)
    torch.manual_seed(0)
    ours.train()
    plain = {k: v.item() for k, v in ours(images, targets).items()}
    set_cuda_channels_last_(ours, True)
    assert ours.cuda_channels_last and ours.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    switched = {k: v.item() for k, v in ours(images, targets).items()}
    assert switched == pytest.approx(plain, rel=1e-5)
    set_cuda_channels_last_(ours, False)
    assert not ours.cuda_channels_last and ours.backbone.conv1.weight.is_contiguous()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@CUDA
def test_cuda_run_measures_memory_syncs_and_profile(tmp_path: Path) -> None:
    assert gpu.main(["--device", "cuda", "--size", "256x320", "--pairs", "2", "--warmup", "1", "--cases", "infer1,train2",
                     "--ablation", "--out", str(tmp_path)]) == 0  # fmt: skip
    doc = json.loads((tmp_path / "bench_gpu.json").read_text())
    row = doc["results"]["train2/fp32"]
    assert row["ours_peak_gib"] > 0 and row["theirs_peak_gib"] > 0
    assert row["ours_syncs"] is not None and row["ours_syncs"] > 0
    assert row["ours_profile"]["gpu_busy_ms"] > 0 and row["ours_profile"]["kernels"] > 0


@pytest.mark.gpu
@CUDA
def test_cuda_fast_path_candidates_keep_the_outputs() -> None:
    """On CUDA, NHWC and BN folding switched on and off give the same detections and losses up to
    float rounding (TF32 off here so that rounding stays at float32's)."""
    torch.backends.cudnn.allow_tf32 = False
    settings = BenchSettings(size=(256, 320), gt_per_image=3)
    ours, _ = build_pair(settings)
    ours = ours.cuda()
    images, targets = make_inputs(settings, 2)
    images = [im.cuda() for im in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]

    def outputs() -> tuple[dict[str, float], torch.Tensor]:
        ours.train()
        torch.manual_seed(0)
        losses = {k: v.item() for k, v in ours(images, targets).items()}
        ours.eval()
        with torch.inference_mode():
            boxes = ours(images[:1])[0]["boxes"]
        return losses, boxes

    plain_losses, plain_boxes = outputs()
    for name, switch in gpu.ABLATION.items():
        default = name == "fold_bn"
        switch(ours, not default)
        losses, boxes = outputs()
        switch(ours, default)
        assert losses == pytest.approx(plain_losses, rel=1e-4), name
        assert boxes.shape == plain_boxes.shape and torch.allclose(boxes, plain_boxes, rtol=1e-4, atol=1e-2), name
