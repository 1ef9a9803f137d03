from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from detector import checkpoint as ckpt
from detector import engine
from detector.config import ScheduleConfig
from tests.detector.fakes_engine import TinyDetector, TinySource

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ schedule
def test_lr_is_scaled_linearly_and_recorded() -> None:
    plan, deviations = engine.make_schedule(ScheduleConfig(), iters_per_epoch=100, total_batch=2)
    assert plan.base_lr == 0.02 and plan.lr == pytest.approx(0.0025) and plan.lr_rescaled
    assert deviations == []  # a full 12-epoch schedule with the recipe's warmup
    plan16, _ = engine.make_schedule(ScheduleConfig(), iters_per_epoch=100, total_batch=16)
    assert plan16.lr == pytest.approx(0.02) and not plan16.lr_rescaled


def test_warmup_and_multistep_follow_mmengine() -> None:
    plan, _ = engine.make_schedule(ScheduleConfig(), iters_per_epoch=1000, total_batch=16)
    assert plan.max_iters == 12_000 and plan.milestones == (8000, 11000) and plan.warmup_iters == 500
    assert plan.lr_at(0) == pytest.approx(0.02 * 0.001)
    assert plan.lr_at(499) == pytest.approx(0.02)  # LinearLR(end=500) reaches 1 at its last step
    assert plan.lr_at(250) == pytest.approx(0.02 * (0.001 + 0.999 * 250 / 499))
    assert plan.lr_at(7999) == pytest.approx(0.02)
    assert plan.lr_at(8000) == pytest.approx(0.002)
    assert plan.lr_at(11_000) == pytest.approx(0.0002)


def test_repeat_dataset_epochs_are_three_passes() -> None:
    ms3x = ScheduleConfig(max_epochs=12, milestones=(9, 11), repeat_times=3)
    plan, _ = engine.make_schedule(ms3x, iters_per_epoch=10, total_batch=16)
    # reference Q4: milestones [9, 11] of 12 x 3 = real epochs 27 and 33 of 36
    assert plan.max_iters == 360 and plan.milestones == (270, 330)


def test_iteration_budget_keeps_milestone_fractions_and_caps_warmup() -> None:
    plan, deviations = engine.make_schedule(ScheduleConfig(), iters_per_epoch=7, total_batch=2, max_iters=24)
    assert plan.max_iters == 24 and plan.milestones == (16, 22) and plan.warmup_iters == 8
    assert any("iteration budget 24" in d for d in deviations)
    assert any("warmup 8 iterations instead of 500" in d for d in deviations)
    plan, _ = engine.make_schedule(ScheduleConfig(), iters_per_epoch=7, total_batch=2, max_iters=24, warmup_iters=2)
    assert plan.warmup_iters == 2


def test_empty_training_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="no batch"):
        engine.make_schedule(ScheduleConfig(), iters_per_epoch=0, total_batch=2)


# ------------------------------------------------------------------------------------------ optimizer
def test_sgd_has_one_group_with_weight_decay_and_skips_frozen() -> None:
    model = TinyDetector()
    opt = engine.build_optimizer(model, ScheduleConfig(), lr=0.01)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["weight_decay"] == 1e-4 and group["momentum"] == 0.9
    ids = {id(p) for p in group["params"]}
    assert id(model.frozen.weight) not in ids and id(model.conv.weight) in ids


def test_adamw_tnr_no_decay_on_norm_layers_and_no_duplicates() -> None:
    model = TinyDetector()
    model.reg2 = model.reg  # the same parameters reachable twice
    tnr = replace(ScheduleConfig(), optimizer="adamw", lr=1e-4, weight_decay=0.1, norm_decay_mult=0.0)
    opt = engine.build_optimizer(model, tnr, lr=1e-4)
    assert isinstance(opt, torch.optim.AdamW)
    decay, norm = opt.param_groups
    assert decay["weight_decay"] == 0.1 and norm["weight_decay"] == 0.0
    assert {id(p) for p in norm["params"]} == {id(model.bn.weight), id(model.bn.bias)}
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))


# ------------------------------------------------------------------------------------------ precision
def test_precision_resolution_on_cpu() -> None:
    assert engine.resolve_amp("fp32", CPU).dtype is None
    amp = engine.resolve_amp("amp_fp16", CPU)
    assert amp.name == "bf16" and amp.dtype == torch.bfloat16 and "bf16" in amp.deviation
    assert engine.resolve_amp("bf16", CPU).dtype == torch.bfloat16
    assert engine.make_scaler(amp, "dynamic") is None  # bf16 needs no loss scaling
    with pytest.raises(ValueError, match="allowed"):
        engine.resolve_amp("fp8", CPU)
    fp16 = engine.Amp(name="fp16", device_type="cuda", dtype=torch.float16)
    assert isinstance(engine.make_scaler(fp16, 512.0), engine.StaticLossScaler)


def test_bf16_autocast_runs_the_model_in_bf16() -> None:
    amp = engine.resolve_amp("bf16", CPU)
    lin = nn.Linear(4, 4)
    with amp.autocast():
        assert lin(torch.ones(1, 4)).dtype == torch.bfloat16


