"""`python -m detector.run CELL_DIR`: train, evaluate and measure one cell (ARCHITECTURE.md, "the one door").

Reads `CELL_DIR/spec.json` (`{"config": DetectorConfig, "run": RunConfig}`), resumes from
`CELL_DIR/checkpoints/latest.pt` when present, appends to `CELL_DIR/log.jsonl`, and writes
`CELL_DIR/metrics.json` atomically. Exit codes: 0 ok; 3 non-finite loss (metrics.json has
`"status": "failed"`, the iteration and the loss terms); anything else is a crash (traceback on stderr).

Under `torchrun --nproc-per-node N -m detector.run CELL_DIR` every rank trains its share of each
batch (DistributedDataParallel; gloo on CPU, NCCL on CUDA), evaluates its share of the test set,
and rank 0 gathers the detections, scores them and alone writes logs, checkpoints and metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from detector import recipes
from detector.bench import measure
from detector.config import DetectorConfig, RunConfig
from detector.errors import ConfigError
from detector.jsonio import write_json_atomic
from detector.metrics import Metrics
from detector.train import checkpoint as ckpt
from detector.train import engine, solver, stopping
from detector.train.evaluate import evaluate_model

REFERENCE_GPUS, REFERENCE_IMAGES_PER_GPU = 8, 2  # reference 1.4: 8 GPUs x 2 images = 16
STOPPED = 75  # exit code (EX_TEMPFAIL): stopped on request after a checkpoint; run again to resume


def batch_deviations(world: int, images_per_gpu: int, *, base_lr: float, lr: float) -> list[str]:
    """How this run's batch differs from the recipe's 8 GPUs x 2 images, if it does.

    The recipe's total batch on fewer, larger GPUs (1 x 16, 4 x 4) keeps the lr: sampling is per image
    and each loss is divided by the batch's sample count, so the loss is the mean of 8 ranks' losses
    (tested). What remains is the padding: a batch pads to its largest image, now of K images, not 2.
    """
    recipe = REFERENCE_GPUS * REFERENCE_IMAGES_PER_GPU
    total = world * images_per_gpu
    if world == REFERENCE_GPUS and images_per_gpu == REFERENCE_IMAGES_PER_GPU:
        return []
    if total == recipe:
        return [f"{world} process(es) x {images_per_gpu} images = the recipe's total batch {recipe} ({REFERENCE_GPUS} GPUs x "
                f"{REFERENCE_IMAGES_PER_GPU}): lr {lr:g} unchanged; each batch is padded to the largest of its "
                f"{images_per_gpu} images instead of {REFERENCE_IMAGES_PER_GPU}, so features near padded edges differ"]
    return [f"{world} process(es) x {images_per_gpu} images = total batch {total} instead of {REFERENCE_GPUS} GPUs x "
            f"{REFERENCE_IMAGES_PER_GPU} = {recipe}; lr {base_lr:g} -> {lr:g} (linear scaling)"]


def read_spec(cell_dir: Path) -> tuple[DetectorConfig, RunConfig]:
    """The cell's two configs from `CELL_DIR/spec.json`; errors name the file and the field."""
    path = cell_dir / "spec.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (the harness writes it before starting a cell)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    if not isinstance(spec, dict) or set(spec) != {"config", "run"}:
        raise ConfigError(f"{path}: expected an object with exactly the keys 'config' and 'run'")
    try:
        return DetectorConfig.from_dict(spec["config"]), RunConfig.from_dict(spec["run"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Starts a process group when torchrun asked for > 1 process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"run.device: {device!r} is not a device; allowed: 'cpu', 'cuda', 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device: {device!r} but CUDA is not available here; allowed: 'cpu'")
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ConfigError(f"run.device: {device!r} is not supported; allowed: 'cpu', 'cuda', 'cuda:N'")
    if world > 1 and not dist.is_initialized():
        # Rank 0 alone scores COCO and times fps while the others wait: a generous timeout.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return (dist.get_rank() if world > 1 else 0), world, dev


class LoaderSource:
    """`engine.BatchSource` over a `detector.data.coco.build_train_loader` loader.

    Data order and augmentations derive from (seed, epoch, index) in `detector.data.coco`, so a position
    is regenerated by `set_epoch(epoch, start_batch)`. The DataLoader draws its workers' base seed
    from its own generator (seeded per epoch), never from the global torch RNG that the RPN / RoI
    samplers use: restarting the loader on resume must not shift their stream.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, seed: int) -> None:
        from detector.data.coco import AspectRatioBatchSampler

        if not isinstance(loader.batch_sampler, AspectRatioBatchSampler):
            raise TypeError("LoaderSource needs a loader from detector.data.coco.build_train_loader")
        self.loader, self.sampler, self.seed = loader, loader.batch_sampler, seed

    def __len__(self) -> int:
        return len(self.sampler)

    def batches(self, epoch: int, start: int = 0) -> Iterator[engine.Batch]:
        self.sampler.set_epoch(epoch, start)
        self.loader.generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}  # everything else is a function of (seed, epoch, position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and state.get("seed") != self.seed:
            raise ConfigError(f"checkpoint was written with run.seed {state.get('seed')}, this run has {self.seed}")


def _cycle(loader: torch.utils.data.DataLoader, n: int) -> Iterator[engine.Batch]:
    """`n` batches, going round the loader again when it is shorter (fps on a small val set)."""
    def forever() -> Iterator[engine.Batch]:
        while True:
            yield from loader
    return islice(forever(), n)


def run_cell(cell_dir: Path, cfg: DetectorConfig, run: RunConfig, *, rank: int, world: int,
             device: torch.device) -> Metrics:  # fmt: skip
    """Train, evaluate and measure; returns the metrics dict (rank 0's is complete)."""
    from detector.data import coco as D
    from detector.data.coco_eval import METRIC_KEYS
    from detector.model.faster_rcnn import build_detector, match_weight_layout_

    try:
        from detector.model import weights
    except ImportError as exc:
        raise RuntimeError(f"detector.model.weights is needed to initialise the model and cannot be imported: {exc}") from exc

    phases = _Phases()
    engine.seed_everything(run.seed, deterministic=run.deterministic)
    cfg, cap_deviation = recipes.cap_proposals(cfg, run.proposal_cap)
    model = build_detector(cfg)
    deviations = list(weights.initialise(model, cfg, run))
    match_weight_layout_(model.to(device))
    phases.mark("build")
    if cap_deviation:
        deviations.insert(0, cap_deviation)
    if run.image_scale is not None and tuple(run.image_scale) != tuple(cfg.data.scale):
        deviations.insert(0, f"image scale {tuple(run.image_scale)} instead of {tuple(cfg.data.scale)}")

    train_set = D.build_dataset(cfg, run, train=True)
    if train_set.num_classes != cfg.num_classes:
        raise ConfigError(f"config.num_classes is {cfg.num_classes} but {train_set.ann_file} selects "
                          f"{train_set.num_classes} categories (config.data.classes={list(cfg.data.classes)})")  # fmt: skip
    loader = D.build_train_loader(train_set, run.images_per_gpu, run.workers, run.seed, rank, world,
                                  pin_memory=device.type == "cuda")  # fmt: skip
    source = LoaderSource(loader, run.seed)
    total_batch = world * run.images_per_gpu
    schedule, schedule_devs = solver.make_schedule(cfg.schedule, iters_per_epoch=len(source), total_batch=total_batch,
                                                   max_iters=run.max_iters, warmup_iters=run.warmup_iters)  # fmt: skip
    deviations += schedule_devs
    deviations += batch_deviations(world, run.images_per_gpu, base_lr=schedule.base_lr, lr=schedule.lr)
    amp = solver.resolve_amp(cfg.precision, device)
    if amp.deviation:
        deviations.append(amp.deviation)

    ddp: torch.nn.Module = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = solver.build_optimizer(model, cfg.schedule, lr=schedule.lr)
    scaler = solver.make_scaler(amp, cfg.loss_scale)
    resume, fallback = ckpt.resume_checkpoint(cell_dir / "checkpoints")
    if fallback:
        deviations.append(fallback)
        if rank == 0:
            print(f"detector.run: {fallback}", file=sys.stderr, flush=True)
    if rank == 0:  # a killed run may have logged past its last checkpoint
        engine.truncate_log(cell_dir / "log.jsonl", resume["iteration"] if resume else 0)

    phases.mark("data")
    base: dict[str, Any] = {
        "world_size": world, "images_per_gpu": run.images_per_gpu, "total_batch": total_batch,
        "lr": schedule.lr, "base_lr": schedule.base_lr, "lr_rescaled": schedule.lr_rescaled,
        "resumed_from_iter": resume["iteration"] if resume else 0,
        "device": measure.device_name(device), "device_class": measure.device_class(measure.device_name(device)),
        "deviations": deviations,
    }  # fmt: skip
    try:
        with stopping.stop_on_signals():
            result = engine.train(ddp, source, optimizer, schedule, device=device, amp=amp, scaler=scaler,
                                  grad_clip=cfg.schedule.grad_clip, cell_dir=cell_dir,
                                  checkpoint_interval=run.checkpoint_interval, log_interval=run.log_interval,
                                  progress=run.progress, resume=resume)  # fmt: skip
    except engine.NonFiniteLoss as exc:
        print(f"detector.run: {exc}", file=sys.stderr)
        return failed_metrics(exc, base)
    mem_gb, mem_kind = measure.peak_memory(device)
    del resume
    phases.mark("train")

    # Evaluation: every rank predicts its share (fp32, as mmdet v3's TestLoop, reference 1.7).
    t0 = time.perf_counter()
    eval_set = D.build_dataset(cfg, run, train=False)
    if run.val_ann is not None and eval_set.ann_file != Path(run.data_root) / run.val_ann:
        deviations.append(f"evaluated on {eval_set.split} ({run.val_ann} not found under {run.data_root})")
    if run.eval_max_images is not None and len(eval_set) < len(eval_set.coco.imgs):
        deviations.append(f"evaluated on the first {len(eval_set)} of {len(eval_set.coco.imgs)} {eval_set.split} images")
    scores = evaluate_model(model, eval_set, device=device, workers=run.workers, source=f"detections of {cell_dir.name}",
                            seed=run.seed, rank=rank, world=world, progress=run.progress and rank == 0)  # fmt: skip
    # mmdet CocoMetric keys, fractions (ARCHITECTURE.md); rank 0 only
    coco: dict[str, float] = {k: scores.stats[k] for k in METRIC_KEYS} if scores is not None else {}
    eval_time = time.perf_counter() - t0
    phases.mark("eval")

    fps: dict[str, Any] = {"fps": None, "images": 0, "precision": amp.name}
    if run.bench_images > 0 and rank == 0:
        bench_loader = D.build_test_loader(eval_set, run.workers)
        bench_loader.generator = torch.Generator().manual_seed(run.seed)
        fps_amp = amp if amp.dtype is not None else None
        if run.bench_detections:
            from detector.bench.pair import BenchSettings, set_detection_bias

            bench = BenchSettings()
            set_detection_bias(model, classes=bench.det_classes, bias=bench.det_bias)
            deviations.append(f"fps measured after raising {bench.det_classes} classes' classifier bias by "
                              f"{bench.det_bias} so that the model yields up to 100 detections per image like a trained one")
        fps = measure.measure_fps(model, _cycle(bench_loader, run.bench_images + run.bench_warmup), device=device,
                                  images=run.bench_images, warmup=run.bench_warmup, amp=fps_amp)  # fmt: skip
    phases.mark("fps")
    framework_mem = _framework_memory(cfg, run, device, amp) if rank == 0 else None
    if world > 1:
        dist.barrier()

    map_ = coco.get("bbox_mAP")
    box_ap = round(map_ * 100, 1) if map_ is not None else None  # the README's "box AP" (reference 1.3)
    return Metrics(
        status="ok", coco=coco, category_ap=scores.category_ap() if scores is not None else None, box_ap=box_ap,
        mem_gb=mem_gb, mem_kind=mem_kind,
        fps=fps["fps"], fps_images=fps["images"], fps_precision=fps["precision"], framework_mem_gb=framework_mem,
        iters=result.iters, epochs=round(result.epochs, 4), train_time_s=round(result.train_time_s, 3),
        eval_time_s=round(eval_time, 3), final_loss=result.final_loss, first_loss=result.first_loss,
        # Training throughput, data loading included (the whole loop), over all ranks: what a full
        # recipe's cost is estimated from (`harness estimate`).
        train_images_per_s=_rate(result.iters * total_batch, result.train_time_s),
        s_per_iter=round(result.train_time_s / result.iters, 4) if result.iters else None,
        threads=torch.get_num_threads(),
        **{k: base[k] for k in ("world_size", "images_per_gpu", "total_batch", "lr", "base_lr", "lr_rescaled")},
        resumed_from_iter=result.resumed_from_iter, eval_split=eval_set.split, eval_images=len(eval_set),
        device=base["device"], device_class=base["device_class"], deviations=tuple(deviations),
        phase_s=phases.seconds,
    )  # fmt: skip


def _framework_memory(cfg: DetectorConfig, run: RunConfig, device: torch.device, amp: solver.Amp) -> float | None:
    """torchvision's R-50-FPN peak training memory (GB, 3 steps) on the image size this cell's
    batches pad to, in this process after the cell (`RunConfig.framework_memory`); None where it
    does not apply: not asked, not CUDA, or a cell without a torchvision counterpart."""
    if not run.framework_memory or device.type != "cuda":
        return None
    from detector.bench.cuda_memory_pair import peak_training_memory
    from detector.bench.pair import has_torchvision_counterpart

    if not has_torchvision_counterpart(cfg):
        return None

    long, short = run.image_scale or cfg.data.scale
    with torch.cuda.device(device):
        gib = peak_training_memory("torchvision", steps=3, amp=amp.name == "fp16", size=(short, long))
    return round(gib, 1)  # GiB with one decimal, as the cell's own mem_gb


class _Phases:
    """Seconds per phase of a cell: `mark(name)` closes the phase that ends now. The first phase,
    start-up, runs from the process's start (Linux /proc; 0 where unknown) to this object."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"startup": round(_process_age_s(), 3)}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


def _process_age_s() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            # Field 22 is the start time in clock ticks after boot; the command name (field 2)
            # may contain spaces, so count from the closing parenthesis.
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _rate(images: int, seconds: float) -> float | None:
    return round(images / seconds, 2) if images and seconds > 0 else None


def failed_metrics(exc: engine.NonFiniteLoss, base: dict[str, Any]) -> Metrics:
    """metrics.json of a cell stopped by a non-finite loss: what is known, null for the rest."""
    known: dict[str, Any] = {k: base.get(k) for k in ("world_size", "images_per_gpu", "total_batch", "lr", "base_lr",
                                                       "lr_rescaled", "resumed_from_iter")}
    return Metrics(
        status="failed", error=str(exc), iters=exc.iteration, **known,
        device=base.get("device"), device_class=base.get("device_class"),
        deviations=tuple(base.get("deviations", ())), failed_at_iter=exc.iteration, loss_terms=exc.loss_terms,
        threads=torch.get_num_threads(),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detector.run", description=__doc__.splitlines()[0])
    parser.add_argument("cell_dir", type=Path, help="cell folder holding spec.json")
    args = parser.parse_args(argv)
    cell_dir: Path = args.cell_dir
    cfg, run = read_spec(cell_dir)
    # A stop file left by an earlier stop would stop this run at once: the first process removes it
    # before the process group forms (every rank checks it only inside the training loop).
    if int(os.environ.get("RANK", "0")) == 0:
        (cell_dir / stopping.STOP_FILE).unlink(missing_ok=True)
    rank, world, device = setup_distributed(run.device)
    try:
        metrics = run_cell(cell_dir, cfg, run, rank=rank, world=world, device=device)
        if rank == 0:
            write_json_atomic(cell_dir / "metrics.json", metrics.to_dict(), indent=2)
    except stopping.Stopped as stopped:
        print(f"detector.run: {stopped}", file=sys.stderr, flush=True)
        return STOPPED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if metrics.status == "ok" else 3


if __name__ == "__main__":
    sys.exit(main())
