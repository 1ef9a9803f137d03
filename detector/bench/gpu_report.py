"""bench_gpu.json and the GPU block of benchmarks.md for `detector.bench.gpu`, and issue 12's goals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detector.bench.report import replace_block
from detector.jsonio import write_json_atomic

BEGIN_GPU = "<!-- bench-gpu:begin: written by `python -m detector.bench.gpu`; edit outside this block -->"
END_GPU = "<!-- bench-gpu:end -->"

# The goals one run of the GPU bench can judge (issue 12). kind: ratio = ours / torchvision of a
# case; fps = our images/s; amp_over_fp32 = our AMP time / our fp32 time of a case.
GOALS: tuple[dict[str, Any], ...] = (
    {"text": "training step (2 images) ours / torchvision, fp32 <= 0.8", "kind": "ratio", "case": "train2/fp32", "max": 0.8},
    {"text": "training step (2 images) ours / torchvision, AMP <= 0.7", "kind": "ratio", "case": "train2/amp", "max": 0.7},
    {"text": "our training step (2 images) AMP / fp32 <= 0.7", "kind": "amp_over_fp32", "case": "train2", "max": 0.7},
    {"text": "our batch-1 inference AMP / fp32 < 1 (AMP faster)", "kind": "amp_over_fp32", "case": "infer1", "max": 0.9999},
    {"text": "our batch-1 inference fp32 >= 100 fps", "kind": "fps", "case": "infer1/fp32", "min": 100.0},
    {"text": "our batch-1 inference AMP >= 150 fps", "kind": "fps", "case": "infer1/amp", "min": 150.0},
)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_gpu_block(doc: dict[str, Any]) -> str:
    """The measured GPU part of benchmarks.md, from a bench_gpu.json document."""
    m, s = doc["machine"], doc["settings"]
    h, w = s["size"]
    lines = [
        BEGIN_GPU,
        "## Latest accelerator run",
        "",
        f"Device: {m['gpu'] or 'none (CPU dry run: ' + m['cpu'] + ')'}; torch {m['torch']}, torchvision {m['torchvision']}, "
        f"Python {m['python']}. Both models built alike with random weights, {h}x{w} images, {s['pairs']} alternating "
        f"pairs per row after {s['warmup']} warm-up calls of each; every call ends with a device synchronize. "
        f"fp32: {s['fp32']}. AMP: {s['amp']}.",
        "",
    ]
    if not doc.get("complete", True):
        lines += ["**Partial run**: the call ended before every row was measured; the rows below are those it "
                  "finished.", ""]
    lines += [
        "| case | precision | ours ms | torchvision ms | ratio | ours fps | ours / tv peak GiB | ours / tv host syncs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in doc["results"].items():
        case, precision = key.split("/")
        fps = _num(r.get("ours_fps"), ".1f")
        lines.append(
            f"| {case} ({r['images']} img) | {precision} | {r['ours_median_s'] * 1000:.1f} | {r['theirs_median_s'] * 1000:.1f} | "
            f"**{r['ratio']:.3f}** | {fps} | {_num(r['ours_peak_gib'], '.2f')} / {_num(r['theirs_peak_gib'], '.2f')} | "
            f"{_num(r['ours_syncs'], 'd')} / {_num(r['theirs_syncs'], 'd')} |"
        )
    lines += ["", "Goals (issue 12) this run judges:", "", "| goal | measured | |", "|---|---|---|"]
    for g in doc["goals"]:
        verdict = "not measured" if g["met"] is None else "met" if g["met"] else "**NOT met**"
        lines.append(f"| {g['goal']} | {_num(g['value'], '.3f')} | {verdict} |")
    profiled = [(k, which, r[f"{which}_profile"]) for k, r in doc["results"].items() for which in ("ours", "theirs")
                if r.get(f"{which}_profile")]  # fmt: skip
    if profiled:
        lines += ["", "One profiled call each (wall vs GPU-busy time, kernel launches, top kernels by time):", "",
                  "| case | model | wall ms | GPU-busy ms | kernels | top kernels |", "|---|---|---|---|---|---|"]
        for key, which, p in profiled:
            top = "; ".join(f"{t['name']} {t['share']:.0%}" for t in p["top"][:3])
            lines.append(f"| {key} | {which} | {p['wall_ms']:.1f} | {_num(p['gpu_busy_ms'], '.1f')} | "
                         f"{_num(p['kernels'], 'd')} | {top} |")  # fmt: skip
    if doc.get("ablation"):
        lines += ["", "Candidate fast paths of ours, each switched alone (median ms per call):", "",
                  "| precision | variant | infer1 | train2 |", "|---|---|---|---|"]
        for precision, rows in doc["ablation"].items():
            base = doc["results"]
            ms = {case: base.get(f"{case}/{precision}", {}).get("ours_median_s") for case in ("infer1", "train2")}
            rows = [{"variant": "defaults", **ms}, *rows]
            for r in rows:
                cells = " | ".join(_num(None if r.get(c) is None else r[c] * 1000, ".1f") for c in ("infer1", "train2"))
                if "error" in r:  # the candidate failed on this device: say how, in place of its times
                    cells = f"failed: {r['error'].replace('|', '/')} | "
                lines.append(f"| {precision} | {r['variant']} | {cells} |")
    lines.append(END_GPU)
    return "\n".join(lines)


def write_gpu_reports(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write `out/bench_gpu.json` and replace the GPU block of `out/benchmarks.md` (appended when
    the file has none; the CPU block and the hand-written notes are kept)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench_gpu.json", out / "benchmarks.md"
    write_json_atomic(json_path, doc, indent=2)
    replace_block(md_path, render_gpu_block(doc), begin=BEGIN_GPU, end=END_GPU)
    return json_path, md_path


__all__ = ["BEGIN_GPU", "END_GPU", "GOALS", "render_gpu_block", "write_gpu_reports"]
