from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from detector.config import ScheduleConfig
from detector.train import solver
from tests.resources.fakes_engine import TinyDetector

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ schedule
def test_lr_is_scaled_linearly_and_recorded() -> None:
    plan, deviations = solver.make_schedule(ScheduleConfig(), iters_per_epoch=100, total_batch=2)
    assert plan.base_lr == 0.02 and plan.lr == pytest.approx(0.0025) and plan.lr_rescaled
    assert deviations == []  # a full 12-epoch schedule with the recipe's warmup
    plan16, _ = solver.make_schedule(ScheduleConfig(), iters_per_epoch=100, total_batch=16)
    assert plan16.lr == pytest.approx(0.02) and not plan16.lr_rescaled


def test_warmup_and_multistep_follow_mmengine() -> None:
    plan, _ = solver.make_schedule(ScheduleConfig(), iters_per_epoch=1000, total_batch=16)
    assert plan.max_iters == 12_000 and plan.milestones == (8000, 11000) and plan.warmup_iters == 500
    assert plan.lr_at(0) == pytest.approx(0.02 * 0.001)
    assert plan.lr_at(499) == pytest.approx(0.02)  # LinearLR(end=500) reaches 1 at its last step
    assert plan.lr_at(250) == pytest.approx(0.02 * (0.001 + 0.999 * 250 / 499))
    assert plan.lr_at(7999) == pytest.approx(0.02)
    assert plan.lr_at(8000) == pytest.approx(0.002)
    assert plan.lr_at(11_000) == pytest.approx(0.0002)


def test_repeat_dataset_epochs_are_three_passes() -> None:
    ms3x = ScheduleConfig(max_epochs=12, milestones=(9, 11), repeat_times=3)
    plan, _ = solver.make_schedule(ms3x, iters_per_epoch=10, total_batch=16)
    # reference Q4: milestones [9, 11] of 12 x 3 = real epochs 27 and 33 of 36
    assert plan.max_iters == 360 and plan.milestones == (270, 330)


def test_iteration_budget_keeps_milestone_fractions_and_caps_warmup() -> None:
    plan, deviations = solver.make_schedule(ScheduleConfig(), iters_per_epoch=7, total_batch=2, max_iters=24)
    assert plan.max_iters == 24 and plan.milestones == (16, 22) and plan.warmup_iters == 8
    assert any("iteration budget 24" in d for d in deviations)
    assert any("warmup 8 iterations instead of 500" in d for d in deviations)
    plan, _ = solver.make_schedule(ScheduleConfig(), iters_per_epoch=7, total_batch=2, max_iters=24, warmup_iters=2)
    assert plan.warmup_iters == 2


def test_empty_training_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="no batch"):
        solver.make_schedule(ScheduleConfig(), iters_per_epoch=0, total_batch=2)


# ------------------------------------------------------------------------------------------ optimizer
def test_sgd_has_one_group_with_weight_decay_and_skips_frozen() -> None:
    model = TinyDetector()
    opt = solver.build_optimizer(model, ScheduleConfig(), lr=0.01)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["weight_decay"] == 1e-4 and group["momentum"] == 0.9
    ids = {id(p) for p in group["params"]}
    assert id(model.frozen.weight) not in ids and id(model.conv.weight) in ids


def test_fused_sgd_on_cpu_equals_the_plain_update() -> None:
    """The fused CPU step (the fast path) against torch's plain per-parameter loop, over 3 steps with
    momentum and weight decay: the same parameters up to float rounding."""
    models = [TinyDetector(), TinyDetector()]
    models[1].load_state_dict(models[0].state_dict())
    fused = solver.build_optimizer(models[0], ScheduleConfig(), lr=0.02)
    assert fused.defaults["fused"] is True
    plain = torch.optim.SGD([p for p in models[1].parameters() if p.requires_grad], lr=0.02, momentum=0.9,
                            weight_decay=1e-4, foreach=False)  # fmt: skip
    start = [p.detach().clone() for p in models[0].parameters()]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=g)
                b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(models[0].parameters(), start, strict=True))  # it stepped


