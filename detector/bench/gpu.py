"""Ours against torchvision's `fasterrcnn_resnet50_fpn` on an accelerator, in fp32 and AMP.

`python -m detector.bench.gpu [--device cuda] [--pairs N] [--ablation] [--out DIR]` (what `nox -s
bench -- --device cuda` runs; on the GPU machine run it with `PYTHONPATH`, see README) builds both
detectors alike (`detector.bench.pair`) on the device and measures, in one run, for each precision
(fp32 with cuDNN's default TF32 convolutions; AMP = fp16 autocast + dynamic loss scaling, bf16
autocast on CPU):

- `infer1` batch-1 inference, `infer8` batch-8 inference (time per image),
- `train2` one SGD step on 2 images (one GPU of the 8x2 recipe), `train16` one step on 16 images
  (one large GPU doing the whole recipe's batch),

each timed in alternating pairs (the device synchronised after every call), its peak device memory
(`max_memory_allocated` during one call, minus what was allocated before it), its host syncs per call
(`torch.cuda.set_sync_debug_mode`), and a short profile of one call (GPU-busy time against wall time,
kernel launches, top kernels). `--ablation` also times our candidate fast paths one by one. It writes
`DIR/bench_gpu.json` and the GPU block of `DIR/benchmarks.md` with the goals of issue 12.

On CPU (`--device cpu`, tests) the same code runs without the CUDA-only columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from detector.bench.gpu_report import GOALS, write_gpu_reports
from detector.bench.pair import BenchSettings, build_pair, make_inputs, theirs_inputs
from detector.bench.timing import machine, paired_summary, time_rounds
from detector.model.backbones import set_fold_bn_
from detector.model.faster_rcnn import FasterRCNN, set_cuda_channels_last_

# name -> (kind, images per call)
CASES: dict[str, tuple[str, int]] = {"infer1": ("infer", 1), "infer8": ("infer", 8), "train2": ("train", 2), "train16": ("train", 16)}
PRECISIONS: tuple[str, ...] = ("fp32", "amp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuBenchSettings:
    """One run. `size` is (h, w) of every image (both models keep it at scale 1.0)."""

    device: str = "cuda"
    size: tuple[int, int] = (800, 1333)
    pairs: int = 10
    warmup: int = 3
    cases: tuple[str, ...] = tuple(CASES)
    precisions: tuple[str, ...] = PRECISIONS
    profile: bool = True
    ablation: bool = False
    seed: int = 0
    gt_per_image: int = 8


# --------------------------------------------------------------------------- calls


def amp_context(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """fp32: nothing; amp: fp16 autocast on CUDA (bf16 on CPU, which has no fp16 autocast)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_call(model: nn.Module, kind: str, images: list[Tensor], targets: list[dict[str, Tensor]], *,
              precision: str, device: torch.device, seed: int) -> Callable[[], None]:  # fmt: skip
    """One call, ending with the device synchronised: inference under `inference_mode`, or one SGD
    step (mmdet's momentum and weight decay; a small lr, since speed does not depend on it and random
    weights must not diverge over the timed steps) with loss scaling under fp16 autocast. The
    samplers' RNG is reseeded before every step of either model."""
    if kind == "infer":

        def infer() -> None:
            model.eval()
            with torch.inference_mode(), amp_context(precision, device):
                model(images)
            synchronize(device)

        return infer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type) if precision == "amp" and device.type == "cuda" else None

    def train() -> None:
        model.train()
        torch.manual_seed(seed)
        opt.zero_grad(set_to_none=True)
        with amp_context(precision, device):
            loss = sum(model(images, targets).values())
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        synchronize(device)

    return train


