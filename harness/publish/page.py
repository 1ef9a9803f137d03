"""Regenerate the results page of a matrix: README.md, results.csv, plots and metafile.yml.

`write_report` renders `reports/<matrix>/README.md` from the runs of one profile: the seed's
sections, intros and tables (same headings, columns, row order and labels), each Mem / fps / box AP
cell reading `measured / published`, plus a `Δ box AP` and a `Verdict` column, the provenance of
the runs, the dataset, how the numbers were measured, the recipe deviations (quirks Q1, Q2, Q5,
FP16, marked in the tables) and links to the plots, `results.csv` and `metafile.yml` beside it.

`render_published_page` renders the same page from the published numbers alone (no runs): its
tables reproduce the seed's cell for cell, which is what keeps the matrix YAML honest.

The page is a pure function of the runs (its date is the last run's finish time, not "now"), so
re-running `harness report` on unchanged runs rewrites the same bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from harness.execute.cells import profile_dir
from harness.matrix.spec import (
    METRIC_COLUMNS,
    Cell,
    MatrixSpec,
    Profile,
    Row,
    Table,
    repo_root,
)
from harness.metrics import BY_KEY, BY_TITLE, FPS_REL, METRICS, PUBLISHED_DEVICE_CLASS, finite
from harness.publish.metafile import (
    measured_metafile,
    write_metafile,
)
from harness.publish.plots import plot_ap_vs_fps, plot_ap_vs_published, plot_loss_curves
from harness.results.collect import (
    results_csv_frame,
)
from harness.results.compare import summary_counts
from harness.results.tables import Results
from harness.results.verdicts import quirk_ids, scope_of

TEMPLATES = Path(__file__).parent / "templates"
# Where the measured page points config links (the seed's `./x.py` links are relative to this folder).
MMDET_CONFIGS = "https://github.com/open-mmlab/mmdetection/blob/v3.3.0/configs/faster_rcnn/"
DELTA_COLUMN, VERDICT_COLUMN = "Δ box AP", "Verdict"
SYMBOLS = {"pass": "✓ pass", "warn": "⚠ warn", "fail": "✗ fail", "not comparable": "not comparable", "not run": "not run"}
FPS_MARK, MEM_MARK = BY_KEY["fps"].mark, BY_KEY["mem"].mark
DEVIATIONS_ANCHOR = "#recipe-deviations"
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
PLOTS: tuple[tuple[str, str], ...] = (
    ("ap_vs_published.png", "Measured vs published box AP per cell"),
    ("ap_vs_fps.png", "box AP against inference speed"),
    ("loss_curves.png", "Training loss curves"),
)


def default_page_dir(runs_dir: Path, matrix: MatrixSpec, profile: str) -> Path:
    """Where `harness report` / `reproduce` write a page by default: `<runs>/<matrix>/<profile>/_report/`,
    beside the runs it is made from and outside every tracked path, so a run never dirties the clone."""
    return profile_dir(Path(runs_dir), matrix.name, profile) / "_report"


def write_report(results: Results, out_dir: Path | None = None) -> Path:
    """Write README.md, results.csv, metafile.yml and plots/*.png of `results`; return the README path."""
    matrix, profile, runs, compared = results.matrix, results.profile, results.runs, results.compared
    out = Path(out_dir) if out_dir is not None else default_page_dir(results.runs_dir, matrix, profile)
    out.mkdir(parents=True, exist_ok=True)
    drawers = {"ap_vs_published.png": plot_ap_vs_published, "ap_vs_fps.png": plot_ap_vs_fps}
    for file, _title in PLOTS:
        if file in drawers:
            (out / "plots" / file).unlink(missing_ok=True)  # not drawn when AP is not compared
    for file, _title in page_plots(matrix.profile(profile)):
        if file in drawers:
            drawers[file](compared, out / "plots" / file)
    plot_loss_curves(results.curves, out / "plots" / "loss_curves.png")
    results_csv_frame(runs).to_csv(out / "results.csv", index=False)
    datasets = dataset_facts(runs)
    synthetic = bool(datasets) and all(d["synthetic"] for d in datasets)
    write_metafile(measured_metafile(matrix, compared, runs, synthetic=synthetic, repo=repo_root()), out / "metafile.yml")
    readme = out / "README.md"
    readme.write_text(render_report(results), encoding="utf-8")
    return readme


def page_plots(prof: Profile) -> list[tuple[str, str]]:
    """The plots the page shows: the AP plots only where AP is compared with the published table."""
    ap = "box_ap" in scope_of(prof).metrics
    return [(file, title) for file, title in PLOTS if ap or not file.startswith("ap_")]


def banner(prof: Profile) -> str:
    """A warning at the top of a page whose numbers are not (all) comparable with the published table."""
    scope = scope_of(prof)
    if not scope.reason:
        return ""
    if not scope.metrics:
        return (f"**Not a reproduction result.** {scope.reason}: these numbers show that every cell builds, "
                "trains, evaluates and is benchmarked, and are not comparable with the published table; "
                f"{DELTA_COLUMN} is left blank.")
    shown = " and ".join(m.short for m in METRICS if m.key in scope.metrics)
    return f"**Only {shown} are compared here.** {scope.reason}; {DELTA_COLUMN} is left blank."


def render_report(results: Results) -> str:
    """The measured page (markdown) of `results` (`harness.results.tables.gather`)."""
    matrix, profile, runs, compared = results.matrix, results.profile, results.runs, results.compared
    prof = matrix.profile(profile)
    by_name = {str(r["name"]): r for r in compared.to_dict(orient="records")}
    counts = summary_counts(compared)
    facts = [
        ("Published numbers", f"{matrix.source or 'the seed table'} (single runs on 8x {PUBLISHED_DEVICE_CLASS})"),
        ("Profile", _profile_text(prof)),
        ("Provenance", _provenance_text(runs)),
        ("Dataset", _dataset_text(runs, prof)),
        ("Verdicts", f"{len(compared)} cells: " + ", ".join(f"{n} {v}" for v, n in counts.items())),
    ]
    if prof.compare == "hardware":
        from harness.results.estimate import estimate_frame, summary_line

        cost = summary_line(estimate_frame(matrix, runs))
        if cost:
            facts.append(("Cost", cost[0].upper() + cost[1:]))
    legend = (
        f"Each Mem / fps / box AP cell reads `measured / published` (\"-\": none). {DELTA_COLUMN} is measured minus "
        f"published (with seeds: the mean, and in brackets its 95% interval). {FPS_MARK}: fps measured on another "
        f"device class than the published {PUBLISHED_DEVICE_CLASS}, not comparable. {MEM_MARK}: CPU peak resident "
        f"memory, not CUDA `max_memory_allocated`, not comparable. A [Qn]({DEVIATIONS_ANCHOR}) marker names a recipe "
        "deviation. Each cell's reason is in `results.csv` and in `harness compare`."
    )
    links: dict[str, str] = {}
    sections = _sections(matrix, lambda table, row: _measured_cells(table, row, matrix, by_name[row.cell], links), measured=True)
    return _render(
        matrix, facts=facts, legend=legend, sections=sections, measurement=_measurement(matrix, prof),
        quirks=_quirks(matrix, runs), cell_notes=_cell_notes(matrix), run_deviations=_run_deviations(runs),
        run_times=_run_times(runs, results.trends), banner=banner(prof),
        plots=[(title, f"plots/{file}") for file, title in page_plots(prof)],
        link_defs=[(ref, url) for url, ref in links.items()],
        files=[("results.csv", "one row per cell and seed: measured, published, delta, verdict and its reason"),
               ("metafile.yml", "the measured results in OpenMMLab metafile form")],
        generated=f"Generated by `harness report {matrix.name} --profile {profile}`; do not edit by hand.",
    )


def render_published_page(matrix: MatrixSpec) -> str:
    """The page from the published numbers alone (no runs); its tables are the seed's, cell for cell."""
    facts = [
        ("Published numbers", f"{matrix.source or 'the seed table'}"),
        ("Mode", f"published numbers only, no runs: every table below is rendered from `{_display(matrix.path)}`"),
    ]
    sections = _sections(matrix, lambda table, row: _published_cells(table, row, matrix), measured=False)
    return _render(
        matrix, facts=facts, legend="", sections=sections, measurement=_measurement(matrix, None),
        quirks=_quirks(matrix, None), cell_notes=_cell_notes(matrix), run_deviations=[], run_times="", plots=[],
        banner="", link_defs=[],
        files=[("metafile.yml", "the published numbers in OpenMMLab metafile form")],
        generated=f"Generated from {_display(matrix.path)} (published numbers only); do not edit by hand.",
    )


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A padded, centred GitHub markdown table; a `|` inside a cell is escaped unless it already is."""
    cells = [[_escape(c) for c in columns]] + [[_escape(c) for c in row] for row in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.center(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join(":" + "-" * (w - 2) + ":" for w in widths) + " |")
    return "\n".join(lines)


def dataset_facts(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """The data roots the runs used: path, COCO `info.description`, whether synthetic, eval splits."""
    facts = []
    ran = runs[runs["status"] != "not run"]
    for root in sorted({str(r) for r in ran["data_root"].dropna()}):
        description = _coco_description(Path(root) / "annotations" / "instances_train2017.json")
        splits = sorted({str(s) for s in ran.loc[ran["data_root"] == root, "eval_split"].dropna()})
        facts.append({"root": root, "description": description, "synthetic": "synthetic COCO-style set" in description,
                      "eval_splits": splits})
    return facts


# ---- tables ---------------------------------------------------------------------------------


def _sections(matrix: MatrixSpec, cells_of: Callable[[Table, Row], list[str]], *, measured: bool) -> list[dict[str, Any]]:
    """Consecutive tables with the same heading share a section, as in the seed."""
    sections: list[dict[str, Any]] = []
    for table in matrix.tables:
        columns = _measured_columns(table) if measured else list(table.columns)
        block = {"intro": table.intro.strip(), "table": markdown_table(columns, [cells_of(table, r) for r in table.rows])}
        if sections and sections[-1]["heading"] == table.heading:
            sections[-1]["blocks"].append(block)
        else:
            sections.append({"heading": table.heading, "blocks": [block]})
    return sections


def _measured_columns(table: Table) -> list[str]:
    cols = list(table.columns)
    at = cols.index("box AP") + 1 if "box AP" in cols else len(cols)
    return [*cols[:at], DELTA_COLUMN, VERDICT_COLUMN, *cols[at:]]


def _published_cells(table: Table, row: Row, matrix: MatrixSpec) -> list[str]:
    out = []
    for col in table.columns:
        if col in METRIC_COLUMNS:
            # The text exactly as the seed prints it ("-" and "" differ there), else the number.
            out.append(row.printed[col] if col in row.printed else _fmt(getattr(row.published, METRIC_COLUMNS[col])))
        else:
            out.append(_shared_cell(col, row, matrix))
    return out


def _measured_cells(table: Table, row: Row, matrix: MatrixSpec, cmp: dict[str, Any], links: dict[str, str]) -> list[str]:
    out = []
    for col in _measured_columns(table):
        metric = BY_TITLE.get(col)
        if metric is not None:  # "measured / published", the measured one marked where not comparable
            value = cmp[metric.column]
            text = _fmt(value) + metric.mark_for(value, cmp[metric.context] if metric.context else None)
            if metric.seeds == "interval" and cmp["n_seeds"] > 1 and finite(cmp[f"{metric.column}_std"]):
                text += f" ± {cmp[f'{metric.column}_std']:.1f}"
            out.append(f"{text} / {_fmt(getattr(row.published, metric.column))}")
        elif col == DELTA_COLUMN:
            out.append(_delta_text(cmp, row.published.box_ap))
        elif col == VERDICT_COLUMN:
            marks = " ".join(f"[{q}]({DEVIATIONS_ANCHOR})" for q in quirk_ids(cmp["notes"]))
            out.append(f"{SYMBOLS.get(cmp['verdict'], cmp['verdict'])} {marks}".strip())
        else:
            out.append(_shared_cell(col, row, matrix, links))
    return out


def _shared_cell(col: str, row: Row, matrix: MatrixSpec, links: dict[str, str] | None = None) -> str:
    """Label, Config and Download cells.

    The published page keeps the seed's text (`./config.py` links, inline URLs) cell for cell. The
    measured page (`links` given) points configs at MMDetection v3.3.0 on GitHub, as the metafile
    does (the config files do not ship here), and writes reference-style links defined at the
    page's end, so that long URLs do not widen every table.
    """
    if links is None:
        if col in row.labels:
            text = row.labels[col]
            return f"[{text}](./{row.links[col]}.py)" if col in row.links else text
        if col == "Config":
            return f"[config](./{row.cell}.py)"
        if col == "Download":
            return _download(matrix.cell(row.cell))
        return ""
    if col in row.labels:
        text = row.labels[col]
        return f"[{text}][{_ref(links, MMDET_CONFIGS + row.links[col] + '.py')}]" if col in row.links else text
    if col == "Config":
        return f"[config][{_ref(links, MMDET_CONFIGS + row.cell + '.py')}]"
    if col == "Download":
        cell = matrix.cell(row.cell)
        parts = [f"[model][{_ref(links, cell.download)}]"] if cell.download else []
        parts += [f"[log][{_ref(links, cell.log)}]"] if cell.log else []
        return " \\| ".join(parts)
    return ""


def _ref(links: dict[str, str], url: str) -> str:
    """A short reference id for `url` (the same URL keeps its id); `links` maps url -> id."""
    return links.setdefault(url, str(len(links) + 1))


def _download(cell: Cell) -> str:
    parts = [f"[model]({cell.download})"] if cell.download else []
    if cell.log:
        parts.append(f"[log]({cell.log})")
    return " \\| ".join(parts)


def _delta_text(cmp: dict[str, Any], published: float | None) -> str:
    if published is None or not finite(cmp["delta_box_ap"]):
        return "-"
    text = f"{cmp['delta_box_ap']:+.1f}"
    if cmp["n_seeds"] > 1 and finite(cmp["ci95_low"]):
        text += f" [{cmp['ci95_low'] - published:+.1f}, {cmp['ci95_high'] - published:+.1f}]"
    return text


# ---- page facts -----------------------------------------------------------------------------


def _profile_text(prof: Profile) -> str:
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


def _provenance_text(runs: pd.DataFrame) -> str:
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
    return f"commit {commits}{dirty}; {', '.join(versions)}; {_machine_text(ran)}; {len(ran)} run(s), last finished {date}"


def _machine_text(ran: pd.DataFrame) -> str:
    """The device, and what explains speed on it: CPU model, cores, threads per cell, load at the start."""
    devices = _unique(ran["device"])
    host = []
    if ran["cpu"].notna().any():
        host.append(f"CPU {_unique(ran['cpu'])}")
    if ran["cores"].notna().any():
        host.append(f"{_unique(ran['cores'], lambda c: str(int(c)))} logical cores")
    if ran["threads"].notna().any():
        host.append(f"{_unique(ran['threads'], lambda t: str(int(t)))} torch threads per cell")
    loads = [float(x) for x in ran["load_1m"].dropna()]
    if loads:
        host.append(f"load {min(loads):.1f}-{max(loads):.1f} when the run began")
    return f"device {devices}" + (f" (host: {', '.join(host)})" if host else "")


def _dataset_text(runs: pd.DataFrame, prof: Profile) -> str:
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
        parts.append(f"{kind} `{_display(Path(f['root']))}`{desc}; {where}")
    return "; ".join(parts)


def _measurement(matrix: MatrixSpec, prof: Profile | None) -> dict[str, Any]:
    """Numbers the "How these numbers were measured" section of the template quotes."""
    tol = matrix.tolerances
    short = prof is not None and (prof.budget.max_iters is not None or prof.budget.image_scale is not None)
    return {
        "ap_pass": tol.box_ap_pass, "ap_warn": tol.box_ap_warn, "mem_rel": f"{tol.mem_rel:.0%}",
        "fps_rel": f"{FPS_REL:.0%}", "device_class": PUBLISHED_DEVICE_CLASS, "fps_mark": FPS_MARK,
        "mem_mark": MEM_MARK, "short_profile": _profile_text(prof) if short and prof else "",
    }


def _quirks(matrix: MatrixSpec, runs: pd.DataFrame | None) -> list[dict[str, Any]]:
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


def _cell_notes(matrix: MatrixSpec) -> list[tuple[str, str]]:
    return [(c.name, n) for c in matrix.cells for n in c.notes if not quirk_ids([n])]


def _run_deviations(runs: pd.DataFrame) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for devs in runs.loc[runs["status"] == "ok", "deviations"]:
        for d in devs or ():
            counts[d] = counts.get(d, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _run_times(runs: pd.DataFrame, trends: pd.DataFrame) -> str:
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


def _render(matrix: MatrixSpec, **context: Any) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
        autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )
    text = env.get_template("page.md.j2").render(
        title=matrix.title, paper_title=matrix.paper_title, paper_url=matrix.paper_url, **context)
    # The recipe notes cite sections of the project's internal recipes reference, which does not
    # ship with the page: a reader cannot follow "(reference 1.9 item 6)", so the page drops them.
    text = _REFERENCE_CITATION.sub("", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


_REFERENCE_CITATION = re.compile(r" ?\((?:see )?reference [^()]*\)|,? reference §[0-9.]+(?: Q[0-9]+)?")


# ---- small helpers --------------------------------------------------------------------------


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


def _display(path: Path) -> str:
    """A path relative to the repository when inside it (pages are read from the repo)."""
    try:
        return str(Path(path).resolve().relative_to(repo_root()))
    except ValueError:
        return str(path)


def _escape(text: str) -> str:
    return re.sub(r"(?<!\\)\|", r"\\|", str(text))


def _fmt(x: Any) -> str:
    return f"{float(x):.1f}" if finite(x) else "-"



__all__ = [
    "QUIRKS",
    "dataset_facts",
    "markdown_table",
    "render_published_page",
    "render_report",
    "default_page_dir",
    "write_report",
]
