"""Optimiser, learning-rate schedule and mixed precision of a cell (reference 1.4, 1.5 TNR, 1.7).

Shorthand used below:
    it      0-based index of the iteration about to run
    L       batches per real pass over the training data on one rank (`iters_per_epoch`)
    W       warmup iterations

The schedule is a pure function of `it` (no scheduler state), so a resumed run needs nothing but
the iteration to continue with the right learning rate. The names follow detectron2's `solver`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detector.config import ScheduleConfig

# --------------------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule (reference 1.4, 1.5 TNR)
# --------------------------------------------------------------------------------------------------
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def build_optimizer(model: nn.Module, schedule: ScheduleConfig, *, lr: float) -> torch.optim.Optimizer:
    """SGD(momentum, wd) or AdamW(wd) over the trainable parameters.

    With `norm_decay_mult != 1` (TNR: 0) the weight and bias of normalisation layers get
    `weight_decay * norm_decay_mult`, as mmengine's `DefaultOptimWrapperConstructor`; a parameter
    shared by two modules is added once (`bypass_duplicate=True`).
    """
    decay: list[nn.Parameter] = []
    norm: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (norm if is_norm else decay).append(param)
    wd = schedule.weight_decay
    if schedule.norm_decay_mult == 1.0:
        groups: list[dict[str, Any]] = [{"params": decay + norm, "weight_decay": wd}]
    else:
        groups = [{"params": decay, "weight_decay": wd}, {"params": norm, "weight_decay": wd * schedule.norm_decay_mult}]
    groups = [g for g in groups if g["params"]]
    if schedule.optimizer == "sgd":
        # On CPU, torch's fused SGD makes the step's passes over each parameter (weight decay, momentum,
        # update) one: R-50-FPN's step 0.093 -> 0.028 s, DC5's (a 100M-parameter fc6) 0.60 -> 0.095 s on
        # one AVX2 core; the same update up to float rounding (5e-8 relative, test_solver.py). Other
        # devices keep torch's default (foreach on CUDA).
        on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
        return torch.optim.SGD(groups, lr=lr, momentum=schedule.momentum, weight_decay=wd, fused=on_cpu or None)
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {schedule.optimizer!r}; allowed: 'sgd', 'adamw'")


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """Linear warmup times MultiStep decay, in iterations (reference 1.4).

    Attributes:
        base_lr: the recipe's lr for `base_batch_size` images per iteration.
        lr: `base_lr * total_batch / base_batch_size` (linear scaling rule).
        milestones: iterations at which the lr is multiplied by `gamma`.
    """

    base_lr: float
    lr: float
    lr_rescaled: bool
    max_iters: int
    iters_per_epoch: int
    warmup_iters: int
    warmup_ratio: float
    milestones: tuple[int, ...]
    gamma: float

    def lr_at(self, it: int) -> float:
        """The lr of 0-based iteration `it`. Warmup as mmengine `LinearLR(start_factor=ratio,
        end=W)`: factor ratio at it=0 rising linearly to 1 at it=W-1; MultiStep multiplies by
        gamma once per milestone <= it (`MultiStepLR` converted from epochs to iterations)."""
        factor = self.gamma ** sum(it >= m for m in self.milestones)
        if it < self.warmup_iters:
            frac = it / (self.warmup_iters - 1) if self.warmup_iters > 1 else 0.0
            factor *= self.warmup_ratio + (1.0 - self.warmup_ratio) * frac
        return self.lr * factor


def make_schedule(
    schedule: ScheduleConfig,
    *,
    iters_per_epoch: int,
    total_batch: int,
    max_iters: int | None = None,
    warmup_iters: int | None = None,
) -> tuple[LRSchedule, list[str]]:
    """Resolve the recipe's epochs into iterations for this run.

    An mmdet "epoch" is `repeat_times` real passes (RepeatDataset; ms-3x: 12 x 3 = 36 passes,
    milestones [9, 11] = real epochs 27 and 33, reference Q4). With an iteration budget
    (`max_iters`) the milestones keep their fraction of the schedule and the warmup is capped at a
    third of the budget; both are returned as deviations.

    Returns:
        The schedule and the list of deviations from the recipe it implies.
    """
    if iters_per_epoch < 1:
        raise ValueError("the training data gives no batch; check the dataset and images_per_gpu")
    deviations = []
    lr = schedule.lr * total_batch / schedule.base_batch_size
    recipe_iters = schedule.max_epochs * schedule.repeat_times * iters_per_epoch
    if max_iters is None:
        total = recipe_iters
        milestones = tuple(m * schedule.repeat_times * iters_per_epoch for m in schedule.milestones)
        warmup = schedule.warmup_iters if warmup_iters is None else warmup_iters
    else:
        total = max_iters
        milestones = tuple(round(m / schedule.max_epochs * total) for m in schedule.milestones)
        warmup = min(schedule.warmup_iters, max(total // 3, 1)) if warmup_iters is None else warmup_iters
        deviations.append(
            f"iteration budget {total} instead of {schedule.max_epochs * schedule.repeat_times} epochs "
            f"({recipe_iters} iterations here); lr milestones at the same fractions: {list(milestones)}"
        )
    if warmup != schedule.warmup_iters:
        deviations.append(f"warmup {warmup} iterations instead of {schedule.warmup_iters}")
    plan = LRSchedule(
        base_lr=schedule.lr, lr=lr, lr_rescaled=total_batch != schedule.base_batch_size, max_iters=total,
        iters_per_epoch=iters_per_epoch, warmup_iters=warmup, warmup_ratio=schedule.warmup_ratio,
        milestones=milestones, gamma=schedule.gamma,
    )  # fmt: skip
    return plan, deviations


# --------------------------------------------------------------------------------------------------
# Mixed precision (reference 1.7)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Amp:
    """What runs: `name` is "fp32" | "fp16" | "bf16"; `deviation` says why it differs from the cell."""

    name: str
    device_type: str
    dtype: torch.dtype | None = None
    deviation: str | None = None
    emulated: bool = False  # bf16 on a CPU without native bf16: `detector.train.emulated_bf16`

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        if not self.emulated:
            return torch.autocast(self.device_type, dtype=self.dtype)
        from detector.train.emulated_bf16 import EmulatedBf16

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device_type, dtype=self.dtype))
        stack.enter_context(EmulatedBf16())
        return stack


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU natively (AVX-512 BF16 or AMX). Without it torch falls back
    to generic bf16 kernels, a smoke-size R-50-FPN training step 9.5x its fp32 time (18.7 s against
    2.0 s, AMD EPYC Milan, AVX2): `resolve_amp` then emulates bf16 (`detector.train.emulated_bf16`)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without this probe: assume native
        return True


# Said in the deviation: the speed of such a cell is fp32's, not what bf16 kernels would give.
EMULATED_BF16 = ("this CPU has no native bf16: convolutions and matrix products run as fp32 kernels on "
                 "bf16-rounded inputs, rounded to bf16 (bf16 kernels' numbers, fp32's speed)")


def resolve_amp(precision: str, device: torch.device) -> Amp:
    """fp32; amp_fp16 = autocast fp16 (+ loss scaling) on CUDA, bf16 autocast on CPU; bf16."""
    if precision == "fp32":
        return Amp(name="fp32", device_type=device.type)
    if precision == "amp_fp16":
        if device.type == "cuda":
            return Amp(name="fp16", device_type="cuda", dtype=torch.float16)
        emulated = not cpu_has_native_bf16()
        how = f"; {EMULATED_BF16}" if emulated else ""
        return Amp(name="bf16", device_type=device.type, dtype=torch.bfloat16, emulated=emulated,
                   deviation=f"amp fp16 on cpu: bf16 autocast instead (fp16 autocast needs CUDA){how}")  # fmt: skip
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            return Amp(name="bf16", device_type="cpu", dtype=torch.bfloat16, emulated=True, deviation=EMULATED_BF16)
        return Amp(name="bf16", device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; allowed: 'fp32', 'amp_fp16', 'bf16'")


class StaticLossScaler(torch.amp.GradScaler):
    """A constant loss scale (the 2020 FP16 checkpoint used 512, reference 1.7), built as mmengine's
    `AmpOptimWrapper(loss_scale=512.)` builds it: a `GradScaler(init_scale=512)` whose `update()`
    sets the scale back to 512, so a step whose gradients overflow is skipped and the scale never
    moves. GradScaler checks and unscales all gradients in one fused kernel with one host sync per
    step (a Python loop over the parameters cost a sync per parameter on CUDA)."""

    def __init__(self, scale: float, device: str = "cuda") -> None:
        super().__init__(device, init_scale=float(scale))
        self.fixed_scale = float(scale)

    def update(self, new_scale: float | Tensor | None = None) -> None:
        super().update(self.fixed_scale if new_scale is None else new_scale)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) == {"scale"}:  # a checkpoint of the earlier scaler, which stored only the scale
            state = {**self.state_dict(), "scale": float(state["scale"])}
        super().load_state_dict(state)


def make_scaler(amp: Amp, loss_scale: float | str) -> Any | None:
    """Loss scaling for fp16 only: dynamic `GradScaler` (mmengine `AmpOptimWrapper` default) or a
    static scale when the recipe gives a number."""
    if amp.name != "fp16":
        return None
    if loss_scale == "dynamic":
        return torch.amp.GradScaler(amp.device_type)
    return StaticLossScaler(float(loss_scale), amp.device_type)


__all__ = [
    "Amp",
    "cpu_has_native_bf16",
    "LRSchedule",
    "StaticLossScaler",
    "build_optimizer",
    "make_scaler",
    "make_schedule",
    "resolve_amp",
]
