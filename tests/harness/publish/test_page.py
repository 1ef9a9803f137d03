"""harness.publish.page: the published-only page reproduces the seed's tables; the measured page keeps its shape."""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
import pandas as pd
import pytest
import yaml

import harness.publish.page as page_module
from harness.matrix.parse import load_matrix
from harness.matrix.spec import MatrixSpec
from harness.parity import PARITY_COLUMN
from harness.publish.markdown import markdown_table
from harness.publish.metafile import published_metafile, write_metafile
from harness.publish.page import (
    DELTA_COLUMN,
    MMDET_CONFIGS,
    VERDICT_COLUMN,
    default_page_dir,
    render_published_page,
    render_report,
    write_report,
)
from harness.results.tables import Results, gather
from tests.resources.fake_runs import R50, write_run, write_synthetic_root

SEED = Path(__file__).resolve().parents[2] / "resources" / "faster_rcnn_README.md"  # copy of shared/seed/
METRICS = ("Mem (GB)", "Inf time (fps)", "box AP")
DESIGN_CSV_COLUMNS = ["name", "profile", "seed", "status", "box_ap", "mem_gb", "fps", "published_box_ap",
                      "delta_box_ap", "verdict"]



# Test-only helpers (the harness itself never needs them).
def report_is_current(results: Results, out_dir: Path | None = None) -> bool:
    """Whether the README in `out_dir` is exactly what `write_report` would write now (a CI staleness check)."""
    folder = Path(out_dir) if out_dir is not None else default_page_dir(results.runs_dir, results.matrix, results.profile)
    readme = folder / "README.md"
    return readme.is_file() and readme.read_text(encoding="utf-8") == render_report(results)


