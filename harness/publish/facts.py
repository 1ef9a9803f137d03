"""The facts a results page states around its tables: the profile, provenance, machine, dataset,
how the numbers were measured, the recipe deviations and their quirks, and the run times.

Pure functions of the matrix and the `collect()` frame (`harness.publish.page` renders them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from harness.matrix.spec import MatrixSpec, Profile, repo_root
from harness.metrics import BY_KEY, FPS_REL, PUBLISHED_DEVICE_CLASS
from harness.publish.markdown import markdown_table
from harness.results.verdicts import quirk_ids

FPS_MARK, MEM_MARK = BY_KEY["fps"].mark, BY_KEY["mem"].mark
# What each quirk id means (shared/reference/mmdet_faster_rcnn_recipes.md section 5 and 1.7).
QUIRKS: dict[str, str] = {
    "Q1": "MMDetection v3's ms-2x / ms-3x configs only override the milestones and inherit `end=12` from "
          "schedule_1x, so their learning rate never decays; the published checkpoints were trained in v2 with the "
          "decay. These cells follow the checkpoint (reference §5 Q1).",
    "Q2": "v3 `faster-rcnn_r101-caffe_fpn_ms-3x_coco.py` feeds caffe weights pytorch-normalised RGB images; the "
          "published checkpoint was trained with caffe normalisation (BGR, std 1), which this cell keeps (reference §5 Q2).",
    "Q5": "The January-February 2020 1x checkpoints predate MMDetection PR #2410: smooth-L1 losses, grad clip 35, "
          "2000 training proposals, RoIAlign sampling 2, warmup ratio 1/3. The cells of `matrices/faster_rcnn.yaml` "
          "train today's L1 recipe, as the table labels it, so a few tenths of AP either way are expected; the cells of "
          "`matrices/faster_rcnn_jan2020.yaml` (axis `era: jan-2020`) train those old defaults instead "
          "(reference §5 Q5, §1.8).",
    "FP16": "The published FP16 checkpoint was trained with mmdet's 2020 FP16 hook and a static loss scale of 512, and "
            "its fps measured on an FP16-wrapped model; this cell uses autocast with a dynamic loss scale, as v3's "
            "AmpOptimWrapper does (reference §1.7).",
}


def dataset_facts(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """The data roots the runs used: path, COCO `info.description`, whether synthetic, eval splits, and
    the categories trained where they are not the recipe's."""
    facts = []
    ran = runs[runs["status"] != "not run"]
    for root in sorted({str(r) for r in ran["data_root"].dropna()}):
        description = _coco_description(Path(root) / "annotations" / "instances_train2017.json")
        splits = sorted({str(s) for s in ran.loc[ran["data_root"] == root, "eval_split"].dropna()})
        here = ran[ran["data_root"] == root]
        others = sorted({str(c) for c in here["other_categories"].dropna()}) if "other_categories" in here else []
        facts.append({"root": root, "description": description, "synthetic": "synthetic COCO-style set" in description,
                      "eval_splits": splits, "other_categories": others})
    return facts


def profile_text(prof: Profile) -> str:
    parts = [f"`{prof.name}`"]
    parts.append("recipe epochs" if prof.budget.max_iters is None else f"{prof.budget.max_iters} iterations")
    parts.append("recipe image scale (1333, 800)" if prof.budget.image_scale is None else f"image scale {tuple(prof.budget.image_scale)}")
    parts.append(f"{prof.images_per_gpu} images per GPU")
    if prof.budget.eval_max_images is not None:
        parts.append(f"evaluation on the first {prof.budget.eval_max_images} images")
    parts.append(f"fps over {prof.budget.bench_images} images" if prof.budget.bench_images else "no fps measurement")
    parts.append({"published": "compared with the published numbers", "baselines": "compared with stored CI baselines",
                  "none": "compared with nothing (a build-train-evaluate check)",
                  "hardware": "Mem and fps compared with the published numbers (no AP)"}.get(prof.compare, prof.compare))
    return ", ".join(parts)