def test_static_loss_scaler_unscales_and_skips_overflow() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = engine.StaticLossScaler(512.0)
    scaler.scale((p * 2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.allclose(p.detach(), torch.tensor([-1.0, -1.0]))  # grad 2, unscaled from 1024
    opt.zero_grad()
    scaler.scale((p * float("inf")).sum()).backward()
    scaler.step(opt)
    assert torch.allclose(p.detach(), torch.tensor([-1.0, -1.0]))  # overflow: step skipped
    assert scaler.state_dict() == {"scale": 512.0}


# ------------------------------------------------------------------------------------------ loop
def _run(tmp: Path | None, *, max_iters: int, seed: int = 0, resume: dict | None = None, init_seed: int = 0,
         model: TinyDetector | None = None, grad_clip: float | None = None,
         weight_decay: float = 1e-4) -> tuple[TinyDetector, engine.TrainResult]:
    torch.manual_seed(init_seed)
    model = model or TinyDetector()
    source = TinySource(seed=seed)
    plan, _ = engine.make_schedule(ScheduleConfig(lr=0.2), iters_per_epoch=len(source), total_batch=2,
                                   max_iters=max_iters)
    opt = engine.build_optimizer(model, ScheduleConfig(weight_decay=weight_decay), lr=plan.lr)
    engine.seed_everything(seed)
    result = engine.train(model, source, opt, plan, device=CPU, amp=engine.resolve_amp("fp32", CPU),
                          grad_clip=grad_clip, cell_dir=tmp, checkpoint_interval=4, log_interval=3,
                          progress=False, resume=resume)
    return model, result


def test_train_logs_jsonl_and_keeps_two_checkpoints(tmp_path: Path) -> None:
    model, result = _run(tmp_path, max_iters=14)
    assert result.iters == 14 and result.resumed_from_iter == 0
    assert result.epochs == pytest.approx(14 / 6)
    assert math.isfinite(result.first_loss) and math.isfinite(result.final_loss)
    log = pd.read_json(tmp_path / "log.jsonl", lines=True)
    assert list(log["iter"]) == [3, 6, 9, 12, 14]
    for col in ("epoch", "lr", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss", "time",
                "data_time", "memory"):
        assert col in log.columns, col
    assert log["loss"].iloc[-1] == pytest.approx(result.final_loss)
    assert ckpt.checkpoint_iters(tmp_path / "checkpoints") == [12, 14]
    latest = ckpt.load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert latest["iteration"] == 14 and latest["epoch"] == 2 and latest["iter_in_epoch"] == 2
    assert torch.equal(latest["model"]["conv.weight"], model.conv.weight.detach())


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full, full_res = _run(full_dir, max_iters=10)
    state = ckpt.load_checkpoint(full_dir / "checkpoints" / "iter_8.pt")
    assert state["iteration"] == 8 and state["epoch"] == 1 and state["iter_in_epoch"] == 2
    # a different init and RNG state: everything must come from the checkpoint
    resumed, res = _run(part_dir, max_iters=10, resume=state, init_seed=99, seed=0)
    assert res.resumed_from_iter == 8 and res.iters == 10
    assert res.first_loss == full_res.first_loss and res.final_loss == full_res.final_loss
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_non_finite_loss_stops_with_iteration_and_terms(tmp_path: Path) -> None:
    with pytest.raises(engine.NonFiniteLoss) as info:
        _run(tmp_path, max_iters=10, model=TinyDetector(nan_at_call=3))
    assert info.value.iteration == 3
    assert math.isnan(info.value.loss_terms["loss_bbox"]) and "loss_cls" in info.value.loss_terms


def test_grad_clip_bounds_the_update() -> None:
    torch.manual_seed(0)
    ref = TinyDetector()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    model, _ = _run(None, max_iters=1, model=ref, grad_clip=1e-6, weight_decay=0.0)
    moved = [(model.state_dict()[k] - before[k]).norm() ** 2 for k in before if "weight" in k or "bias" in k]
    lr0 = 0.2 * 2 / 16 * 0.001  # a 1-iteration budget has a 1-iteration warmup at warmup_ratio
    assert 0 < float(sum(moved)) ** 0.5 <= lr0 * 1e-6 * 1.001


def test_predict_returns_cpu_detections_in_original_size() -> None:
    model, source = TinyDetector(), TinySource()
    outputs, metas = engine.predict(model, source.eval_batches(), device=CPU)
    assert len(outputs) == len(metas) == 12 and model.training  # mode restored
    assert set(outputs[0]) == {"boxes", "scores", "labels"} and outputs[0]["boxes"].shape == (1, 4)
    assert (outputs[0]["boxes"] <= 16).all()


def test_truncate_log_drops_lines_after_the_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"iter": i, "loss": 1.0}) + "\n" for i in (3, 6, 9)))
    engine.truncate_log(log, 6)
    assert [json.loads(x)["iter"] for x in log.read_text().splitlines()] == [3, 6]


def test_progress_writes_deciles_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    bar = engine.Progress(20, "train")
    for _ in range(20):
        bar.update(1, loss=0.5)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("train [####################] 20/20")
