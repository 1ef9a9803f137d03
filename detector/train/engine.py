"""The training loop: seeding, DDP helpers, JSONL log, progress bar, checkpoints.

The optimiser, learning-rate schedule and mixed precision live in `detector.train.solver`; a stop on
request (stop file, Slurm's signals) in `detector.train.stopping`; the evaluation loop in
`detector.train.evaluate`.

Shorthand used below:
    it      global iteration; 0-based inside the loop (the one about to run), 1-based in the logs
    L       batches per real pass over the training data on one rank (`len(source)`)
    T       the iteration budget (`LRSchedule.max_iters`)
    Batch   (images, targets, metas): images `list[Tensor[3, H_i, W_i]]` float in [0, 255],
            targets `list[{"boxes": Tensor[N, 4] x1y1x2y2, "labels": Tensor[N] int64}]`,
            metas `list[dict]` (image_id, original size, scale factor), as `detector.data.coco` collates.

The loop follows torchvision's `references/detection/engine.py` (autocast + GradScaler, a stop on a
non-finite loss) with detectron2's `train_loop` bookkeeping (iteration-based, resumable). The
schedule is a pure function of the iteration, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from detector.train import checkpoint as ckpt
from detector.train.solver import Amp, LRSchedule
from detector.train.stopping import STOP, STOP_FILE, Stopped

Batch = tuple[list[Tensor], list[dict[str, Tensor]], list[dict[str, Any]]]


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
            self.last_draw = now
        elif not self.tty and (decile > self.last_decile or self.n >= self.total):
            self._draw(now, info, end="\n")
            self.last_decile = decile

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
    checkpoint_interval: int | None = 1000,
    log_interval: int = 50,
    progress: bool = True,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` (bare or DDP-wrapped) for `schedule.max_iters` iterations.

    Rank 0 appends one JSON line per `log_interval` to `cell_dir/log.jsonl` and saves
    `cell_dir/checkpoints/` every `checkpoint_interval` iterations and at the end (never when it is
    None). `resume` is a
    `detector.train.checkpoint.load_checkpoint` dict; the run then continues exactly where it stopped.

    Raises:
        NonFiniteLoss: the loss (reduced over ranks, so every rank raises together) is NaN / inf.
    """
    rank, world = dist_rank_world()
    bare, n_batches = unwrap(model), len(source)
    it, epoch, in_epoch, extra = 0, 0, 0, {}
    if resume is not None:
        if resume["extra"].get("world_size", world) != world:
            # Batches per epoch and sampler positions depend on the world size: no exact resume.
            raise ValueError(f"the checkpoint was written by {resume['extra']['world_size']} process(es), this run "
                             f"has {world}; run with the same number of processes or delete the cell's checkpoints/")  # fmt: skip
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
        log_path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_dir = cell_dir / "checkpoints" if cell_dir is not None else None
    stop_path = cell_dir / STOP_FILE if cell_dir is not None else None
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
            # The stop request rides along with the loss reduction: no extra collective, and every
            # rank sees the same decision at the same iteration. A fill, not `torch.tensor(...,
            # device=)`: a copy from pageable host memory waits for the GPU.
            asked = STOP.requested or (stop_path is not None and stop_path.exists())
            stop_flag = torch.full((), float(asked), device=loss.device)
            logged = torch.stack([*(losses[k].detach().float() for k in keys), stop_flag])
            # The step is launched before the values are read: reading them waits for the GPU, and
            # read between forward and backward it left the GPU idle while the backward was launched.
            # A non-finite loss still ends the run at this iteration, before any checkpoint of it.
            _backward_step(loss, optimizer, scaler, grad_clip)
            reduced = all_reduce(logged).tolist()
            stop = reduced.pop() > 0
            terms = dict(zip(keys, reduced))
            terms["loss"] = float(sum(reduced))
            if not all(math.isfinite(v) for v in terms.values()):
                raise NonFiniteLoss(it + 1, terms)

            it, in_epoch = it + 1, in_epoch + 1
            if in_epoch == n_batches:
                epoch, in_epoch = epoch + 1, 0
            now = time.perf_counter()
            first_loss = terms["loss"] if first_loss is None else first_loss
            win.add(terms, now - t_data, t_iter - t_data)
            if it % log_interval == 0 or it == schedule.max_iters:
                last_log_loss = win.sums["loss"] / win.count
                if log_path is not None:
                    _write_log(log_path, it, it / n_batches, lr, win, memory_mb(device), schedule.max_iters, len(images) * world)
                win = _Window()
            if ckpt_dir is not None and (stop or checkpoint_interval is not None and (
                it % checkpoint_interval == 0 or it == schedule.max_iters
            )):
                window = {"sums": win.sums, "count": win.count, "time": win.time, "data_time": win.data_time}
                state_extra = {"first_loss": first_loss, "last_log_loss": last_log_loss, "window": window,
                               "train_time_s": elapsed_before + time.perf_counter() - t_start, "world_size": world}  # fmt: skip
                _save(ckpt_dir, bare, optimizer, scaler, source, it, epoch, in_epoch, state_extra, rank, world)
            bar.update(1, loss=terms["loss"], lr=lr)
            if stop and it < schedule.max_iters and ckpt_dir is not None:
                bar.close()
                raise Stopped(it)
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


def _write_log(path: Path, it: int, epoch: float, lr: float, win: _Window, mem: int, max_iters: int,
               total_batch: int) -> None:  # fmt: skip
    # max_iters, total_batch: what the harness's live progress line needs (iteration N of max_iters,
    # images per second, ETA).
    row: dict[str, Any] = {"iter": it, "max_iters": max_iters, "total_batch": total_batch, "epoch": round(epoch, 4),
                           "lr": lr}  # fmt: skip
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


__all__ = [
    "Batch",
    "BatchSource",
    "NonFiniteLoss",
    "Progress",
    "TrainResult",
    "all_reduce",
    "dist_rank_world",
    "memory_mb",
    "seed_everything",
    "train",
    "truncate_log",
    "unwrap",
]
