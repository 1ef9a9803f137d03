"""Training and evaluation loops: optimiser, learning-rate schedule, mixed precision, logging.

Shorthand used below:
    it      global iteration; 0-based inside the loop (the one about to run), 1-based in the logs
    L       batches per real pass over the training data on one rank (`len(source)`)
    T       the iteration budget (`LRSchedule.max_iters`)
    Batch   (images, targets, metas): images `list[Tensor[3, H_i, W_i]]` float in [0, 255],
            targets `list[{"boxes": Tensor[N, 4] x1y1x2y2, "labels": Tensor[N] int64}]`,
            metas `list[dict]` (image_id, original size, scale factor), as `detector.data` collates.

The loop follows torchvision's `references/detection/engine.py` (autocast + GradScaler, a stop on a
non-finite loss) with detectron2's `train_loop` bookkeeping (iteration-based, resumable). The
schedule is a pure function of the iteration, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from detector import checkpoint as ckpt
from detector.config import ScheduleConfig

Batch = tuple[list[Tensor], list[dict[str, Tensor]], list[dict[str, Any]]]
LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox")


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN / inf loss; the cell stops as failed (`detector.run` exit code 3)."""

    def __init__(self, iteration: int, loss_terms: dict[str, float]) -> None:
        super().__init__(f"non-finite loss at iteration {iteration}: {loss_terms}")
        self.iteration = iteration
        self.loss_terms = loss_terms


class BatchSource(Protocol):
    """Training batches per real epoch, restartable at any position (the sampler position)."""

    def __len__(self) -> int: ...  # L: batches per epoch on this rank

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...  # batches start..L-1

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------------
# Seeding and distributed helpers
# --------------------------------------------------------------------------------------------------
def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (all devices). Every rank gets the same seed, as mmdet's
    default `diff_rank_seed=False` (reference 1.4); data order is split by rank, not by seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this before its first use to pick deterministic workspaces.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    # reference 1.4: the default runtime keeps cudnn.benchmark off.
    torch.backends.cudnn.benchmark = False


def dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(values: Tensor, op: str = "mean") -> Tensor:
    """Mean / max / sum of a tensor over ranks (identity without a process group)."""
    rank, world = dist_rank_world()
    if world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return values / world if op == "mean" else values


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
    decay, norm, seen = [], [], set()
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
        return torch.optim.SGD(groups, lr=lr, momentum=schedule.momentum, weight_decay=wd)
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

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_amp(precision: str, device: torch.device) -> Amp:
    """fp32; amp_fp16 = autocast fp16 (+ loss scaling) on CUDA, bf16 autocast on CPU; bf16."""
    if precision == "fp32":
        return Amp(name="fp32", device_type=device.type)
    if precision == "amp_fp16":
        if device.type == "cuda":
            return Amp(name="fp16", device_type="cuda", dtype=torch.float16)
        return Amp(name="bf16", device_type=device.type, dtype=torch.bfloat16,
                   deviation="amp fp16 on cpu: bf16 autocast instead (fp16 autocast needs CUDA)")  # fmt: skip
    if precision == "bf16":
        return Amp(name="bf16", device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; allowed: 'fp32', 'amp_fp16', 'bf16'")


class StaticLossScaler:
    """A constant loss scale (the 2020 FP16 checkpoint used 512, reference 1.7) with the
    `GradScaler` methods the loop uses; a step whose gradients overflow is skipped."""

    def __init__(self, scale: float) -> None:
        self.scale_value = float(scale)
        self._unscaled: set[int] = set()

    def scale(self, loss: Tensor) -> Tensor:
        return loss * self.scale_value

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) not in self._unscaled:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(self.scale_value)
            self._unscaled.add(id(optimizer))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.unscale_(optimizer)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            optimizer.step()

    def update(self) -> None:
        self._unscaled.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale_value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale_value = float(state["scale"])


def make_scaler(amp: Amp, loss_scale: float | str) -> Any | None:
    """Loss scaling for fp16 only: dynamic `GradScaler` (mmengine `AmpOptimWrapper` default) or a
    static scale when the recipe gives a number."""
    if amp.name != "fp16":
        return None
    if loss_scale == "dynamic":
        return torch.amp.GradScaler(amp.device_type)
    return StaticLossScaler(float(loss_scale))


