"""Our R-50-FPN Faster R-CNN side by side with torchvision's `fasterrcnn_resnet50_fpn`.

`python -m detector.bench.vs_torchvision [--pairs N] [--threads T] [--out DIR] [--size HxW]` (what
`nox -s bench` runs) builds both detectors alike in one process, times them in alternating pairs and
writes `DIR/bench.json` and the measured block of `DIR/benchmarks.md` (the hand-written profile notes
around that block are kept). With `--device cuda` (`nox -s bench -- --device cuda`) the run is
`detector.bench.gpu`'s instead: fp32 and AMP, four cases, peak CUDA memory, host syncs and a profile.

Shorthand: "ours" is `build_detector(DetectorConfig())` (faster-rcnn_r50_fpn_1x_coco); "theirs" is
torchvision's Faster R-CNN built the way `fasterrcnn_resnet50_fpn(weights_backbone=...)` builds it
(FrozenBatchNorm2d, 3 trainable stages), minus the download. A ratio is ours / theirs: below 1 means
ours is faster (or smaller).

Alike (`detector.bench.pair`): the same random weights, proposal counts, classes, thresholds, image
and targets; here also the same SGD settings and torch thread count, torchvision's transform counted
as part of its call. `--ablation` also times ours with its fast paths switched on one by one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from detector.bench.pair import (
    DIFFERENCES,
    BenchSettings,
    build_pair,
    build_torchvision,
    copy_weights,
    make_inputs,
    theirs_inputs,
    torchvision_kwargs,
)
from detector.bench.report import BEGIN, END, write_reports
from detector.bench.syncs import count_operators, count_syncs
from detector.bench.timing import machine, paired_summary, time_rounds
from detector.model.backbones import set_fold_bn_
from detector.model.faster_rcnn import FasterRCNN, cpu_trains_nhwc, match_weight_layout_

# --------------------------------------------------------------------------- one call of each kind


def infer_call(model: nn.Module, images: list[Tensor]) -> Callable[[], list[dict[str, Tensor]]]:
    """Batch-1 inference as torchvision's reference evaluation runs it (`torch.inference_mode`)."""

    def call() -> list[dict[str, Tensor]]:
        model.eval()
        with torch.inference_mode():
            return model(images)

    return call


def _no_grad_infer(model: nn.Module, images: list[Tensor]) -> Callable[[], Any]:
    def call() -> Any:
        model.eval()
        with torch.no_grad():
            return model(images)

    return call