def provenance_text(runs: pd.DataFrame) -> str:
    ran = runs[runs["status"].isin(["ok", "failed"])]
    if ran.empty:
        return "no runs yet"
    commits = _unique(ran["git_commit"], lambda c: f"`{str(c)[:12]}`")
    dirty = " (dirty working tree)" if ran["git_dirty"].fillna(False).astype(bool).any() else " (clean)"
    versions = []
    for col, label in (("python_version", "python"), ("torch_version", "torch"), ("torchvision_version", "torchvision"),
                       ("pycocotools_version", "pycocotools"), ("harness_version", "harness")):
        versions.append(f"{label} {_unique(ran[col])}")
    date = max((str(d) for d in ran["finished_at"].dropna()), default="unknown")
    return f"commit {commits}{dirty}; {', '.join(versions)}; {machine_text(ran)}; {len(ran)} run(s), last finished {date}"


def machine_text(ran: pd.DataFrame) -> str:
    """The device, and what explains speed on it: CPU model, cores, threads per cell, load at the start."""
    devices = _unique(ran["device"])
    host = []
    if ran["cpu"].notna().any():
        host.append(f"CPU {_unique(ran['cpu'])}")
    if ran["cores"].notna().any():
        host.append(f"{_unique(ran['cores'], lambda c: str(int(c)))} logical cores")
    if ran["threads"].notna().any():
        host.append(f"{_unique(ran['threads'], lambda t: str(int(t)))} torch threads per cell")
    if "cells_at_once" in ran and ran["cells_at_once"].notna().any():
        host.append(f"{_unique(ran['cells_at_once'], lambda n: str(int(n)))} cell(s) at a time")
    if "start" in ran and ran["start"].notna().any():
        # Forked cells have no start-up time, and on CPU a peak RSS without the pages only imports touch.
        host.append(f"cell start: {_unique(ran['start'])}")
    loads = [float(x) for x in ran["load_1m"].dropna()]
    if loads:
        host.append(f"load {min(loads):.1f}-{max(loads):.1f} when the run began")
    return f"device {devices}" + (f" (host: {', '.join(host)})" if host else "")


def dataset_text(runs: pd.DataFrame, prof: Profile) -> str:
    facts = dataset_facts(runs)
    if not facts:
        return f"no runs yet (the profile's data: {prof.data})"
    parts = []
    for f in facts:
        kind = "synthetic COCO-format set generated by the harness" if f["synthetic"] else "COCO-2017-style root"
        desc = f", \"{f['description']}\"" if f["description"] and not f["synthetic"] else ""
        splits = f["eval_splits"]
        if splits == ["val2017"]:
            where = "evaluated on val2017"
        elif splits == ["train2017"]:
            where = "**evaluated on the train split** (the root has no val2017)"
        else:
            where = f"evaluated on {', '.join(splits) or 'nothing'} (per run in results.csv)"
        own = f"; **trained {' / '.join(f['other_categories'])}: nothing compared**" if f.get("other_categories") else ""
        parts.append(f"{kind} `{display_path(Path(f['root']))}`{desc}; {where}{own}")
    return "; ".join(parts)


def measurement(matrix: MatrixSpec, prof: Profile | None) -> dict[str, Any]:
    """Numbers the "How these numbers were measured" section of the template quotes."""
    tol = matrix.tolerances
    short = prof is not None and (prof.budget.max_iters is not None or prof.budget.image_scale is not None)
    return {
        "ap_pass": tol.box_ap_pass, "ap_warn": tol.box_ap_warn, "mem_rel": f"{tol.mem_rel:.0%}",
        "fps_rel": f"{FPS_REL:.0%}", "device_class": PUBLISHED_DEVICE_CLASS, "fps_mark": FPS_MARK,
        "mem_mark": MEM_MARK, "short_profile": profile_text(prof) if short and prof else "",
    }


def quirks(matrix: MatrixSpec, runs: pd.DataFrame | None) -> list[dict[str, Any]]:
    """Quirk id -> meaning and the cells it affects (with each cell's own note)."""
    notes_of: dict[str, tuple[str, ...]] = {}
    for cell in matrix.cells:
        notes = cell.recipe_notes
        if runs is not None:
            got = runs.loc[runs["name"] == cell.name, "notes"]
            notes = tuple(got.iloc[0]) if len(got) and got.iloc[0] else notes
        notes_of[cell.name] = notes
    out: dict[str, dict[str, Any]] = {}
    for name, notes in notes_of.items():
        for note in notes:
            for q in quirk_ids([note]):
                entry = out.setdefault(q, {"id": q, "text": QUIRKS.get(q, ""), "cells": []})
                entry["cells"].append((name, note.partition(":")[2].strip()))
    return sorted(out.values(), key=lambda e: (not e["id"].startswith("Q"), e["id"]))