# --------------------------------------------------------------------------------------------------
# Progress bar and JSONL log
# --------------------------------------------------------------------------------------------------
class Progress:
    """A minimal progress bar on stderr: redrawn in place on a terminal, one line per 10% else."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, start: int = 0) -> None:
        self.total, self.desc, self.enabled, self.n = max(total, 1), desc, enabled, start
        self.tty = sys.stderr.isatty()
        self.t0, self.last_draw, self.last_decile = time.perf_counter(), 0.0, start * 10 // self.total

    def update(self, n: int = 1, **info: Any) -> None:
        self.n += n
        if not self.enabled:
            return
        now, decile = time.perf_counter(), self.n * 10 // self.total
        if self.tty and (now - self.last_draw > 0.2 or self.n >= self.total):
            self._draw(now, info, end="\r")
        elif not self.tty and (decile > self.last_decile or self.n >= self.total):
            self._draw(now, info, end="\n")
        self.last_draw, self.last_decile = now, decile

    def _draw(self, now: float, info: dict[str, Any], end: str) -> None:
        frac = min(self.n / self.total, 1.0)
        bar = "#" * int(frac * 20)
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        sys.stderr.write(f"{self.desc} [{bar:<20}] {self.n}/{self.total} {now - self.t0:.0f}s {extra}{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def memory_mb(device: torch.device) -> int:
    """Peak memory so far in MB: CUDA `max_memory_allocated` (never reset, reference 2.1 / Q8), or
    the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) // 2**20)
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)  # Linux: KiB


# --------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TrainResult:
    iters: int
    epochs: float
    first_loss: float | None
    final_loss: float | None
    train_time_s: float
    resumed_from_iter: int