def train_call(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]], *, seed: int) -> Callable[[], float]:
    """One SGD step (mmdet's 1x optimiser: momentum 0.9, weight decay 1e-4; lr 0.02 / 8 for two
    images) on the summed losses. The sampler's RNG is reseeded before every step of either model."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0025, momentum=0.9, weight_decay=1e-4)

    def call() -> float:
        model.train()
        torch.manual_seed(seed)
        opt.zero_grad(set_to_none=True)
        losses = model(images, targets)
        loss = sum(losses.values())
        loss.backward()
        opt.step()
        return float(loss.detach())

    return call


# --------------------------------------------------------------------------- timing and memory


def time_pairs(ours: Callable[[], Any], theirs: Callable[[], Any], *, pairs: int, warmup: int) -> dict[str, Any]:
    """`pairs` alternating pairs (ours first in even pairs, theirs first in odd ones) after `warmup`
    untimed calls of each: `{"ratio" (median of per-pair ratios), "ours_median_s",
    "theirs_median_s", "ours_s", "theirs_s", "ratios"}`."""
    times = time_rounds({"ours": ours, "theirs": theirs}, rounds=pairs, warmup=warmup)
    return paired_summary(times["ours"], times["theirs"])


# Our fast paths in the order they were added; `ablation` switches them on one after another.
FAST_PATHS: tuple[str, ...] = ("channels_last", "fold_bn", "roi_threads", "roi_grad")


def set_fast_paths(model: FasterRCNN, *, channels_last: bool, fold_bn: bool, roi_threads: bool, roi_grad: bool) -> None:
    """The switches of ours: NHWC CPU batches and conv weights (`FasterRCNN.cpu_channels_last`, in
    training only where `cpu_trains_nhwc`; `match_weight_layout_`), frozen BN folded into its conv
    (`backbones.set_fold_bn_`), CPU RoIAlign over threads (`RoIPooler.cpu_threads`) and its gradient
    as one sparse product (`RoIPooler.cpu_sparse_grad`; training only)."""
    model.cpu_channels_last = channels_last
    model.cpu_channels_last_train = channels_last and cpu_trains_nhwc()  # as the model decides by default
    match_weight_layout_(model)  # no copy where the weights are in that layout already
    set_fold_bn_(model, "auto" if fold_bn else "off")
    model.roi_head.bbox_roi_extractor.cpu_threads = roi_threads
    model.roi_head.bbox_roi_extractor.cpu_sparse_grad = roi_grad


def ablation(ours: FasterRCNN, ours_call: Callable[[], Any], theirs_call: Callable[[], Any], *, rounds: int, warmup: int) -> list[dict[str, Any]]:
    """What each fast path wins: ours with none of them, then with each added in turn, timed in
    rotating rounds together with torchvision. Rows `{"variant", "median_s", "ratio"}` (ratio: median
    over rounds of variant / torchvision in the same round). All paths are on again afterwards."""
    variants: dict[str, Callable[[], Any]] = {"torchvision": theirs_call}
    switches: dict[str, Callable[[], Any]] = {}
    for n in range(len(FAST_PATHS) + 1):
        flags = {name: i < n for i, name in enumerate(FAST_PATHS)}
        label = "none" if n == 0 else "+" + FAST_PATHS[n - 1]
        variants[label] = ours_call
        # Untimed before each call: switching the weight layout copies every conv weight.
        switches[label] = functools.partial(set_fast_paths, ours, **flags)
    try:
        times = time_rounds(variants, rounds=rounds, warmup=warmup, setup=switches)
    finally:
        set_fast_paths(ours, **{name: True for name in FAST_PATHS})
    tv = times.pop("torchvision")
    rows = [{"variant": "torchvision", "median_s": round(statistics.median(tv), 4), "ratio": 1.0}]
    for label, ts in times.items():
        summary = paired_summary(ts, tv)
        rows.append({"variant": label, "median_s": summary["ours_median_s"], "ratio": summary["ratio"], "ratios": summary["ratios"]})
    return rows


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_probe(which: str, mode: str, settings: BenchSettings, *, calls: int = 2) -> dict[str, Any]:
    """Run in a fresh process: build both models, drop the other one, then `calls` calls (`mode`
    "infer" or "train") of `which` ("ours" / "theirs"). Returns the peak RSS during the calls minus
    the RSS just before them (MiB), the absolute peak, and whether the peak could be reset first.
    Two calls by default: the first allocates one-time state (oneDNN primitives, SGD momentum), the
    second shows the steady state; the peak covers both."""
    torch.set_num_threads(settings.threads)
    ours, theirs = build_pair(settings)
    model = match_weight_layout_(ours) if which == "ours" else theirs
    del ours, theirs
    images, targets = make_inputs(settings, 1 if mode == "infer" else settings.train_images)
    if which == "theirs":
        images, targets = theirs_inputs(images, targets)
    call = infer_call(model, images) if mode == "infer" else train_call(model, images, targets, seed=settings.seed)
    reset = _reset_peak_rss()
    before = _proc_status_kib("VmRSS")
    for _ in range(calls):
        call()
    peak = _proc_status_kib("VmHWM")
    return {"increase_mib": round((peak - before) / 1024, 1), "peak_mib": round(peak / 1024, 1), "peak_reset": reset}


def measure_memory(
    settings: BenchSettings, *, modes: tuple[str, ...] = ("infer", "train"), models: tuple[str, ...] = ("ours", "theirs")
) -> dict[str, Any]:
    """`memory_probe` of each model and mode, one fresh (spawned) process each, one at a time;
    `ratio` ours / theirs of the increases when both are measured."""
    out: dict[str, Any] = {
        "kind": "peak RSS (VmHWM) over two calls in a fresh process minus the RSS before them, MiB",
    }
    for mode in modes:
        row: dict[str, Any] = {}
        for which in models:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                row[which] = pool.submit(memory_probe, which, mode, settings).result()
        if "ours" in row and "theirs" in row:
            row["ratio"] = round(row["ours"]["increase_mib"] / max(row["theirs"]["increase_mib"], 1e-9), 4)
        out[mode] = row
    return out


def profile_ops(fn: Callable[[], Any], *, top: int = 8) -> list[dict[str, Any]]:
    """One call of `fn` under `torch.profiler`: the `top` operators by self CPU time, with their
    share of the call's total self time (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 1), "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
        for e in events[:top]
    ]