def cell_notes(matrix: MatrixSpec) -> list[tuple[str, str]]:
    return [(c.name, n) for c in matrix.cells for n in c.notes if not quirk_ids([n])]


def run_deviations(runs: pd.DataFrame) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for devs in runs.loc[runs["status"] == "ok", "deviations"]:
        for d in devs or ():
            counts[d] = counts.get(d, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def run_times(runs: pd.DataFrame, trends: pd.DataFrame) -> str:
    """A markdown table of where each run's time went (train, evaluation, whole cell process) and
    whether its training loss fell (`collect.loss_trends`), or ""."""
    done = runs[runs["status"].isin(["ok", "failed"])]
    if done.empty:
        return ""
    trend = {(str(t["name"]), int(t["seed"])): t for t in trends.to_dict(orient="records")}

    def seconds(value: Any) -> str:
        return "-" if value is None or pd.isna(value) else f"{float(value):.1f}"

    def loss(name: str, seed: int) -> str:
        t = trend.get((name, seed))
        return "-" if t is None else f"{t['loss_start']:.2f} → {t['loss_end']:.2f}"

    def rate(value: Any, digits: int) -> str:
        return "-" if value is None or pd.isna(value) else f"{float(value):.{digits}f}"

    rows = [[str(r["name"]), str(r["seed"]), str(r["status"]), loss(str(r["name"]), int(r["seed"])),
             rate(r["train_images_per_s"], 1), rate(r["s_per_iter"], 3),
             seconds(r["train_time_s"]), seconds(r["eval_time_s"]), seconds(r["wall_time_s"])]
            for r in done.to_dict(orient="records")]  # fmt: skip
    total = pd.to_numeric(done["wall_time_s"], errors="coerce").sum()
    fell = sum(bool(t["fell"]) for t in trend.values())
    rows.append(["**all cells**", "", "", f"fell in {fell}/{len(trend)}", "", "", "", "", f"**{total:.1f}**"])
    columns = ("Config", "Seed", "Status", "Loss start → end", "Train (img/s)", "s / iter", "Train (s)", "Eval (s)",
               "Cell wall (s)")  # fmt: skip
    return markdown_table(columns, rows)


def framework_text(runs: pd.DataFrame) -> str:
    """The "Framework" fact of a page whose runs measured torchvision's memory beside theirs
    (`framework_memory`): per such cell, ours against torchvision's on the same image size in the
    same process, or "" when no run did."""
    if "framework_mem_gb" not in runs.columns:
        return ""
    done = runs[(runs["status"] == "ok") & runs["framework_mem_gb"].notna() & runs["mem_gb"].notna()]
    if done.empty:
        return ""
    parts = [f"`{r['name']}` ours {float(r['mem_gb']):.1f} GB, torchvision {float(r['framework_mem_gb']):.1f} GB"
             + (f" ({r['fps_precision']})" if r.get("fps_precision") else "")
             for r in done.drop_duplicates("name").to_dict(orient="records")]  # fmt: skip
    return ("torchvision's `fasterrcnn_resnet50_fpn`, built alike and trained 3 steps on the same image size in the "
            "same cell process, shows what the framework alone does to Mem: " + "; ".join(parts) + ".")


def _coco_description(path: Path) -> str:
    """`info.description` of a COCO annotation file, read from its first 4 KB only (files can be 450 MB)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return ""
    m = re.search(r'"description"\s*:\s*("(?:[^"\\]|\\.)*")', head)
    return str(json.loads(m.group(1))) if m else ""


def _unique(values: pd.Series, fmt: Callable[[Any], str] = str) -> str:
    seen = list(dict.fromkeys(v for v in values.dropna() if v != ""))
    return ", ".join(fmt(v) for v in seen) if seen else "unknown"


def display_path(path: Path) -> str:
    """A path relative to the repository when inside it (pages are read from the repo)."""
    try:
        return str(Path(path).resolve().relative_to(repo_root()))
    except ValueError:
        return str(path)
