"""`harness parity MATRIX`: every cell against MMDetection 3.3.0's own model of the same name.

The cell-by-cell work is `detector.parity.check.check_cell` (through `detector.api`); this module
picks the cells and the images, and writes `parity.json` (one row per cell, the stages with their
worst relative difference) and `parity.md` (the page). The results page reads `parity.json` from
`reports/` for its "parity" mark. Needs the `parity` dependency group: `nox -s parity`.
"""

from __future__ import annotations

import json
import platform
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.execute.provenance import UNKNOWN, git_info
from harness.matrix.parse import load_matrix
from harness.matrix.spec import repo_root

PARITY_JSON, PARITY_MD = "parity.json", "parity.md"
STAGES = ("state_dict", "params", "recipe", "pipeline", "preprocess", "backbone", "neck", "proposals", "detections", "losses")

# One image = (path, [(x1, y1, x2, y2, category index), ...]) in original pixels.
Image = tuple[Path, list[tuple[float, float, float, float, int]]]


def pick_images(root: Path, count: int) -> list[Image]:
    """The first `count` images (by id) of `root`'s val2017 (else train2017) that have a non-crowd
    box, with those boxes as x1y1x2y2 and the category's index in id order."""
    split = "val2017" if (root / "annotations" / "instances_val2017.json").is_file() else "train2017"
    ann_file = root / "annotations" / f"instances_{split}.json"
    try:
        coco = json.loads(ann_file.read_text())
    except FileNotFoundError:
        raise UserError(f"--data {root}: {ann_file} not found (a COCO root with annotations/instances_val2017.json "
                        "or instances_train2017.json)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{ann_file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    cat_index = {c["id"]: i for i, c in enumerate(sorted(coco.get("categories", []), key=lambda c: c["id"]))}
    boxes: dict[int, list[tuple[float, float, float, float, int]]] = {}
    for a in coco.get("annotations", []):
        x, y, w, h = a["bbox"]
        if not a.get("iscrowd", 0) and w >= 1 and h >= 1 and a["category_id"] in cat_index:
            boxes.setdefault(a["image_id"], []).append((x, y, x + w, y + h, cat_index[a["category_id"]]))
    picked = [(root / split / info["file_name"], boxes[info["id"]])
              for info in sorted(coco.get("images", []), key=lambda i: i["id"]) if info["id"] in boxes][:count]
    if len(picked) < count:
        raise UserError(f"{ann_file}: {len(picked)} images with boxes, --images asks for {count}")
    return picked


def _commit() -> str:
    """The short commit, with "+changes" when tracked files differ from it; read when the check
    starts, so that a commit made while it runs is not named for code it did not run."""
    info = git_info(repo_root())
    if info["git_commit"] == UNKNOWN:
        return UNKNOWN
    return str(info["git_commit"])[:7] + ("+changes" if info["git_dirty"] else "")


def run_parity(*, matrix: str, only: Sequence[str], data: Path | None, images: int, seed: int,
               out_dir: Path, log: Callable[[str], None]) -> int:
    """Check the selected cells; write parity.json / parity.md to `out_dir`. Exit code: 0 every
    checked cell is equal, as shipped or once its recorded deviation is applied to MMDetection's
    config (Q2: `detector.parity.mmdet_side.DEVIATIONS`), 1 otherwise (cells not shipped by
    MMDetection are listed, not failures)."""
    import detector.api as api  # the parity names import mmdet: only here

    commit = _commit()
    spec = load_matrix(matrix)
    cells = spec.select(only)
    try:
        versions = api.parity_versions()
    except ImportError as exc:
        raise UserError(f"parity needs MMDetection 3.3.0 ({exc}): run it with `nox -s parity`, which installs the "
                        "`parity` group") from None
    if data is None:
        tmp = Path(tempfile.mkdtemp(prefix="harness-parity-"))
        data = api.make_synthetic_coco(tmp / "synth", images=max(8, images), size=(640, 480), val_images=max(8, images))
    picked = pick_images(data, images)
    rows: list[dict[str, Any]] = []
    for i, cell in enumerate(cells, 1):
        log(f"parity [{i}/{len(cells)}] {cell.name}")
        row = api.parity_check(name=cell.name, cfg=cell.config, images=picked, seed=seed)
        # The cell's recorded recipe deviations: a difference the check finds may be one of them.
        row["notes"] = list(cell.recipe_notes)
        rows.append(row)
        took = f" ({row['seconds']:.0f} s)" if isinstance(row.get("seconds"), (int, float)) else ""
        log(f"  {_verdict(row)}{took}: " + (f"{_summary(row['with_deviations'])}; as shipped: " if _applied(row) else "") + _summary(row))
    import torch
    import torchvision

    doc = {
        "matrix": spec.name, "mmdetection": versions,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "commit": commit, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
        "images": [str(p.relative_to(data)) for p, _ in picked], "data": data.name, "seed": seed,
        "cells": rows,
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    api.write_json_atomic(out_dir / PARITY_JSON, doc, indent=1, allow_nan=True)
    (out_dir / PARITY_MD).write_text(render(doc))
    log(f"wrote {out_dir / PARITY_MD}")
    checked = [r for r in rows if r["status"] == "checked"]
    return 0 if checked and all(_equal(r) for r in checked) else 1


def _applied(row: dict[str, Any]) -> list[str]:
    """The recorded deviations with which a differing cell was equal to MMDetection's model, else []."""
    again = row.get("with_deviations") or {}
    return list(again.get("applied", [])) if not row.get("ok") and again.get("ok") else []


def _equal(row: dict[str, Any]) -> bool:
    """Equal stage by stage, as shipped or with the cell's recorded deviations applied to MMDetection's config."""
    return bool(row.get("ok")) or bool(_applied(row))


def _verdict(row: dict[str, Any]) -> str:
    if row["status"] != "checked":
        return row["status"]
    if row["ok"]:
        return "pass"
    return f"pass with {' '.join(_applied(row))} applied" if _applied(row) else "FAIL"


def _summary(row: dict[str, Any]) -> str:
    if row.get("status", "checked") != "checked":
        return str(row.get("reason", ""))
    failed = [s for s in row["stages"] if not s["ok"]]
    if failed:
        return "; ".join(f"{s['stage']}: {s['detail']} (worst {s['worst']:.3g})" for s in failed)
    if not row["stages"]:
        return str(row.get("reason", "no stage compared"))
    worst = max(row["stages"], key=lambda s: s["worst"])
    return f"worst {worst['worst']:.2g} at {worst['stage']}"


def _second_check(row: dict[str, Any]) -> str:
    """What the check with the cell's recorded deviations applied to MMDetection's config found."""
    again = row.get("with_deviations")
    if not again:
        return ""
    edits = "; ".join(again.get("edits", [])) or " ".join(again["applied"])
    found = "every stage equal (" + _summary(again) + ")" if again["ok"] else "still different: " + _summary(again)
    return f". With {' '.join(again['applied'])} applied ({edits}): {found}"


def render(doc: dict[str, Any]) -> str:
    """parity.md: one row per cell; stage columns show the worst relative difference."""
    mm = doc["mmdetection"]
    lines = [
        "# Parity with MMDetection 3.3.0",
        "",
        f"Every cell of `matrices/{doc['matrix']}.yaml` against MMDetection's own model, built from the config it ships "
        f"under the same name (mmdet {mm['mmdet']}, mmengine {mm['mmengine']}, mmcv-lite {mm['mmcv']}), on the same "
        f"weights and the same {len(doc['images'])} images ({doc['data']}: {', '.join(doc['images'])}).",
        "",
        f"Checked at commit `{doc['commit']}` on {doc['date']}: torch {doc['torch']}, torchvision {doc['torchvision']}, "
        f"Python {doc['python']}, CPU, float32. Regenerate: `nox -s parity` (all cells) or "
        "`nox -s parity -- --only 'faster-rcnn_r50_fpn_*'`.",
        "",
        "How (reports/parity.md is the record; `detector/parity/` is the check):",
        "- MMDetection's model is built with its own `init_weights`, its norm layers' affine parameters and running "
        "statistics randomised (seeded), and saved as an MMDetection checkpoint; ours loads that file through "
        "`detector.model.weights.load_detector`, strictly (`state_dict`: every key, no key left over or kept).",
        "- `params`: total and trainable parameter counts, equal on both sides.",
        "- `recipe`: the training recipe against the config's: train resize (fixed / choice / range and its "
        "scales), flip, optimiser, lr, momentum, weight decay (and its norm multiplier), AMP and loss scale, "
        "gradient clipping, warmup, milestones, epochs and RepeatDataset times, the lr's batch; the column "
        "counts the fields that differ (0: all equal).",
        "- `pipeline`: our image decode and keep-ratio resize against MMDetection's `LoadImageFromFile` + `Resize` "
        "(cv2), pixel for pixel; tolerance 0.",
        "- `preprocess`, `backbone`, `neck`: normalised padded batch and every feature level, on MMDetection's "
        "pipeline output given to both models. Ours runs its plain path here (BN not folded, NCHW), where the "
        "two models call the same kernels: tolerance 1e-6 relative, measured 0. Our fast path (folded BN, "
        "channels-last) equals the plain path to float rounding (~1e-6, `tests/detector/model`).",
        "- `proposals`, `detections`: each row of MMDetection's set needs a partner in ours (same label, IoU > 0.99, "
        "score within 1e-3; matched rows then within 1e-6 relative); up to 1% of rows may lack one, the "
        "documented tie case: two exactly equal scores at the `nms_pre` / `max_per_img` cut or in NMS, which "
        "the two sorts may break differently (mmcv's own CPU NMS, not used here, sorts unstably too).",
        "- `losses`: the four training losses with both samplers taking the first N candidates in index order "
        "(two random generators cannot agree); tolerance 1e-5 relative (summation order).",
        "- A cell that differs and carries a recorded deviation (its recipe notes, e.g. Q2) is checked a second time "
        "with that deviation applied to MMDetection's config (`detector/parity/mmdet_side.py`, `DEVIATIONS`): "
        "\"pass with Q2 applied\" means the deviation is the only difference; the table shows the cell as shipped.",
        "- mmcv-lite has no compiled ops: `nms` and `roi_align` come from torchvision on both sides "
        "(`detector/parity/mmdet_side.py`), so this proves the model and its recipe, not mmcv's kernels.",
        "",
        "| Cell | MMDetection config | " + " | ".join(STAGES) + " | Verdict |",
        "|---|---|" + "---|" * len(STAGES) + "---|",
    ]
    for row in doc["cells"]:
        if row["status"] != "checked":
            lines.append(f"| {row['cell']} | {row.get('config') or '-'} | " + " | ".join("-" for _ in STAGES)
                         + f" | {row['status']}: {row.get('reason', '')} |")
            continue
        by_stage = {s["stage"]: s for s in row["stages"]}
        cells = []
        for stage in STAGES:
            s = by_stage.get(stage)
            cells.append("n/a" if s is None else (_num(s["worst"]) + ("" if s["ok"] else " ✗")))
        lines.append(f"| {row['cell']} | {row['config']} | " + " | ".join(cells) + f" | {_verdict(row)} |")
    differing = [r for r in doc["cells"] if r["status"] == "checked" and not r["ok"]]
    failed = [r for r in differing if not _equal(r)]
    explained = len(differing) - len(failed)
    lines += ["", f"{sum(r['status'] == 'checked' for r in doc['cells'])} cells checked, {len(failed)} failed"
              + (f", {explained} equal once their recorded deviation is applied to MMDetection's config" if explained else "")
              + f", {sum(r['status'] != 'checked' for r in doc['cells'])} not checked (reason given)."]
    if differing:
        lines += ["", "## Differences", ""]
        lines += [f"- {r['cell']}: {_summary(r)}" + _recorded(r) + _second_check(r) + "." for r in differing]
    details = [f"- {r['cell']}: " + "; ".join(f"{s['stage']}: {s['detail']}" for s in r["stages"] if s["detail"])
               for r in doc["cells"] if r["status"] == "checked"]
    lines += ["", "## Details", "", *details, ""]
    return "\n".join(lines)


def _recorded(row: dict[str, Any]) -> str:
    """The cell's recorded deviations (its recipe notes), which may explain a difference."""
    notes = row.get("notes") or []
    return f". Recorded deviations of this cell: {' '.join(notes)}" if notes else ". No recorded deviation explains it"


def _num(x: float) -> str:
    if x == 0:
        return "0"
    return "inf" if x == float("inf") else f"{x:.1e}"


def load_marks(path: Path | None = None) -> tuple[dict[str, str], str]:
    """(cell -> mark, the fact line) from a parity.json (default `reports/parity.json`): "✓" every
    stage within tolerance, "✓ Q2" so once that recorded deviation is applied to MMDetection's config,
    "✗" not, "-" not checked (MMDetection ships no such config); ({}, "")
    when there is none. The marks belong to the commit that file names, which the fact line says."""
    path = path or repo_root() / "reports" / PARITY_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}, ""
    rows = doc.get("cells", [])
    marks = {r["cell"]: _mark(r) for r in rows}
    checked = [r for r in rows if r["status"] == "checked"]
    passed = sum(bool(r.get("ok")) for r in checked)
    applied = sorted({q for r in checked for q in _applied(r)})
    explained = sum(bool(_applied(r)) for r in checked)
    fact = (f"{passed} of {len(checked)} checked cells equal to MMDetection {doc['mmdetection']['mmdet']}'s own model, stage by "
            f"stage (state dict, recipe, pipeline, features, proposals, detections, losses; column {PARITY_COLUMN})"
            + (f", {explained} more once its recorded deviation ({', '.join(applied)}) is applied to MMDetection's config"
               if explained else "")
            + f", at commit `{doc.get('commit', '?')}` on {doc.get('date', '?')}: reports/{PARITY_MD}")
    return marks, fact


def _mark(row: dict[str, Any]) -> str:
    """✓ equal; "✓ Q2" equal with that recorded deviation applied to MMDetection's config; ✗; - not checked."""
    if row["status"] != "checked":
        return "-"
    if row.get("ok"):
        return "✓"
    return f"✓ {' '.join(_applied(row))}" if _applied(row) else "✗"


PARITY_COLUMN = "Parity"