def peak_memory(call: Callable[[], None], device: torch.device) -> float | None:
    """GiB allocated at the peak of one call beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 3)


def count_syncs(call: Callable[[], None], device: torch.device) -> int | None:
    """Host synchronisations one call makes (CUDA's sync debug mode warns at each implicit one; the
    explicit `synchronize` that ends every timed call is not among them)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def _union_us(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_call(call: Callable[[], None], device: torch.device, *, top: int = 6) -> dict[str, Any]:
    """One call under `torch.profiler`: wall ms, GPU-busy ms (union of kernel intervals), kernel
    launches, and the `top` kernels by total time (on CPU: the top operators by self CPU time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        call()
        wall_ms = (time.perf_counter() - start) * 1000
    out: dict[str, Any] = {"wall_ms": round(wall_ms, 2)}
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if kernels:
        spans = [(e.time_range.start, e.time_range.end) for e in kernels]
        by_name: dict[str, float] = {}
        for e in kernels:
            by_name[e.name] = by_name.get(e.name, 0.0) + (e.time_range.end - e.time_range.start)
        total = sum(by_name.values()) or 1.0
        out |= {"gpu_busy_ms": round(_union_us(spans) / 1000, 2), "kernels": len(kernels),
                "top": [{"name": n[:90], "ms": round(t / 1000, 2), "share": round(t / total, 3)}
                        for n, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]]}  # fmt: skip
    else:
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        out |= {"gpu_busy_ms": None, "kernels": None,
                "top": [{"name": e.key[:90], "ms": round(e.self_cpu_time_total / 1000, 2),
                         "share": round(e.self_cpu_time_total / total, 3)} for e in events[:top]]}  # fmt: skip
    return out


# --------------------------------------------------------------------------- candidate fast paths

# name -> switch(model, on). Each keeps the outputs (equality tested on CPU: tests/detector/bench).
ABLATION: dict[str, Callable[[FasterRCNN, bool], None]] = {
    "fold_bn": lambda model, on: set_fold_bn_(model, "auto" if on else "off"),
    # also where a gradient flows (training's res3-res5), as on CPU
    "fold_trained_bn": lambda model, on: set_fold_bn_(model, "all" if on else "auto"),
    "channels_last": set_cuda_channels_last_,
    "cudnn_benchmark": lambda _model, on: setattr(torch.backends.cudnn, "benchmark", on),
    "rpn_nms_per_level": lambda model, on: setattr(model.rpn_head, "nms_per_level", on),
    "rpn_grouped_nms": lambda model, on: setattr(model.rpn_head, "grouped_nms", on),
    "cuda_graphs": lambda model, on: setattr(model, "cuda_graphs", on),  # inference only
}


def ablation_rows(ours: FasterRCNN, calls: dict[str, Callable[[], None]], settings: GpuBenchSettings) -> list[dict[str, Any]]:
    """Ours with each candidate switched to the other state than its default, alone, then back:
    median seconds per call of each case in `calls`. Sequential blocks (a switch such as converting
    the weights to NHWC cannot go inside a timed call); the GPU is quiet enough for that."""
    defaults = {"fold_bn": True, "fold_trained_bn": False, "channels_last": False, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "rpn_nms_per_level": ours.rpn_head.nms_per_level, "rpn_grouped_nms": ours.rpn_head.grouped_nms,
                "cuda_graphs": ours.cuda_graphs}  # fmt: skip
    rows: list[dict[str, Any]] = []
    for name, switch in ABLATION.items():
        label = f"{'+' if not defaults[name] else '-'}{name}"
        switch(ours, not defaults[name])
        try:
            times = time_rounds(calls, rounds=settings.pairs, warmup=settings.warmup)
        except Exception as exc:  # noqa: BLE001 - a candidate failing on this device costs only its row
            rows.append({"variant": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        finally:
            switch(ours, defaults[name])
        rows.append({"variant": label, **{case: round(statistics.median(ts), 5) for case, ts in times.items()}})
    return rows


# --------------------------------------------------------------------------- the run


def _optional(measure: Callable[..., Any], call: Callable[[], None], device: torch.device, *,
              log: Callable[[str], None]) -> Any:  # fmt: skip
    """A secondary measurement (syncs, profile) that must not cost the run its timings: on an error
    (profiler or debug-mode APIs differ between torch versions) it is None and the error is logged."""
    try:
        return measure(call, device)
    except Exception as exc:  # noqa: BLE001 - reported, and the timings above still stand
        log(f"bench gpu: {measure.__name__} failed ({type(exc).__name__}: {exc}); recorded as missing")
        return None


def run(settings: GpuBenchSettings, *, log: Callable[[str], None] = print,
        progress: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:
    """All cases in both precisions (and the ablation); `progress` gets the document so far
    (`"complete": False`) after each row, so that a call cut short by a time limit keeps its rows."""
    device = torch.device(settings.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda but torch sees no CUDA device")
        torch.backends.cudnn.allow_tf32 = True  # the default for convolutions; said in the report
    pair_settings = BenchSettings(size=settings.size, seed=settings.seed, gt_per_image=settings.gt_per_image)
    ours, theirs = build_pair(pair_settings)
    ours, theirs = ours.to(device), theirs.to(device)
    n_max = max(CASES[c][1] for c in settings.cases)
    images, targets = make_inputs(pair_settings, n_max)
    tv_images, tv_targets = theirs_inputs(images, targets)
    moved = [[im.to(device) for im in ims] for ims in (images, tv_images)]
    moved_t = [[{k: v.to(device) for k, v in t.items()} for t in ts] for ts in (targets, tv_targets)]
    # Every case starts from the same weights: the training cases step both models.
    initial = [{k: v.clone() for k, v in m.state_dict().items()} for m in (ours, theirs)]
    results: dict[str, Any] = {}
    ablation: dict[str, Any] = {}
    for precision in settings.precisions:
        for case in settings.cases:
            kind, n = CASES[case]
            for model, state in zip((ours, theirs), initial):
                model.load_state_dict(state)
            calls = {
                "ours": make_call(ours, kind, moved[0][:n], moved_t[0][:n], precision=precision, device=device, seed=settings.seed),
                "theirs": make_call(theirs, kind, moved[1][:n], moved_t[1][:n], precision=precision, device=device, seed=settings.seed),
            }
            times = time_rounds(calls, rounds=settings.pairs, warmup=settings.warmup)
            summary = paired_summary(times["ours"], times["theirs"])
            row: dict[str, Any] = {"images": n, **summary}
            for which, call in calls.items():
                row[f"{which}_peak_gib"] = peak_memory(call, device)
                row[f"{which}_syncs"] = _optional(count_syncs, call, device, log=log)
                if settings.profile and case in ("infer1", "train2"):
                    row[f"{which}_profile"] = _optional(profile_call, call, device, log=log)
            if kind == "infer":
                row["ours_fps"] = round(n / summary["ours_median_s"], 2)
                row["theirs_fps"] = round(n / summary["theirs_median_s"], 2)
            results[f"{case}/{precision}"] = row
            if progress is not None:
                progress(document(settings, results, ablation, complete=False))
            log(f"bench gpu: {case} {precision}: ours {summary['ours_median_s'] * 1000:.1f} ms, torchvision "
                f"{summary['theirs_median_s'] * 1000:.1f} ms, ratio {summary['ratio']:.3f}")  # fmt: skip
        if settings.ablation:
            ours.load_state_dict(initial[0])
            calls = {case: make_call(ours, CASES[case][0], moved[0][: CASES[case][1]], moved_t[0][: CASES[case][1]],
                                     precision=precision, device=device, seed=settings.seed)
                     for case in ("infer1", "train2") if case in settings.cases}  # fmt: skip
            ablation[precision] = ablation_rows(ours, calls, settings)
            if progress is not None:
                progress(document(settings, results, ablation, complete=False))
    return document(settings, results, ablation, complete=True)


def document(settings: GpuBenchSettings, results: dict[str, Any], ablation: dict[str, Any], *, complete: bool) -> dict[str, Any]:
    """bench_gpu.json's document from the rows measured so far."""
    doc = {
        "complete": complete,
        "results": results,
        "goals": evaluate_goals(results),
        "ablation": ablation or None,
        "settings": {**dataclasses.asdict(settings),
                     "amp": "fp16 autocast + torch.amp.GradScaler on CUDA (bf16 autocast on CPU)",
                     "fp32": "float32 weights; cuDNN convolutions may use TF32 (torch default)",
                     "timed": "one call + device synchronize; SGD step = zero_grad, forward, loss sum, backward, step"},
        "models": {"ours": "detector.build_detector(DetectorConfig()) faster-rcnn_r50_fpn_1x_coco",
                   "theirs": f"torchvision {torchvision.__version__} fasterrcnn_resnet50_fpn's build (detector.bench.pair)"},
        "machine": machine(),
    }
    return doc


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's goals that this run measures: each `{"goal", "value", "met"}` (value None and met
    None when the run did not measure it)."""

    def get(key: str, field: str) -> float | None:
        row = results.get(key)
        return None if row is None else row.get(field)

    out = []
    for goal in GOALS:
        value: float | None
        if goal["kind"] == "ratio":
            value = get(goal["case"], "ratio")
        elif goal["kind"] == "fps":
            value = get(goal["case"], "ours_fps")
        else:  # amp over fp32 of ours
            amp_s, fp32_s = get(f"{goal['case']}/amp", "ours_median_s"), get(f"{goal['case']}/fp32", "ours_median_s")
            value = None if amp_s is None or fp32_s is None else round(amp_s / fp32_s, 4)
        met = None if value is None else (value >= goal["min"] if "min" in goal else value <= goal["max"])
        out.append({"goal": goal["text"], "value": value, "met": met})
    return out


def main(argv: list[str] | None = None) -> int:
    d = GpuBenchSettings()
    parser = argparse.ArgumentParser(prog="python -m detector.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=d.device, help="torch device, e.g. cuda or cuda:1 (cpu for a dry run; default %(default)s)")
    parser.add_argument("--pairs", type=int, default=d.pairs, help="timed pairs per case and precision (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed calls of each model first (default %(default)s)")
    parser.add_argument("--size", default="800x1333", help="image HxW (default %(default)s)")
    parser.add_argument("--cases", default=",".join(d.cases), help=f"comma-separated, from {', '.join(CASES)} (default all)")
    parser.add_argument("--precisions", default=",".join(d.precisions), help="comma-separated, from fp32, amp (default both)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled call")
    parser.add_argument("--ablation", action="store_true", help="also time our candidate fast paths one by one")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for bench_gpu.json and benchmarks.md")
    args = parser.parse_args(argv)
    cases = tuple(c for c in args.cases.split(",") if c)
    precisions = tuple(p for p in args.precisions.split(",") if p)
    if bad := [c for c in cases if c not in CASES]:
        parser.error(f"--cases: {', '.join(bad)} not allowed; allowed: {', '.join(CASES)}")
    if bad := [p for p in precisions if p not in PRECISIONS]:
        parser.error(f"--precisions: {', '.join(bad)} not allowed; allowed: {', '.join(PRECISIONS)}")
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size: {args.size!r} is not HxW (e.g. 800x1333)")
    if min(h, w) < 64 or args.pairs < 1 or args.warmup < 0:
        parser.error("--size sides must be >= 64, --pairs >= 1, --warmup >= 0")
    settings = GpuBenchSettings(device=args.device, size=(h, w), pairs=args.pairs, warmup=args.warmup, cases=cases,
                                precisions=precisions, profile=not args.no_profile, ablation=args.ablation)  # fmt: skip
    # Written after every row too: a run cut short by a time limit leaves what it measured.
    doc = run(settings, progress=lambda partial: write_gpu_reports(partial, args.out))
    json_path, md_path = write_gpu_reports(doc, args.out)
    print(f"bench gpu: wrote {json_path} and {md_path}")
    for g in doc["goals"]:
        print(f"  {g['goal']}: {g['value']} -> {'met' if g['met'] else 'not measured' if g['met'] is None else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ABLATION", "CASES", "PRECISIONS", "GpuBenchSettings", "count_syncs", "document", "evaluate_goals", "main", "make_call",
           "peak_memory", "profile_call", "run"]