@dataclass(kw_only=True)
class _Window:
    """Running sums over the current log window (mmdet LogProcessor averages over its window)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    time: float = 0.0
    data_time: float = 0.0

    def add(self, terms: dict[str, float], dt: float, data_dt: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count, self.time, self.data_time = self.count + 1, self.time + dt, self.data_time + data_dt


def train(
    model: nn.Module,
    source: BatchSource,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    *,
    device: torch.device,
    amp: Amp,
    scaler: Any | None = None,
    grad_clip: float | None = None,
    cell_dir: Path | None = None,
    checkpoint_interval: int = 1000,
    log_interval: int = 50,
    progress: bool = True,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` (bare or DDP-wrapped) for `schedule.max_iters` iterations.

    Rank 0 appends one JSON line per `log_interval` to `cell_dir/log.jsonl` and saves
    `cell_dir/checkpoints/` every `checkpoint_interval` iterations and at the end. `resume` is a
    `detector.checkpoint.load_checkpoint` dict; the run then continues exactly where it stopped.

    Raises:
        NonFiniteLoss: the loss (reduced over ranks, so every rank raises together) is NaN / inf.
    """
    rank, world = dist_rank_world()
    bare, n_batches = unwrap(model), len(source)
    it, epoch, in_epoch, extra = 0, 0, 0, {}
    if resume is not None:
        bare.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler") is not None:
            scaler.load_state_dict(resume["scaler"])
        source.load_state_dict(resume.get("data") or {})
        rngs = resume["rng"]
        ckpt.set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
        it, epoch, in_epoch, extra = resume["iteration"], resume["epoch"], resume["iter_in_epoch"], resume["extra"]
    resumed_from = it
    first_loss, last_log_loss = extra.get("first_loss"), extra.get("last_log_loss")
    win = _Window(**extra["window"]) if "window" in extra else _Window()
    elapsed_before, t_start = float(extra.get("train_time_s", 0.0)), time.perf_counter()
    log_path = cell_dir / "log.jsonl" if cell_dir is not None and rank == 0 else None
    if log_path is not None:
        cell_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = cell_dir / "checkpoints" if cell_dir is not None else None
    bar = Progress(schedule.max_iters, "train", enabled=progress and rank == 0, start=it)

    model.train()
    while it < schedule.max_iters:
        t_data, it_before = time.perf_counter(), it
        for images, targets, _metas in source.batches(epoch, in_epoch):
            t_iter = time.perf_counter()
            lr = schedule.lr_at(it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [img.to(device, non_blocking=True) for img in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with amp.autocast():
                losses = model(images, targets)
            loss = sum(losses.values())
            keys = sorted(losses)
            reduced = all_reduce(torch.stack([losses[k].detach().float() for k in keys])).tolist()
            terms = dict(zip(keys, reduced))
            terms["loss"] = float(sum(reduced))
            if not all(math.isfinite(v) for v in terms.values()):
                raise NonFiniteLoss(it + 1, terms)
            _backward_step(loss, optimizer, scaler, grad_clip)

            it, in_epoch = it + 1, in_epoch + 1
            if in_epoch == n_batches:
                epoch, in_epoch = epoch + 1, 0
            now = time.perf_counter()
            first_loss = terms["loss"] if first_loss is None else first_loss
            win.add(terms, now - t_data, t_iter - t_data)
            if it % log_interval == 0 or it == schedule.max_iters:
                last_log_loss = win.sums["loss"] / win.count
                if log_path is not None:
                    _write_log(log_path, it, it / n_batches, lr, win, memory_mb(device))
                win = _Window()
            if ckpt_dir is not None and (it % checkpoint_interval == 0 or it == schedule.max_iters):
                window = {"sums": win.sums, "count": win.count, "time": win.time, "data_time": win.data_time}
                state_extra = {"first_loss": first_loss, "last_log_loss": last_log_loss, "window": window,
                               "train_time_s": elapsed_before + time.perf_counter() - t_start}  # fmt: skip
                _save(ckpt_dir, bare, optimizer, scaler, source, it, epoch, in_epoch, state_extra, rank, world)
            bar.update(1, loss=terms["loss"], lr=lr)
            if it >= schedule.max_iters:
                break
            t_data = time.perf_counter()
        if it == it_before:
            raise RuntimeError(f"the training data gave no batch in epoch {epoch} from position {in_epoch}")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TrainResult(
        iters=it, epochs=it / n_batches, first_loss=first_loss, final_loss=last_log_loss,
        train_time_s=elapsed_before + time.perf_counter() - t_start, resumed_from_iter=resumed_from,
    )  # fmt: skip


def _backward_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: Any | None, grad_clip: float | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is None:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _write_log(path: Path, it: int, epoch: float, lr: float, win: _Window, mem: int) -> None:
    row: dict[str, Any] = {"iter": it, "epoch": round(epoch, 4), "lr": lr}
    row.update({k: v / win.count for k, v in win.sums.items()})
    row.update({"time": win.time / win.count, "data_time": win.data_time / win.count, "memory": mem})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _save(ckpt_dir: Path, bare: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any | None,
          source: BatchSource, it: int, epoch: int, in_epoch: int, extra: dict[str, Any], rank: int,
          world: int) -> None:  # fmt: skip
    """Every rank contributes its RNG state (their streams differ once they see different images);
    rank 0 writes."""
    rngs = [ckpt.rng_state()]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if rank == 0:
        state = ckpt.training_state(model=bare, optimizer=optimizer, scaler=scaler, iteration=it, epoch=epoch,
                                    iter_in_epoch=in_epoch, rng=rngs, data=source.state_dict(), extra=extra)  # fmt: skip
        ckpt.save_checkpoint(ckpt_dir, state, iteration=it)
    if world > 1:
        dist.barrier()


def truncate_log(path: Path, upto_iter: int) -> None:
    """Drop log lines past `upto_iter` (written by a killed run after its last checkpoint), so a
    resumed run's log has each iteration once."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("iter", 0) <= upto_iter]  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Evaluation loop
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    device: torch.device,
    amp: Amp | None = None,
    progress: bool = False,
    total: int | None = None,
) -> tuple[list[dict[str, Tensor]], list[dict[str, Any]]]:
    """Run the model over `loader` in eval mode.

    Returns:
        outputs: per image `{"boxes": (K, 4), "scores": (K,), "labels": (K,)}` on the CPU, boxes in
            the original image's pixels (the model rescales to `original_sizes`).
        metas: the matching per-image metas.
    """
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    outputs: list[dict[str, Tensor]] = []
    metas_out: list[dict[str, Any]] = []
    bar = Progress(total or 0, "eval", enabled=progress and total is not None)
    for images, _targets, metas in loader:
        images = [img.to(device, non_blocking=True) for img in images]
        with amp.autocast() if amp is not None else contextlib.nullcontext():
            dets = bare(images, original_sizes=[original_size(m) for m in metas])
        outputs.extend({k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in d.items()} for d in dets)
        metas_out.extend(metas)
        bar.update(len(images))
    bar.close()
    bare.train(was_training)
    return outputs, metas_out


def original_size(meta: dict[str, Any]) -> tuple[int, int]:
    """(h, w) of the image before resizing, from a `detector.data` meta dict."""
    size = meta.get("orig_size", meta.get("original_size"))
    if size is None:
        raise KeyError(f"image meta without 'orig_size': keys {sorted(meta)}")
    return int(size[0]), int(size[1])


__all__ = [
    "Amp",
    "Batch",
    "BatchSource",
    "LRSchedule",
    "NonFiniteLoss",
    "Progress",
    "StaticLossScaler",
    "TrainResult",
    "all_reduce",
    "build_optimizer",
    "dist_rank_world",
    "make_scaler",
    "make_schedule",
    "memory_mb",
    "predict",
    "resolve_amp",
    "seed_everything",
    "train",
    "truncate_log",
    "unwrap",
]
