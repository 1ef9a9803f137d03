"""Our R-50-FPN Faster R-CNN side by side with torchvision's `fasterrcnn_resnet50_fpn`.

`python -m detector.bench_vs_torchvision [--pairs N] [--threads T] [--out DIR] [--size HxW]` (what
`nox -s bench` runs) builds both detectors alike in one process, times them in alternating pairs and
writes `DIR/bench.json` and the measured block of `DIR/benchmarks.md` (the hand-written profile notes
around that block are kept).

Shorthand: "ours" is `build_detector(DetectorConfig())` (faster-rcnn_r50_fpn_1x_coco); "theirs" is
torchvision's Faster R-CNN built the way `fasterrcnn_resnet50_fpn(weights_backbone=...)` builds it
(FrozenBatchNorm2d, 3 trainable stages), minus the download. A ratio is ours / theirs: below 1 means
ours is faster (or smaller).

Alike means: the same random weights (ours are copied into theirs, class rows reordered: mmdet puts
background last, torchvision first), the same proposal counts, classes, thresholds and anchors, the
same image (ours gets RGB in [0, 255], theirs the same pixels / 255 at the size its transform keeps,
its transform counted as part of its call), the same targets, SGD settings and thread count. What
cannot be alike is listed in `DIFFERENCES` and in benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from detector.config import DetectorConfig
from detector.model import FasterRCNN, build_detector

# What stays different between the two models; each is the recipe (mmdet) against torchvision.
DIFFERENCES: tuple[str, ...] = (
    "RoIAlign: ours sampling_ratio=0 (adaptive, ceil(roi_size / 7) samples per bin side) and "
    "aligned=True (mmcv defaults); torchvision sampling_ratio=2, aligned=False",
    "backbone norm: ours nn.BatchNorm2d with frozen statistics and a trainable affine in res3-res5 "
    "(mmdet norm_eval=True, requires_grad=True); torchvision FrozenBatchNorm2d (affine not trained)",
    "box losses: ours L1 (RPN and RoI head); torchvision smooth L1 with beta 1/9",
    "anchors: torchvision rounds its base anchors to integers; mmdet does not",
    "proposals: torchvision also drops boxes under 1e-3 px (RPN) and 1e-2 px (detections); mmdet does not",
    "input: torchvision's transform normalises and bilinearly resizes (a 1.0 scale here) inside the "
    "call; ours normalises and pads inside the call, the data pipeline resizes",
    "init: fc6/fc7, FPN and RPN weights are ours copied over (Xavier, mmdet's), not torchvision's own init",
)


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """One benchmark run. `size` is (h, w) of the image both models see unchanged."""

    size: tuple[int, int] = (800, 1333)
    pairs: int = 7
    train_pairs: int = 5
    warmup: int = 1
    threads: int = 2
    train_images: int = 2
    gt_per_image: int = 8
    seed: int = 0
    # Detections from random weights: both classifiers get +`det_bias` on these foreground classes
    # (the other logits are ~0), so their softmax score passes the 0.05 threshold in both models.
    det_classes: int = 2
    det_bias: float = 4.0
    memory: bool = True


# --------------------------------------------------------------------------- building both alike


def our_config() -> DetectorConfig:
    """faster-rcnn_r50_fpn_1x_coco (the `DetectorConfig` defaults), 80 classes."""
    return DetectorConfig()


def torchvision_kwargs(cfg: DetectorConfig, size: tuple[int, int]) -> dict[str, Any]:
    """`torchvision.models.detection.FasterRCNN` keyword arguments equal to `cfg` (reference 1.2).

    `min_size` / `max_size` are the short / long side of `size`, so torchvision's transform keeps a
    `size` image at scale 1.0 (800 x 1333 -> 800, 1333, as for ours).
    """
    rpn, roi, norm = cfg.rpn, cfg.roi_head, cfg.normalize
    if rpn.train.nms_iou != rpn.test.nms_iou:
        raise ValueError("torchvision has one rpn_nms_thresh for train and test")
    return {
        "min_size": min(size),
        "max_size": max(size),
        "image_mean": [m / 255 for m in norm.mean],
        "image_std": [s / 255 for s in norm.std],
        "rpn_pre_nms_top_n_train": rpn.train.nms_pre,
        "rpn_pre_nms_top_n_test": rpn.test.nms_pre,
        "rpn_post_nms_top_n_train": rpn.train.max_per_img,
        "rpn_post_nms_top_n_test": rpn.test.max_per_img,
        "rpn_nms_thresh": rpn.test.nms_iou,
        "rpn_fg_iou_thresh": rpn.pos_iou_thr,
        "rpn_bg_iou_thresh": rpn.neg_iou_thr,
        "rpn_batch_size_per_image": rpn.num_samples,
        "rpn_positive_fraction": rpn.pos_fraction,
        "rpn_score_thresh": 0.0,
        "box_score_thresh": roi.score_thr,
        "box_nms_thresh": roi.nms_iou,
        "box_detections_per_img": roi.max_per_img,
        "box_fg_iou_thresh": roi.pos_iou_thr,
        "box_bg_iou_thresh": roi.neg_iou_thr,
        "box_batch_size_per_image": roi.num_samples,
        "box_positive_fraction": roi.pos_fraction,
    }


def build_torchvision(cfg: DetectorConfig, size: tuple[int, int]) -> TVFasterRCNN:
    """torchvision's R-50-FPN Faster R-CNN as `fasterrcnn_resnet50_fpn` builds it for a user who
    fine-tunes from ImageNet weights (FrozenBatchNorm2d, `trainable_backbone_layers=3`: stem and res2
    frozen like our `frozen_stages=1`), with `num_classes` = ours + background and random weights.

    (`fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)` would switch to training
    BatchNorm2d with batch statistics and all stages trainable: a setup nobody trains a detector in.)
    """
    if cfg.backbone.depth != 50 or cfg.neck.kind != "fpn":
        raise ValueError("build_torchvision: only the R-50-FPN cell has a torchvision counterpart")
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=4 - cfg.backbone.frozen_stages)
    return TVFasterRCNN(backbone, num_classes=cfg.num_classes + 1, **torchvision_kwargs(cfg, size))


def _tv_key(key: str) -> str | None:
    """Our state-dict key -> torchvision's (None: no counterpart, e.g. `num_batches_tracked`)."""
    if key.endswith("num_batches_tracked"):
        return None
    head, _, rest = key.partition(".")
    if head == "backbone":
        return f"backbone.body.{rest}"
    renames = {
        "neck.lateral_convs.": "backbone.fpn.inner_blocks.",
        "neck.fpn_convs.": "backbone.fpn.layer_blocks.",
        "rpn_head.rpn_conv.": "rpn.head.conv.0.0.",
        "rpn_head.rpn_cls.": "rpn.head.cls_logits.",
        "rpn_head.rpn_reg.": "rpn.head.bbox_pred.",
        "roi_head.bbox_head.shared_fcs.0.": "roi_heads.box_head.fc6.",
        "roi_head.bbox_head.shared_fcs.1.": "roi_heads.box_head.fc7.",
        "roi_head.bbox_head.fc_cls.": "roi_heads.box_predictor.cls_score.",
        "roi_head.bbox_head.fc_reg.": "roi_heads.box_predictor.bbox_pred.",
    }
    for ours, theirs in renames.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :].replace("conv.", "0.", 1) if ours.startswith("neck") else theirs + key[len(ours) :]
    raise KeyError(f"no torchvision counterpart for {key!r}")


