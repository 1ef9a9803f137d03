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

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2

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
from harness.metrics import BY_TITLE, METRICS, PUBLISHED_DEVICE_CLASS, finite
from harness.parity import PARITY_COLUMN, load_marks
from harness.publish.facts import (
    FPS_MARK,
    MEM_MARK,
    cell_notes,
    dataset_facts,
    dataset_text,
    display_path,
    framework_text,
    measurement,
    profile_text,
    provenance_text,
    quirks,
    run_deviations,
    run_times,
)
from harness.publish.markdown import markdown_table
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
DEVIATIONS_ANCHOR = "#recipe-deviations"
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
    parity, parity_fact = load_marks()
    facts = [
        ("Published numbers", f"{matrix.source or 'the seed table'} (single runs on 8x {PUBLISHED_DEVICE_CLASS})"),
        ("Profile", profile_text(prof)),
        ("Provenance", provenance_text(runs)),
        ("Dataset", dataset_text(runs, prof)),
        ("Verdicts", f"{len(compared)} cells: " + ", ".join(f"{n} {v}" for v, n in counts.items())),
    ]
    if parity_fact:
        facts.append(("Parity", parity_fact))
    framework = framework_text(runs)
    if framework:
        facts.append(("Framework", framework))
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
    if parity:
        legend += (f" {PARITY_COLUMN}: ✓ the cell's model equals MMDetection 3.3.0's own, stage by stage, on shared "
                   "weights (`reports/parity.md`); ✓ Qn: equal once that recorded deviation is applied to MMDetection's config; "
                   "✗ a stage differs; - not checked.")
    links: dict[str, str] = {}
    sections = _sections(matrix, lambda table, row: _measured_cells(table, row, matrix, by_name[row.cell], links, parity),
                         measured=True, parity=bool(parity))
    return _render(
        matrix, facts=facts, legend=legend, sections=sections, measurement=measurement(matrix, prof),
        quirks=quirks(matrix, runs), cell_notes=cell_notes(matrix), run_deviations=run_deviations(runs),
        run_times=run_times(runs, results.trends), banner=banner(prof),
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
        ("Mode", f"published numbers only, no runs: every table below is rendered from `{display_path(matrix.path)}`"),
    ]
    sections = _sections(matrix, lambda table, row: _published_cells(table, row, matrix), measured=False)
    return _render(
        matrix, facts=facts, legend="", sections=sections, measurement=measurement(matrix, None),
        quirks=quirks(matrix, None), cell_notes=cell_notes(matrix), run_deviations=[], run_times="", plots=[],
        banner="", link_defs=[],
        files=[("metafile.yml", "the published numbers in OpenMMLab metafile form")],
        generated=f"Generated from {display_path(matrix.path)} (published numbers only); do not edit by hand.",
    )


# ---- tables ---------------------------------------------------------------------------------


def _sections(matrix: MatrixSpec, cells_of: Callable[[Table, Row], list[str]], *, measured: bool,
              parity: bool = False) -> list[dict[str, Any]]:
    """Consecutive tables with the same heading share a section, as in the seed."""
    sections: list[dict[str, Any]] = []
    for table in matrix.tables:
        columns = _measured_columns(table, parity=parity) if measured else list(table.columns)
        block = {"intro": table.intro.strip(), "table": markdown_table(columns, [cells_of(table, r) for r in table.rows])}
        if sections and sections[-1]["heading"] == table.heading:
            sections[-1]["blocks"].append(block)
        else:
            sections.append({"heading": table.heading, "blocks": [block]})
    return sections


def _measured_columns(table: Table, *, parity: bool) -> list[str]:
    """The seed's columns plus delta and verdict after box AP, and the parity mark where
    reports/parity.json has marks."""
    cols = list(table.columns)
    at = cols.index("box AP") + 1 if "box AP" in cols else len(cols)
    return [*cols[:at], DELTA_COLUMN, VERDICT_COLUMN, *([PARITY_COLUMN] if parity else []), *cols[at:]]


def _published_cells(table: Table, row: Row, matrix: MatrixSpec) -> list[str]:
    out = []
    for col in table.columns:
        if col in METRIC_COLUMNS:
            # The text exactly as the seed prints it ("-" and "" differ there), else the number.
            out.append(row.printed[col] if col in row.printed else _fmt(getattr(row.published, METRIC_COLUMNS[col])))
        else:
            out.append(_shared_cell(col, row, matrix))
    return out


def _measured_cells(table: Table, row: Row, matrix: MatrixSpec, cmp: dict[str, Any], links: dict[str, str],
                    parity: dict[str, str]) -> list[str]:
    out = []
    for col in _measured_columns(table, parity=bool(parity)):
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
        elif col == PARITY_COLUMN:  # numerical parity with MMDetection's own model (reports/parity.md)
            out.append(parity.get(row.cell, "-"))
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


def _fmt(x: Any) -> str:
    return f"{float(x):.1f}" if finite(x) else "-"



__all__ = [
    "render_published_page",
    "render_report",
    "default_page_dir",
    "write_report",
]
