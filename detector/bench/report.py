"""benchmarks.md and bench.json for `detector.bench.vs_torchvision`.

benchmarks.md holds hand-written notes (the profile, what each change won, what stays different)
around one measured block between `BEGIN` and `END`; a new run replaces only that block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detector.jsonio import write_json_atomic

BEGIN = "<!-- bench:begin: written by `python -m detector.bench.vs_torchvision`; edit outside this block -->"
END = "<!-- bench:end -->"
_SKELETON = "# Benchmarks: the bundled detector against torchvision's\n\n{block}\n"


def _verdict(ratio: float, goal: float) -> str:
    return f"<= {goal}: {'met' if ratio <= goal else 'NOT met'}"


def render_ablation(ablation: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown lines: one row per variant (torchvision, ours with no fast path, then one added per
    row) with its median time and ratio to torchvision, for inference and the training step."""
    lines = ["", "What each fast path wins (ours with none, then each added in turn; ratio = median of the "
             "per-round ratios to torchvision timed in the same rotating rounds):", "",
             "| variant | inference s | inference ratio | training step s | training ratio |", "|---|---|---|---|---|"]
    rows = {mode: {r["variant"]: r for r in ablation.get(mode) or []} for mode in ("infer", "train")}
    for name in dict.fromkeys([*rows["infer"], *rows["train"]]):
        cells = []
        for mode in ("infer", "train"):
            r = rows[mode].get(name)
            cells += [f"{r['median_s']:.3f}", f"{r['ratio']:.3f}"] if r else ["-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


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
    counted = (
        ("host_syncs", "Host syncs per call a CUDA run would make (counted on CPU; torchvision's batched NMS runs one "
         "NMS per group here, one per call on CUDA)", lambda side: sum(side.values())),
        ("operators", "Kernels per call (operators that compute, backward included; each a kernel launch on a GPU, where "
         "a small batch waits on them; counted on CPU, whose NMS path differs as above and whose SGD step loops over "
         "the parameters, ours train more of them: BN affine)", lambda side: side["kernels"]),
    )  # fmt: skip
    for key, label, value in counted:
        if doc.get(key):
            per_mode = (f"{mode} ours {value(doc[key][mode]['ours'])} / torchvision {value(doc[key][mode]['theirs'])}"
                        for mode in ("infer", "train"))  # fmt: skip
            lines += ["", f"{label}: " + ", ".join(per_mode) + "."]
    if mem is not None:
        lines += ["", f"Memory: {mem['kind']}; absolute peaks (MiB): "
                  + ", ".join(f"{mode} ours {mem[mode]['ours']['peak_mib']:.0f} / torchvision {mem[mode]['theirs']['peak_mib']:.0f}"
                              for mode in ("infer", "train")) + "."]
    if doc.get("ablation"):
        lines += render_ablation(doc["ablation"])
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


def replace_block(md_path: Path, block: str, *, begin: str, end: str, skeleton: str = _SKELETON) -> None:
    """Put `block` (which starts with `begin` and ends with `end`) into `md_path` in place of the
    old block between those markers; a file without it gets it appended, a missing file is created
    from `skeleton`. The hand-written text around the block is kept."""
    if md_path.exists():
        text = md_path.read_text(encoding="utf-8")
        start, stop = text.find(begin), text.find(end)
        if start >= 0 and stop > start:
            text = text[:start] + block + text[stop + len(end) :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = skeleton.format(block=block)
    md_path.write_text(text, encoding="utf-8")


def write_reports(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write `out/bench.json` and replace the measured block of `out/benchmarks.md` (created with a
    bare title when missing; a file without the block gets it appended)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench.json", out / "benchmarks.md"
    write_json_atomic(json_path, doc, indent=2)
    replace_block(md_path, render_block(doc), begin=BEGIN, end=END)
    return json_path, md_path


__all__ = ["BEGIN", "END", "render_ablation", "render_block", "replace_block", "write_reports"]