@torch.no_grad()
def copy_weights(ours: FasterRCNN, theirs: TVFasterRCNN) -> None:
    """Load our weights into torchvision's model. The classifier's background row moves from last
    (mmdet) to first (torchvision); torchvision's background regression rows (never used) get 0."""
    theirs_sd = theirs.state_dict()
    for key, value in ours.state_dict().items():
        tv = _tv_key(key)
        if tv is None:
            continue
        if tv.startswith("roi_heads.box_predictor.cls_score."):
            value = torch.cat([value[-1:], value[:-1]])
        elif tv.startswith("roi_heads.box_predictor.bbox_pred."):
            value = torch.cat([torch.zeros_like(value[:4]), value])
        if theirs_sd[tv].shape != value.shape:
            raise ValueError(f"copy_weights: {key} {tuple(value.shape)} -> {tv} {tuple(theirs_sd[tv].shape)}")
        theirs_sd[tv].copy_(value)


@torch.no_grad()
def set_detection_bias(ours: FasterRCNN, *, classes: int, bias: float) -> None:
    """Raise the classifier bias of foreground classes 0..classes-1 (ours) so random weights detect."""
    ours.roi_head.bbox_head.fc_cls.bias[:classes] = bias


def build_pair(settings: BenchSettings) -> tuple[FasterRCNN, TVFasterRCNN]:
    """Both detectors with the same random weights, in eval mode."""
    torch.manual_seed(settings.seed)
    cfg = our_config()
    ours = build_detector(cfg)
    set_detection_bias(ours, classes=settings.det_classes, bias=settings.det_bias)
    theirs = build_torchvision(cfg, settings.size)
    copy_weights(ours, theirs)
    return ours.eval(), theirs.eval()