def write_published_report(matrix: MatrixSpec, out_dir: Path) -> Path:
    """Write the published-only README.md and metafile.yml into `out_dir`; return the README path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_metafile(published_metafile(matrix), out / "metafile.yml")
    readme = out / "README.md"
    readme.write_text(render_published_page(matrix), encoding="utf-8")
    return readme


def parse_tables(markdown: str) -> list[dict]:
    """Every markdown table: the `##` heading above it, its header and its rows (cells stripped)."""
    tables: list[dict] = []
    heading, current = None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if current is None:
                current = {"heading": heading, "header": cells, "rows": []}
                tables.append(current)
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current["rows"].append(dict(zip(current["header"], cells)))
        else:
            current = None
    return tables


def _number(text: str) -> float | None:
    return None if text in ("-", "") else float(text)


@pytest.fixture(scope="module")
def matrix() -> MatrixSpec:
    return load_matrix("faster_rcnn")


def test_published_page_reproduces_the_seed_tables_cell_for_cell(matrix: MatrixSpec) -> None:
    seed_text = SEED.read_text(encoding="utf-8")
    seed, page = parse_tables(seed_text), parse_tables(render_published_page(matrix))
    assert len(seed) == len(page) == 5
    assert sum(len(t["rows"]) for t in page) == 31
    for want, got in zip(seed, page):
        assert got["heading"] == want["heading"]
        assert got["header"] == want["header"]
        assert len(got["rows"]) == len(want["rows"])
        for i, (w, g) in enumerate(zip(want["rows"], got["rows"])):
            where = f"{want['heading']} row {i}"
            for col in want["header"]:
                if col in METRICS:
                    assert _number(g[col]) == _number(w[col]), f"{where} {col}"
                assert g[col] == w[col], f"{where} {col}: {g[col]!r} != {w[col]!r}"  # labels, links, "-" vs ""
    # Headings and the intros before the tables, in the seed's order.
    page_text = render_published_page(matrix)
    for heading in ("Results and Models", "Different regression loss", "Pre-trained Models", "Torchvision New Receipe (TNR)"):
        assert f"\n## {heading}\n" in page_text
    for table in matrix.tables:
        if table.intro:
            assert table.intro.split("[")[0].strip() in seed_text.replace("\n", " ")
            assert table.intro.strip() in page_text


def test_published_page_catches_a_wrong_number(matrix: MatrixSpec) -> None:
    """The reproduction check is real: a changed number in the matrix shows up as a different cell."""
    from dataclasses import replace

    table = matrix.tables[0]
    row = replace(table.rows[3], printed={**table.rows[3].printed, "box AP": "37.5"})
    broken = replace(matrix, tables=(replace(table, rows=(*table.rows[:3], row, *table.rows[4:])), *matrix.tables[1:]))
    seed_rows = parse_tables(SEED.read_text(encoding="utf-8"))[0]["rows"]
    page_rows = parse_tables(render_published_page(broken))[0]["rows"]
    assert page_rows[3]["box AP"] == "37.5" != seed_rows[3]["box AP"]


def test_published_report_files(matrix: MatrixSpec, tmp_path: Path) -> None:
    readme = write_published_report(matrix, tmp_path)
    assert readme == tmp_path / "README.md" and readme.read_text().startswith("# Faster R-CNN\n")
    meta = yaml.safe_load((tmp_path / "metafile.yml").read_text())
    assert len(meta["Models"]) == len(matrix.cells)


@pytest.fixture()
def measured(matrix: MatrixSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    # The parity marks as reports/parity.json would give them (that file is the repo's, not the test's).
    monkeypatch.setattr(page_module, "load_marks", lambda: ({R50: "✓", "faster-rcnn_r50_fpn_giou_1x_coco": "✗"}, "PARITY FACT"))
    runs, root = tmp_path / "runs", write_synthetic_root(tmp_path / "data")
    for seed, ap in enumerate((37.3, 37.5)):
        write_run(runs, R50, profile="smoke", seed=seed, box_ap=ap, data_root=str(root), eval_split="train2017",
                  mem_kind="cpu_peak_rss", device_class="cpu", losses=[3.0, 2.0, 1.0], checkpoint=True,
                  deviations=["image scale (160, 128) instead of (1333, 800)"])
    write_run(runs, "faster-rcnn_r101-caffe_fpn_ms-3x_coco", profile="smoke", box_ap=0.5, data_root=str(root),
              eval_split="train2017", finished_at="2025-03-04T05:06:07+00:00")
    write_run(runs, "faster-rcnn_r50_fpn_giou_1x_coco", profile="smoke", status="failed", error="RuntimeError: boom")
    readme = write_report(gather(matrix, "smoke", runs), tmp_path / "out")
    return tmp_path / "out", readme.read_text(encoding="utf-8")


def _inline_links(cell: str, defs: dict[str, str]) -> str:
    """`[text][n]` reference links of the measured page -> `[text](url)`, as the seed writes them."""
    return re.sub(r"\[([^\]]+)\]\[(\d+)\]", lambda m: f"[{m.group(1)}]({defs[m.group(2)]})", cell)


def test_measured_page_structure(matrix: MatrixSpec, measured: tuple[Path, str]) -> None:
    out, text = measured
    seed = parse_tables(SEED.read_text(encoding="utf-8"))
    page = parse_tables(text)
    defs = dict(re.findall(r"^\[(\d+)\]: (\S+)$", text, flags=re.M))
    assert len(page) == len(seed) + 1  # the seed's tables, then the run-times table
    times = page[-1]
    assert times["heading"] == "Run times" and times["rows"][-1]["Config"] == "**all cells**"
    assert {"Train (img/s)", "s / iter"} <= set(times["header"])  # the training throughput column
    # R-50's two seeds logged 3.0, 2.0, 1.0 (quarters of one point); the other runs logged no loss
    r50_rows = [r for r in times["rows"] if r["Config"] == R50]
    assert [r["Loss start → end"] for r in r50_rows] == ["3.00 → 1.00", "3.00 → 1.00"]
    assert times["rows"][-1]["Loss start → end"] == "fell in 2/2"
    assert all(float(r["Cell wall (s)"].strip("*")) >= 0 for r in times["rows"])
    for want, got in zip(seed, page):
        at = want["header"].index("box AP") + 1
        assert got["heading"] == want["heading"]
        assert got["header"] == [*want["header"][:at], DELTA_COLUMN, VERDICT_COLUMN, PARITY_COLUMN, *want["header"][at:]]
        for w, g in zip(want["rows"], got["rows"], strict=True):
            for col in want["header"]:
                if col in METRICS:  # "measured / published", the published half as in the seed
                    measured_text, published_text = g[col].split(" / ")
                    assert _number(published_text) == _number(w[col])
                else:  # links resolved: configs on MMDetection v3.3.0's GitHub, downloads as published
                    assert _inline_links(g[col], defs) == w[col].replace("](./", f"]({MMDET_CONFIGS}")
    r50 = page[0]["rows"][3]
    assert r50["box AP"] == "37.4 ± 0.1 / 37.4" and r50["Mem (GB)"] == "4.0‡ / 4.0"
    assert r50["Verdict"] == "not comparable [Q5](#recipe-deviations)"
    assert r50["Parity"] == "✓" and page[0]["rows"][0]["Parity"] == "-"  # marked / not in parity.json
    assert "PARITY FACT" in text
    giou = page[1]["rows"][2]
    assert giou["Verdict"] == "✗ fail" and giou["box AP"] == "- / 37.6" and giou["Parity"] == "✗"
    for section in ("## How these numbers were measured", "## Recipe deviations", "## Run times", "## Plots", "## Files"):
        assert f"\n{section}\n" in text
    # Provenance line: commit, dirty state, versions, device, profile, date (of the last run).
    assert "commit `0123456789ab`" in text and "torch 2.14.0" in text and "torchvision 0.29.0" in text
    assert "device cpu" in text and "`smoke`" in text and "last finished 2025-03-04T05:06:07+00:00" in text
    assert "synthetic COCO-format set generated by the harness" in text and "evaluated on the train split" in text
    # Recipe deviations show Q2 / Q5 / FP16 on their cells, and the profile's own deviations.
    assert "- **Q2**" in text and "`faster-rcnn_r101-caffe_fpn_ms-3x_coco`" in text
    assert "- **Q1**" in text and "- **FP16**" in text
    assert "image scale (160, 128) instead of (1333, 800) (2 runs)" in text


def test_measured_page_files(matrix: MatrixSpec, measured: tuple[Path, str]) -> None:
    out, text = measured
    assert "](plots/loss_curves.png)" in text
    assert (out / "plots" / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for png in ("ap_vs_published.png", "ap_vs_fps.png"):  # smoke compares no AP: no AP plots
        assert png not in text and not (out / "plots" / png).exists()
    assert text.count("**Not a reproduction result.**") == 1 and "reference" not in text
    csv = pd.read_csv(out / "results.csv")
    assert set(DESIGN_CSV_COLUMNS) <= set(csv.columns)
    assert len(csv) == len(matrix.cells) + 1  # two seeds of R50, one row for every other cell
    assert list(csv.loc[csv["name"] == R50, "seed"]) == [0, 1]
    meta = yaml.safe_load((out / "metafile.yml").read_text())
    assert {m["Name"] for m in meta["Models"]} == {R50, "faster-rcnn_r101-caffe_fpn_ms-3x_coco"}


def test_report_is_deterministic_and_staleness_is_detected(matrix: MatrixSpec, measured: tuple[Path, str], tmp_path: Path) -> None:
    out, text = measured
    again = write_report(gather(matrix, "smoke", tmp_path / "runs"), out)
    assert again.read_text(encoding="utf-8") == text
    assert report_is_current(gather(matrix, "smoke", tmp_path / "runs"), out)
    write_run(tmp_path / "runs", "faster-rcnn_r50_fpn_2x_coco", profile="smoke", box_ap=0.1)  # a new result
    assert not report_is_current(gather(matrix, "smoke", tmp_path / "runs"), out)
    assert not report_is_current(gather(matrix, "smoke", tmp_path / "runs"), tmp_path / "nowhere")


def test_markdown_table_escapes_pipes() -> None:
    table = markdown_table(["a", "b"], [["x | y", r"[m](u) \| [l](v)"]])
    rows = parse_tables(table)[0]["rows"]
    assert rows == [{"a": r"x \| y", "b": r"[m](u) \| [l](v)"}]


def test_templates_are_strict(matrix: MatrixSpec) -> None:
    from harness.publish.page import _render

    with pytest.raises(jinja2.UndefinedError):
        _render(matrix, facts=[], legend="")


def test_no_parity_marks_no_parity_column(matrix: MatrixSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(page_module, "load_marks", lambda: ({}, ""))
    runs = tmp_path / "runs"
    write_run(runs, R50, profile="smoke", box_ap=1.0, data_root=str(write_synthetic_root(tmp_path / "data")), eval_split="train2017")
    text = write_report(gather(matrix, "smoke", runs), tmp_path / "out").read_text(encoding="utf-8")
    assert all(PARITY_COLUMN not in t["header"] for t in parse_tables(text)) and "| Parity |" not in text


def test_hardware_page_says_what_torchvision_used_beside_ours(matrix: MatrixSpec, tmp_path: Path) -> None:
    """The "Framework" fact: ours against torchvision's memory, measured in the same cell process,
    for the cells that measured it; no such line when none did."""
    runs = tmp_path / "runs"
    write_run(runs, "faster-rcnn_r50_fpn_1x_coco", profile="hardware", mem_gb=2.5, device_class="H200", framework_mem_gb=2.4)
    write_run(runs, "faster-rcnn_r101_fpn_1x_coco", profile="hardware", mem_gb=3.0, device_class="H200")
    text = render_report(gather(matrix, "hardware", runs))
    line = next(ln for ln in text.splitlines() if "Framework" in ln)
    assert "`faster-rcnn_r50_fpn_1x_coco` ours 2.5 GB, torchvision 2.4 GB (fp32)" in line and "r101" not in line
    bare = tmp_path / "bare"
    write_run(bare, "faster-rcnn_r50_fpn_1x_coco", profile="hardware", mem_gb=2.5, device_class="H200")
    assert "Framework" not in render_report(gather(matrix, "hardware", bare))


def test_a_dataset_s_own_categories_are_said_on_the_dataset_line(matrix: MatrixSpec, tmp_path: Path) -> None:
    runs, root = tmp_path / "runs", str(write_synthetic_root(tmp_path / "data"))
    write_run(runs, R50, data_root=root, categories=["widget", "gizmo", "sprocket"])
    text = render_report(gather(matrix, "full", runs))
    line = next(x for x in text.splitlines() if x.startswith("- **Dataset**"))
    assert line.endswith("**trained 3 categories of its own (widget, gizmo, sprocket), not the recipe's 80: nothing compared**")
    assert "1 not comparable" in text
    write_run(runs, R50, data_root=root)  # the recipe's categories: the line says nothing of them
    line = next(x for x in render_report(gather(matrix, "full", runs)).splitlines() if x.startswith("- **Dataset**"))
    assert "categories" not in line