# --------------------------------------------------------------------------- the run


def run(
    settings: BenchSettings, *, profile: bool = False, ablate: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Build both, check both detect, time inference and training in alternating pairs (and, with
    `ablate`, each fast path of ours), measure memory in fresh processes. Returns bench.json."""
    torch.set_num_threads(settings.threads)
    load_before = machine()["loadavg_1_5_15"]
    ours, theirs = build_pair(settings)
    match_weight_layout_(ours)  # as a cell's run places it (NHWC weights on CPU)
    images, targets = make_inputs(settings, settings.train_images)
    tv_images, tv_targets = theirs_inputs(images, targets)

    ours_infer, theirs_infer = infer_call(ours, images[:1]), infer_call(theirs, tv_images[:1])
    detections = {"ours": int(ours_infer()[0]["boxes"].shape[0]), "theirs": int(theirs_infer()[0]["boxes"].shape[0])}
    if min(detections.values()) == 0:
        raise RuntimeError(f"both models must return detections, got {detections}")
    log(f"bench: detections per image ours {detections['ours']}, torchvision {detections['theirs']}")
    infer = time_pairs(ours_infer, theirs_infer, pairs=settings.pairs, warmup=settings.warmup)
    log(f"bench: inference ours / torchvision = {infer['ratio']} ({infer['ours_median_s']} s vs {infer['theirs_median_s']} s)")
    prof: dict[str, Any] = {}
    if profile:
        prof["infer"] = {"ours": profile_ops(ours_infer), "theirs": profile_ops(theirs_infer)}
    ablated: dict[str, Any] = {}
    if ablate:
        ablated["infer"] = ablation(ours, ours_infer, theirs_infer, rounds=settings.pairs, warmup=settings.warmup)
        log("bench: inference ablation " + ", ".join(f"{r['variant']} {r['ratio']}" for r in ablated["infer"]))

    seed = settings.seed
    ours_train = train_call(ours, images, targets, seed=seed)
    theirs_train = train_call(theirs, tv_images, tv_targets, seed=seed)
    train = time_pairs(ours_train, theirs_train, pairs=settings.train_pairs, warmup=settings.warmup)
    log(f"bench: training step ours / torchvision = {train['ratio']} ({train['ours_median_s']} s vs {train['theirs_median_s']} s)")
    if profile:
        prof["train"] = {"ours": profile_ops(ours_train), "theirs": profile_ops(theirs_train)}
    if ablate:
        ablated["train"] = ablation(ours, ours_train, theirs_train, rounds=settings.train_pairs, warmup=settings.warmup)
        log("bench: training ablation " + ", ".join(f"{r['variant']} {r['ratio']}" for r in ablated["train"]))
    # Inference counted under no_grad: inference_mode hides the nonzero inside composite ops
    # (single-argument torch.where, boolean indexing) from the counting dispatch mode. Each call
    # runs once first, as the timed calls did (what a model makes once is not counted per call).
    counted = (("infer", {"ours": _no_grad_infer(ours, images[:1]), "theirs": _no_grad_infer(theirs, tv_images[:1])}),
               ("train", {"ours": ours_train, "theirs": theirs_train}))  # fmt: skip
    syncs: dict[str, dict[str, Any]] = {}
    operators: dict[str, dict[str, Any]] = {}
    for mode, calls in counted:
        for which, call in calls.items():
            call()
            syncs.setdefault(mode, {})[which] = count_syncs(call)[1]
            operators.setdefault(mode, {})[which] = count_operators(call)
    del ours, theirs, ours_infer, theirs_infer, ours_train, theirs_train

    memory = measure_memory(settings) if settings.memory else None
    if memory is not None:
        log(f"bench: peak memory ratio inference {memory['infer']['ratio']}, training {memory['train']['ratio']}")
    mach = machine()
    mach["loadavg_before"] = load_before
    return {
        "infer_ratio": infer["ratio"],
        "train_ratio": train["ratio"],
        "infer": infer,
        "train": train,
        "memory": memory,
        "detections_per_image": detections,
        "host_syncs": {"kind": "operators that would make the host wait on CUDA, counted on CPU (detector.bench.syncs): "
                               "one call each, by operator", **syncs},
        "operators": {"kind": "ATen operators one call dispatches, backward included, and those that compute (each "
                              "at least one kernel launch on a GPU), counted on CPU (detector.bench.syncs)", **operators},
        "goal": {"infer_ratio_max": 0.8, "train_ratio_max": 0.9,
                 "met": infer["ratio"] <= 0.8 and train["ratio"] <= 0.9},
        "settings": {**dataclasses.asdict(settings), "precision": "fp32", "infer_batch": 1,
                     "timed_infer": "model(images) under torch.inference_mode()",
                     "timed_train": "zero_grad + forward + sum of losses + backward + SGD step"},
        "models": {"ours": "detector.build_detector(DetectorConfig()) faster-rcnn_r50_fpn_1x_coco",
                   "theirs": f"torchvision {torchvision.__version__} FasterRCNN(resnet_fpn_backbone('resnet50', "
                             "trainable_layers=3), num_classes=81, ...): fasterrcnn_resnet50_fpn's build"},
        "differences": list(DIFFERENCES),
        "machine": mach,
        "profile": prof or None,
        "ablation": ablated or None,
    }


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size: {text!r} is not HxW (e.g. 800x1333)") from None
    if min(h, w) < 64:
        raise argparse.ArgumentTypeError(f"--size: {text!r}: both sides must be >= 64")
    return h, w


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    # `--device cuda` (any accelerator) is the GPU benchmark, with its own options: `nox -s bench --
    # --device cuda` lands here and goes on in detector.bench.gpu.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cpu")
    known, _ = pre.parse_known_args(argv)
    if known.device != "cpu":
        from detector.bench.gpu import main as gpu_main

        return gpu_main(argv)
    parser = argparse.ArgumentParser(prog="python -m detector.bench.vs_torchvision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu"], default="cpu",
                        help="cpu (this benchmark); any other device runs `python -m detector.bench.gpu` with these arguments")  # fmt: skip
    d = BenchSettings()
    parser.add_argument("--pairs", type=_positive, default=d.pairs, help="timed inference pairs (default %(default)s)")
    parser.add_argument("--train-pairs", type=_positive, default=d.train_pairs, help="timed training pairs (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed calls of each model first (default %(default)s)")
    parser.add_argument("--threads", type=_positive, default=d.threads, help="torch threads for both (default %(default)s)")
    parser.add_argument("--size", type=_size, default=d.size, help="image HxW (default 800x1333)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for bench.json and benchmarks.md")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--profile", action="store_true", help="also profile one call of each (top operators)")
    parser.add_argument("--ablation", action="store_true", help="also time ours with its fast paths added one by one")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup: {args.warmup} must be >= 0")
    settings = BenchSettings(size=args.size, pairs=args.pairs, train_pairs=args.train_pairs, warmup=args.warmup,
                             threads=args.threads, memory=not args.no_memory)
    doc = run(settings, profile=args.profile, ablate=args.ablation)
    json_path, md_path = write_reports(doc, args.out)
    print(f"bench: wrote {json_path} and {md_path}; inference ratio {doc['infer_ratio']}, training ratio {doc['train_ratio']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["BEGIN", "DIFFERENCES", "END", "FAST_PATHS", "BenchSettings", "ablation", "build_pair", "build_torchvision",
           "copy_weights", "infer_call", "main", "make_inputs", "measure_memory", "memory_probe", "run", "set_fast_paths",
           "theirs_inputs", "time_pairs", "time_rounds", "torchvision_kwargs", "train_call", "write_reports"]