def make_inputs(settings: BenchSettings, num_images: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """`num_images` random RGB images `[3, h, w]` in [0, 255] (integers, as decoded JPEGs are) and
    `gt_per_image` random boxes each, labels in [0, 80) (ours; torchvision's are + 1)."""
    g = torch.Generator().manual_seed(settings.seed + 1)
    h, w = settings.size
    images, targets = [], []
    for _ in range(num_images):
        images.append(torch.randint(0, 256, (3, h, w), generator=g).float())
        xy = torch.rand(settings.gt_per_image, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.1 + 0.2 * torch.rand(settings.gt_per_image, 2, generator=g)) * torch.tensor([w, h])
        labels = torch.randint(0, 80, (settings.gt_per_image,), generator=g)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
    return images, targets


def theirs_inputs(images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The same images as torchvision wants them ([0, 1] floats) and labels with background 0."""
    return [im / 255 for im in images], [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]


# --------------------------------------------------------------------------- one call of each kind


def infer_call(model: nn.Module, images: list[Tensor]) -> Callable[[], list[dict[str, Tensor]]]:
    """Batch-1 inference as torchvision's reference evaluation runs it (`torch.inference_mode`)."""

    def call() -> list[dict[str, Tensor]]:
        model.eval()
        with torch.inference_mode():
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
    """`warmup` untimed calls of each, then `pairs` timed pairs in alternating order (ours first in
    even pairs, theirs first in odd ones, so drift from other load hits both alike).

    Returns `{"ours_s": [...], "theirs_s": [...], "ratios": [...], "ratio": median of the per-pair
    ratios, "ours_median_s", "theirs_median_s"}`.
    """
    if pairs < 1:
        raise ValueError(f"--pairs: {pairs} must be >= 1")
    for _ in range(warmup):
        ours()
        theirs()
    ours_s, theirs_s = [], []
    for i in range(pairs):
        order = [(ours, ours_s), (theirs, theirs_s)]
        for fn, out in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(ours_s, theirs_s)]
    return {
        "ratio": round(statistics.median(ratios), 4),
        "ours_median_s": round(statistics.median(ours_s), 4),
        "theirs_median_s": round(statistics.median(theirs_s), 4),
        "ours_s": [round(t, 4) for t in ours_s],
        "theirs_s": [round(t, 4) for t in theirs_s],
        "ratios": [round(r, 4) for r in ratios],
    }


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


def memory_probe(which: str, mode: str, settings: BenchSettings) -> dict[str, Any]:
    """Run in a fresh process: build both models, drop the other one, then one call (`mode` "infer"
    or "train") of `which` ("ours" / "theirs"). Returns the peak RSS increase over the RSS just
    before the call (MiB), the absolute peak and whether the peak could be reset before the call."""
    torch.set_num_threads(settings.threads)
    ours, theirs = build_pair(settings)
    model = ours if which == "ours" else theirs
    del ours, theirs
    images, targets = make_inputs(settings, 1 if mode == "infer" else settings.train_images)
    if which == "theirs":
        images, targets = theirs_inputs(images, targets)
    call = infer_call(model, images) if mode == "infer" else train_call(model, images, targets, seed=settings.seed)
    reset = _reset_peak_rss()
    before = _proc_status_kib("VmRSS")
    call()
    peak = _proc_status_kib("VmHWM")
    return {"increase_mib": round((peak - before) / 1024, 1), "peak_mib": round(peak / 1024, 1), "peak_reset": reset}


def measure_memory(settings: BenchSettings, *, modes: tuple[str, ...] = ("infer", "train")) -> dict[str, Any]:
    """`memory_probe` of each model and mode, one fresh (spawned) process each, one at a time."""
    out: dict[str, Any] = {
        "kind": "peak RSS increase (VmHWM - VmRSS before the call) of one cold call in a fresh process, MiB",
    }
    for mode in modes:
        row: dict[str, Any] = {}
        for which in ("ours", "theirs"):
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                row[which] = pool.submit(memory_probe, which, mode, settings).result()
        row["ratio"] = round(row["ours"]["increase_mib"] / max(row["theirs"]["increase_mib"], 1e-9), 4)
        out[mode] = row
    return out


def machine() -> dict[str, Any]:
    """The machine and software the numbers were measured on."""
    model_name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        model_name = names[0] if names else model_name
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "cpu": model_name,
        "cpus_usable": usable,
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_1_5_15": load,
    }


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