def test_adamw_tnr_no_decay_on_norm_layers_and_no_duplicates() -> None:
    model = TinyDetector()
    model.reg2 = model.reg  # the same parameters reachable twice
    tnr = replace(ScheduleConfig(), optimizer="adamw", lr=1e-4, weight_decay=0.1, norm_decay_mult=0.0)
    opt = solver.build_optimizer(model, tnr, lr=1e-4)
    assert isinstance(opt, torch.optim.AdamW)
    decay, norm = opt.param_groups
    assert decay["weight_decay"] == 0.1 and norm["weight_decay"] == 0.0
    assert {id(p) for p in norm["params"]} == {id(model.bn.weight), id(model.bn.bias)}
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))


# ------------------------------------------------------------------------------------------ precision
def test_precision_resolution_on_cpu() -> None:
    assert solver.resolve_amp("fp32", CPU).dtype is None
    amp = solver.resolve_amp("amp_fp16", CPU)
    assert amp.name == "bf16" and amp.dtype == torch.bfloat16 and "bf16" in amp.deviation
    assert amp.emulated is not solver.cpu_has_native_bf16()
    assert solver.resolve_amp("bf16", CPU).dtype == torch.bfloat16
    assert solver.make_scaler(amp, "dynamic") is None  # bf16 needs no loss scaling
    with pytest.raises(ValueError, match="allowed"):
        solver.resolve_amp("fp8", CPU)
    fp16 = solver.Amp(name="fp16", device_type="cuda", dtype=torch.float16)
    assert isinstance(solver.make_scaler(fp16, 512.0), solver.StaticLossScaler)


def test_bf16_is_emulated_and_said_so_where_the_cpu_has_no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    for native in (True, False):
        monkeypatch.setattr(solver, "cpu_has_native_bf16", lambda native=native: native)
        amp = solver.resolve_amp("amp_fp16", CPU)
        assert amp.deviation is not None and amp.deviation.startswith("amp fp16 on cpu: bf16 autocast instead")
        assert ("no native bf16" in amp.deviation) is not native
        assert amp.emulated is not native
        bf16 = solver.resolve_amp("bf16", CPU)
        assert bf16.emulated is not native and (bf16.deviation is None) is native
    cuda = solver.resolve_amp("amp_fp16", torch.device("cuda"))
    assert cuda.deviation is None and not cuda.emulated  # nothing to say on CUDA


@pytest.mark.parametrize("emulated", [False, True])
def test_bf16_autocast_runs_the_model_in_bf16(emulated: bool) -> None:
    amp = solver.Amp(name="bf16", device_type="cpu", dtype=torch.bfloat16, emulated=emulated)
    lin, conv = nn.Linear(4, 4), nn.Conv2d(3, 4, 3)
    with amp.autocast():
        assert lin(torch.ones(1, 4)).dtype == torch.bfloat16
        assert conv(torch.ones(1, 3, 5, 5)).dtype == torch.bfloat16
    assert lin(torch.ones(1, 4)).dtype == torch.float32  # and nothing stays on after the block


def test_static_loss_scaler_unscales_and_skips_overflow() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = solver.StaticLossScaler(512.0, "cpu")
    scaler.scale((p * 2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.allclose(p.detach(), torch.tensor([-1.0, -1.0]))  # grad 2, unscaled from 1024
    opt.zero_grad()
    scaler.scale((p * float("inf")).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.allclose(p.detach(), torch.tensor([-1.0, -1.0]))  # overflow: step skipped
    assert scaler.get_scale() == 512.0  # and the scale did not back off (mmengine's static scale)
    state = scaler.state_dict()
    assert state["scale"] == 512.0
    again = solver.StaticLossScaler(64.0, "cpu")
    again.load_state_dict(state)
    assert again.get_scale() == 512.0
    old = solver.StaticLossScaler(64.0, "cpu")
    old.load_state_dict({"scale": 512.0})  # checkpoints of the earlier scaler resume too
    assert old.get_scale() == 512.0