def run(settings: BenchSettings, *, profile: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build both, check both detect, time inference and training in alternating pairs, measure
    memory in fresh processes. Returns the bench.json document."""
    torch.set_num_threads(settings.threads)
    load_before = machine()["loadavg_1_5_15"]
    ours, theirs = build_pair(settings)
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

    seed = settings.seed
    ours_train = train_call(ours, images, targets, seed=seed)
    theirs_train = train_call(theirs, tv_images, tv_targets, seed=seed)
    train = time_pairs(ours_train, theirs_train, pairs=settings.train_pairs, warmup=settings.warmup)
    log(f"bench: training step ours / torchvision = {train['ratio']} ({train['ours_median_s']} s vs {train['theirs_median_s']} s)")
    if profile:
        prof["train"] = {"ours": profile_ops(ours_train), "theirs": profile_ops(theirs_train)}
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
    }


# --------------------------------------------------------------------------- reports

BEGIN = "<!-- bench:begin: written by `python -m detector.bench_vs_torchvision`; edit outside this block -->"
END = "<!-- bench:end -->"
_SKELETON = "# Benchmarks: the bundled detector against torchvision's\n\n{block}\n"


def _verdict(ratio: float, goal: float) -> str:
    return f"<= {goal}: {'met' if ratio <= goal else 'NOT met'}"


def render_block(doc: dict[str, Any]) -> str:
    """The measured part of benchmarks.md, from a bench.json document."""
    s, m, inf, tr, mem = doc["settings"], doc["machine"], doc["infer"], doc["train"], doc["memory"]
    h, w = s["size"]
    lines = [
        BEGIN,
        "## Latest run",
        "",
        f"Machine: {m['cpu']}, {m['cpus_usable']} usable CPUs, {m['memory_gib']} GiB, {m['os']}; "
        f"Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, {m['torch_threads']} torch "
        f"threads for both models, CPU capability {m['cpu_capability']}, GPU: {m['gpu'] or 'none'}. "
        f"Load average (1, 5, 15 min) before {m['loadavg_before']}, after {m['loadavg_1_5_15']}.",
        "",
        f"Both in fp32, random weights (ours copied into torchvision's), {h}x{w} images. Times are medians; "
        f"the ratio is the median of per-pair ratios ours / torchvision, pairs alternating in order, "
        f"{s['warmup']} warm-up call(s) of each excluded.",
        "",
        "| measurement | ours | torchvision | ratio | goal |",
        "|---|---|---|---|---|",
        f"| inference, batch 1, per image ({s['pairs']} pairs) | {inf['ours_median_s']:.3f} s | "
        f"{inf['theirs_median_s']:.3f} s | **{inf['ratio']:.3f}** | {_verdict(inf['ratio'], doc['goal']['infer_ratio_max'])} |",
        f"| training step, {s['train_images']} images ({s['train_pairs']} pairs) | {tr['ours_median_s']:.3f} s | "
        f"{tr['theirs_median_s']:.3f} s | **{tr['ratio']:.3f}** | {_verdict(tr['ratio'], doc['goal']['train_ratio_max'])} |",
    ]
    if mem is not None:
        for mode, label in (("infer", "inference"), ("train", "training step")):
            row = mem[mode]
            lines.append(
                f"| peak RSS increase, {label} | {row['ours']['increase_mib']:.0f} MiB | "
                f"{row['theirs']['increase_mib']:.0f} MiB | {row['ratio']:.3f} | - |"
            )
    lines += [
        "",
        f"Per-pair inference ratios: {', '.join(f'{r:.3f}' for r in inf['ratios'])}.  ",
        f"Per-pair training ratios: {', '.join(f'{r:.3f}' for r in tr['ratios'])}.  ",
        f"Detections per image: ours {doc['detections_per_image']['ours']}, torchvision "
        f"{doc['detections_per_image']['theirs']}.",
    ]
    if mem is not None:
        lines += ["", f"Memory: {mem['kind']}; absolute peaks (MiB): "
                  + ", ".join(f"{mode} ours {mem[mode]['ours']['peak_mib']:.0f} / torchvision {mem[mode]['theirs']['peak_mib']:.0f}"
                              for mode in ("infer", "train")) + "."]
    lines += ["", "Remaining differences between the two models:", ""] + [f"- {d}" for d in doc["differences"]]
    if doc.get("profile"):
        for mode, label in (("infer", "inference"), ("train", "training step")):
            if mode not in doc["profile"]:
                continue
            lines += ["", f"Top operators by self CPU time, {label} (one profiled call each):", "",
                      "| ours: op | ms | share | torchvision: op | ms | share |", "|---|---|---|---|---|---|"]
            for a, b in zip(doc["profile"][mode]["ours"], doc["profile"][mode]["theirs"]):
                lines.append(f"| {a['op']} | {a['self_ms']:.0f} | {a['share']:.0%} | {b['op']} | {b['self_ms']:.0f} | {b['share']:.0%} |")
    lines.append(END)
    return "\n".join(lines)


def write_reports(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write `out/bench.json` and replace the measured block of `out/benchmarks.md` (created with a
    bare title when missing; a file without the block gets it appended)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench.json", out / "benchmarks.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    block = render_block(doc)
    if md_path.exists():
        text = md_path.read_text(encoding="utf-8")
        start, end = text.find(BEGIN), text.find(END)
        if start >= 0 and end > start:
            text = text[:start] + block + text[end + len(END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = _SKELETON.format(block=block)
    md_path.write_text(text, encoding="utf-8")
    return json_path, md_path


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
    parser = argparse.ArgumentParser(prog="python -m detector.bench_vs_torchvision", description=__doc__.split("\n\n")[0])
    d = BenchSettings()
    parser.add_argument("--pairs", type=_positive, default=d.pairs, help="timed inference pairs (default %(default)s)")
    parser.add_argument("--train-pairs", type=_positive, default=d.train_pairs, help="timed training pairs (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed calls of each model first (default %(default)s)")
    parser.add_argument("--threads", type=_positive, default=d.threads, help="torch threads for both (default %(default)s)")
    parser.add_argument("--size", type=_size, default=d.size, help="image HxW (default 800x1333)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for bench.json and benchmarks.md")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--profile", action="store_true", help="also profile one call of each (top operators)")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup: {args.warmup} must be >= 0")
    settings = BenchSettings(size=args.size, pairs=args.pairs, train_pairs=args.train_pairs, warmup=args.warmup,
                             threads=args.threads, memory=not args.no_memory)
    doc = run(settings, profile=args.profile)
    json_path, md_path = write_reports(doc, args.out)
    print(f"bench: wrote {json_path} and {md_path}; inference ratio {doc['infer_ratio']}, training ratio {doc['train_ratio']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["BenchSettings", "build_pair", "build_torchvision", "copy_weights", "main", "run", "time_pairs",
           "torchvision_kwargs", "write_reports"]
