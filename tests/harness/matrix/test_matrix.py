"""harness.matrix.spec: the bundled matrix against the seed README, expansion rules, selection, errors."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from detector.recipes import AXES, resolve
from harness.errors import UserError
from harness.matrix.parse import load_matrix
from harness.matrix.spec import (
    DERIVED_COLUMNS,
    METRIC_COLUMNS,
    NO_SECTION,
    MatrixSpec,
    expand_matrix,
    matrices_dir,
    repo_root,
)

# A copy of ../shared/seed/faster_rcnn_README.md (MMDetection v3.3.0), so the tests run without shared/.
SEED = Path(__file__).resolve().parents[2] / "resources" / "faster_rcnn_README.md"
RESOURCES = Path(__file__).resolve().parents[2] / "resources"
_LINK = re.compile(r"\[([^\]]*)\]\(([^)]*)\)")


# ------------------------------------------------------------------------------------------------
# A tiny parser of the seed's markdown tables (independent of the YAML)


def _split_row(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def parse_seed(text: str) -> list[dict[str, Any]]:
    """Tables in order: heading, intro (paragraphs since the heading / previous table), columns, rows."""
    tables: list[dict[str, Any]] = []
    heading, lines = "", text.splitlines()
    paragraph: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading, paragraph = line[3:].strip(), []
        elif line.startswith("|"):
            columns = _split_row(line)
            rows = []
            i += 2  # skip the separator
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(columns, _split_row(lines[i]))))
                i += 1
            tables.append({"heading": heading, "intro": " ".join(paragraph), "columns": columns, "rows": rows})
            paragraph = []
            continue
        elif line.strip() and not line.startswith(("<", ">", "```")):
            paragraph.append(line.strip())
        i += 1
    return tables


@pytest.fixture(scope="module")
def spec() -> MatrixSpec:
    return load_matrix("faster_rcnn")


@pytest.fixture(scope="module")
def seed_tables() -> list[dict[str, Any]]:
    tables = parse_seed(SEED.read_text(encoding="utf-8"))
    return [t for t in tables if "box AP" in t["columns"]]


def write(tmp_path: Path, body: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# The bundled matrix is the seed


def test_seed_copy_is_current() -> None:
    shared = repo_root().parent / "shared" / "seed" / "faster_rcnn_README.md"
    if not shared.is_file():
        pytest.skip("no ../shared/seed in this checkout; the bundled copy is used")
    assert SEED.read_bytes() == shared.read_bytes()


def test_counts(spec: MatrixSpec) -> None:
    rows = [row for t in spec.tables for row in t.rows]
    assert len(rows) == 31
    assert len(spec.cells) == 30
    assert len({row.cell for row in rows}) == 30
    assert [t.id for t in spec.tables] == ["main", "loss", "pretrained", "finetune", "tnr"]


def test_tables_equal_seed_row_by_row(spec: MatrixSpec, seed_tables: list[dict[str, Any]]) -> None:
    assert len(seed_tables) == len(spec.tables)
    for seed, table in zip(seed_tables, spec.tables):
        assert table.heading == seed["heading"]
        assert table.intro == seed["intro"]
        assert table.columns == tuple(seed["columns"])
        assert len(table.rows) == len(seed["rows"])
        for seed_row, row in zip(seed["rows"], table.rows):
            config = _LINK.search(seed_row["Config"])
            assert config is not None and config.group(2) == f"./{row.cell}.py"
            cell = spec.cell(row.cell)
            model, log = (url for _, url in _LINK.findall(seed_row["Download"]))
            assert (cell.download, cell.log) == (model, log)
            for column in table.columns:
                if column in DERIVED_COLUMNS:
                    continue
                shown = seed_row[column]
                if column in METRIC_COLUMNS:
                    assert row.printed[column] == shown, (row.cell, column)  # "-" vs "" kept apart
                    value = getattr(row.published, METRIC_COLUMNS[column])
                    assert value == (None if shown in ("-", "") else float(shown)), (row.cell, column)
                else:
                    link = _LINK.fullmatch(shown)
                    assert row.labels[column] == (link.group(1) if link else shown)
                    if link:
                        assert f"./{row.links[column]}.py" == link.group(2)
                    else:
                        assert column not in row.links
            missing = [c for c in METRIC_COLUMNS if c not in table.columns]
            assert all(getattr(row.published, METRIC_COLUMNS[c]) is None for c in missing)


def test_cell_published_is_its_first_row(spec: MatrixSpec) -> None:
    first: dict[str, tuple[str, Any]] = {}
    for t in spec.tables:
        for row in t.rows:
            first.setdefault(row.cell, (t.id, row.published))
    for cell in spec.cells:
        assert (cell.section, cell.published) == first[cell.name]
    l1_row = spec.table("loss").rows[0]
    assert l1_row.cell == "faster-rcnn_r50_fpn_1x_coco" and l1_row.labels["Loss type"] == "L1Loss"
    assert l1_row.published == spec.cell("faster-rcnn_r50_fpn_1x_coco").published


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("faster-rcnn_r50_fpn_1x_coco", {}),
        ("faster-rcnn_r50-caffe_c4-1x_coco", {"style": "caffe", "neck": "c4"}),
        ("faster-rcnn_r50-caffe-c4_ms-1x_coco", {"style": "caffe", "neck": "c4", "train_scale": "ms-choice"}),
        ("faster-rcnn_r50-caffe-dc5_ms-1x_coco", {"style": "caffe", "neck": "dc5", "train_scale": "ms-choice"}),
        ("faster-rcnn_r50-caffe-dc5_ms-3x_coco", {"style": "caffe", "neck": "dc5", "schedule": "3x", "train_scale": "ms-choice"}),
        ("faster-rcnn_r50-caffe_fpn_ms-2x_coco", {"style": "caffe", "schedule": "2x", "train_scale": "ms-choice"}),
        ("faster-rcnn_r50-caffe_fpn_ms-3x_coco", {"style": "caffe", "schedule": "3x", "train_scale": "ms-range"}),
        ("faster-rcnn_x101-32x8d_fpn_ms-3x_coco", {"backbone": "x101-32x8d", "schedule": "3x", "train_scale": "ms-range"}),
        ("faster-rcnn_r50_fpn_amp-1x_coco", {"precision": "amp"}),
        ("faster-rcnn_r50_fpn_bounded-iou_1x_coco", {"loss": "bounded-iou"}),
        ("faster-rcnn_r50-tnr-pre_fpn_1x_coco", {"pretrain": "tnr"}),
        ("faster-rcnn_r50-caffe_fpn_ms-1x_coco-person-bicycle-car",
         {"style": "caffe", "train_scale": "ms-choice", "classes": "person-bicycle-car", "pretrain": "coco-caffe-ms-3x"}),
    ],
)
def test_axes_of_irregular_cells(spec: MatrixSpec, name: str, expected: dict[str, str]) -> None:
    defaults = {axis: values[0] for axis, values in AXES.items()}
    assert spec.cell(name).axes == {**defaults, **expected}


def test_every_cell_resolves_to_its_recipe(spec: MatrixSpec) -> None:
    for cell in spec.cells:
        assert set(cell.axes) == set(AXES)
        cfg = resolve(cell.axes, name=cell.name)
        assert cfg.name == cell.name
    # A few recipe facts the axes must produce (reference 1.4, 1.5).
    assert resolve(spec.cell("faster-rcnn_r50_fpn_ms-3x_coco").axes).schedule.repeat_times == 3
    assert resolve(spec.cell("faster-rcnn_r50-caffe-dc5_ms-3x_coco").axes).schedule.max_epochs == 36
    assert resolve(spec.cell("faster-rcnn_r50-caffe_fpn_ms-2x_coco").axes).schedule.milestones == (16, 23)
    person = resolve(spec.cell("faster-rcnn_r50-caffe_fpn_ms-1x_coco-person").axes)
    assert person.num_classes == 1 and person.load_from is not None
    assert resolve(spec.cell("faster-rcnn_r50-tnr-pre_fpn_1x_coco").axes).schedule.optimizer == "adamw"
    c4 = spec.cell("faster-rcnn_r50-caffe_c4-1x_coco")
    assert c4.config == resolve(c4.axes, name=c4.name) and c4.config.roi_head.kind == "res5"
    as_json = c4.to_dict()
    assert as_json["published"] == {"box_ap": 35.6, "mem_gb": None, "fps": None} and as_json["section"] == "main"
    assert as_json["axes"]["neck"] == "c4" and "faster-rcnn_r50-caffe-c4_1x_coco" in as_json["aliases"]


def test_profiles_and_tolerances(spec: MatrixSpec) -> None:
    assert set(spec.profiles) == {"smoke", "ci", "hardware", "full"}
    smoke, ci, full = spec.profile("smoke"), spec.profile("ci"), spec.profile("full")
    assert (smoke.data, smoke.compare, smoke.budget.image_scale, smoke.cells) == ("synthetic", "none", (160, 128), ())
    assert (smoke.jobs, ci.jobs, full.jobs, spec.profile("hardware").jobs) == ("auto", 1, 1, 1)
    assert ci.compare == "baselines" and ci.budget.max_iters == 60
    assert {c.name for c in spec.cells_for("ci")} == {
        "faster-rcnn_r50_fpn_1x_coco", "faster-rcnn_r50-caffe_fpn_1x_coco",
        "faster-rcnn_r50_fpn_giou_1x_coco", "faster-rcnn_r50_fpn_amp-1x_coco"}
    assert (full.compare, full.budget.max_iters, full.budget.image_scale, full.budget.eval_max_images) == ("published", None, None, None)
    with pytest.raises(UserError, match="profile full needs --data ROOT"):
        full.data_root()
    assert full.data_root("/data/coco") == "/data/coco"
    assert smoke.data_root() == "synthetic"
    assert (spec.tolerances.box_ap_pass, spec.tolerances.box_ap_warn, spec.tolerances.mem_rel) == (0.2, 0.3, 0.1)
    with pytest.raises(UserError, match=r"unknown profile 'fast'; allowed: smoke, ci, hardware, full"):
        spec.profile("fast")


# ------------------------------------------------------------------------------------------------
# Selection


def test_select_names_aliases_globs(spec: MatrixSpec) -> None:
    assert spec.select() == list(spec.cells)
    assert [c.name for c in spec.select(["faster_rcnn_r50_fpn_1x_coco"])] == ["faster-rcnn_r50_fpn_1x_coco"]
    assert [c.name for c in spec.select(["faster-rcnn_r50_fpn_fp16_1x_coco"])] == ["faster-rcnn_r50_fpn_amp-1x_coco"]
    assert [c.name for c in spec.select(["faster-rcnn_r50-caffe-c4_1x_coco"])] == ["faster-rcnn_r50-caffe_c4-1x_coco"]
    ms3x = {c.name for c in spec.select(["*_ms-3x_coco"])}
    assert len(ms3x) == 8 and "faster-rcnn_r50-caffe-dc5_ms-3x_coco" in ms3x
    assert {c.name for c in spec.select(["*mstrain_3x*"])} == ms3x  # globs see aliases too
    both = spec.select(["faster-rcnn_x101-64x4d_fpn_2x_coco", "faster-rcnn_r50-caffe_c4-1x_coco", "*_c4-1x_*"])
    assert [c.name for c in both] == ["faster-rcnn_r50-caffe_c4-1x_coco", "faster-rcnn_x101-64x4d_fpn_2x_coco"]
    assert spec.cell("https://example.org/faster_rcnn_r50_fpn_bounded_iou_1x_coco-98ad993b.pth").name == (
        "faster-rcnn_r50_fpn_bounded-iou_1x_coco")


def test_select_unknown_pattern_suggests(spec: MatrixSpec) -> None:
    with pytest.raises(UserError) as err:
        spec.select(["faster-rcnn_r50_fpn_3x_coco"])
    msg = str(err.value)
    assert "faster_rcnn.yaml" in msg and "'faster-rcnn_r50_fpn_3x_coco'" in msg and "did you mean" in msg
    assert "faster-rcnn_r50_fpn_1x_coco" in msg or "faster-rcnn_r50_fpn_ms-3x_coco" in msg
    with pytest.raises(UserError, match="globs match whole names: did you mean '\\*r50-caffe\\*'"):
        spec.select(["r50-caffe*"])
    with pytest.raises(UserError, match="no cell matches 'retinanet_\\*'"):
        spec.select(["retinanet_*"])
    with pytest.raises(UserError, match="unknown cell 'faster-rcnn_r18_fpn_1x_coco'"):
        spec.cell("faster-rcnn_r18_fpn_1x_coco")


# ------------------------------------------------------------------------------------------------
# GitHub Actions include / exclude semantics


def test_expand_github_docs_include_example() -> None:
    # The example of docs.github.com "Expanding or adding matrix configurations".
    combos = expand_matrix(
        {"fruit": ["apple", "pear"], "animal": ["cat", "dog"]},
        include=[{"color": "green"}, {"color": "pink", "animal": "cat"}, {"fruit": "apple", "shape": "circle"},
                 {"fruit": "banana"}, {"fruit": "banana", "animal": "cat"}],
    )
    assert combos == [
        {"fruit": "apple", "animal": "cat", "color": "pink", "shape": "circle"},
        {"fruit": "apple", "animal": "dog", "color": "green", "shape": "circle"},
        {"fruit": "pear", "animal": "cat", "color": "pink"},
        {"fruit": "pear", "animal": "dog", "color": "green"},
        {"fruit": "banana"},
        {"fruit": "banana", "animal": "cat"},
    ]


def test_expand_exclude_then_include() -> None:
    axes = {"os": ["mac", "win"], "version": ["12", "14", "16"], "env": ["staging", "prod"]}
    combos = expand_matrix(axes, exclude=[{"os": "mac", "version": "12", "env": "prod"}, {"os": "win", "version": "16"}])
    assert len(combos) == 12 - 1 - 2
    assert {"os": "mac", "version": "12", "env": "prod"} not in combos
    assert not [c for c in combos if c["os"] == "win" and c["version"] == "16"]
    # An include that matches an excluded combination does not bring it back into the product: it
    # cannot merge anywhere it would overwrite, so it is added as a new combination of its own.
    again = expand_matrix(axes, include=[{"os": "win", "version": "16"}], exclude=[{"os": "win", "version": "16"}])
    assert again[-1] == {"os": "win", "version": "16"} and len(again) == 12 - 2 + 1
    assert expand_matrix({}, include=[{"a": "1"}, {"a": "2"}]) == [{"a": "1"}, {"a": "2"}]


def test_yaml_include_exclude_on_real_axes(tmp_path: Path) -> None:
    path = write(tmp_path, """
        axes:
          backbone: [r50, r101]
          loss: [l1, giou]
        exclude:
          - {backbone: r101, loss: giou}
        include:
          - {precision: amp}                    # not an axis: merged into every combination
          - {backbone: r50, schedule: 2x}       # merged into the two r50 combinations
          - {backbone: x101-32x4d}              # overwrites an axis value: a new cell
          - {backbone: r101, loss: l1, name: my-r101}
        profiles:
          p: {data: synthetic, compare: none, max_iters: 2, image_scale: [64, 48], images_per_gpu: 1,
              workers: 0, eval_max_images: 2, bench_images: 1, checkpoint_interval: 5, synth_images: 4, cells: []}
        """)
    spec = load_matrix(str(path))
    names = [c.name for c in spec.cells]
    assert names == ["faster-rcnn_r50_fpn_amp-2x_coco", "faster-rcnn_r50_fpn_giou_amp-2x_coco", "my-r101",
                     "faster-rcnn_x101-32x4d_fpn_1x_coco"]
    assert spec.cell("my-r101").axes["precision"] == "amp"
    assert spec.cell("faster-rcnn_x101-32x4d_fpn_1x_coco").axes["precision"] == "fp32"  # added, not merged
    assert all(c.section == NO_SECTION and c.published.box_ap is None for c in spec.cells)
    assert list(spec.profiles) == ["smoke", "ci", "hardware", "full", "p"]  # inherited + declared


def test_jan_2020_matrix_pairs_each_q5_row_with_its_published_numbers(spec: MatrixSpec) -> None:
    """matrices/faster_rcnn_jan2020.yaml: the five Jan-Feb 2020 rows (Q5) in their training-era recipe."""
    old = load_matrix("faster_rcnn_jan2020")
    q5 = [c for c in spec.cells if any(n.startswith("Q5") for n in resolve(dict(c.axes)).notes)]
    assert len(q5) == len(old.cells) == 5
    today_by_axes = {tuple(sorted({**c.axes, "era": "jan-2020"}.items())): c for c in q5}
    for then in old.cells:
        today = today_by_axes.pop(tuple(sorted(then.axes.items())))  # the same row, era aside
        assert today.axes["era"] == "current" and then.published == today.published
        assert resolve(dict(then.axes)).rpn.loss_bbox == "smooth_l1"
    assert old.profile("smoke") == spec.profile("smoke")  # inherited


def test_user_sweep_2x2_loads_and_inherits_profiles() -> None:
    spec = load_matrix(str(RESOURCES / "sweep_2x2.yaml"))
    assert spec.name == "sweep_2x2" and spec.title == "Backbone x box loss sweep" and spec.tables == ()
    assert [c.name for c in spec.cells] == [
        "faster-rcnn_r50_fpn_1x_coco", "faster-rcnn_r50_fpn_giou_1x_coco",
        "faster-rcnn_r101_fpn_1x_coco", "faster-rcnn_r101_fpn_giou_1x_coco"]
    bundled = load_matrix("faster_rcnn", matrices_dir=matrices_dir())
    assert set(spec.profiles) == set(bundled.profiles)
    assert spec.profile("ci").cells == () and len(spec.cells_for("ci")) == 4
    assert spec.profile("smoke").budget.max_iters == bundled.profile("smoke").budget.max_iters
    assert [c.name for c in spec.select(["*giou*"])] == ["faster-rcnn_r50_fpn_giou_1x_coco", "faster-rcnn_r101_fpn_giou_1x_coco"]


def test_user_profile_overrides_and_extends(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = write(tmp_path, """
        axes: {backbone: [r50]}
        profiles:
          smoke: {max_iters: 3}
          mine: {extends: full, data: data, max_iters: 100}
        """)
    spec = load_matrix(str(path))
    assert spec.profile("smoke").budget.max_iters == 3 and spec.profile("smoke").budget.image_scale == (160, 128)
    mine = spec.profile("mine")
    assert mine.compare == "published" and mine.data == str((tmp_path / "data").resolve()) and mine.budget.max_iters == 100
    assert mine.budget.log_interval == 50  # not set anywhere on the chain: mmdet's LoggerHook default


def test_profile_intervals_must_be_positive(tmp_path: Path) -> None:
    path = write(tmp_path, """
        axes: {backbone: [r50]}
        profiles:
          smoke: {log_interval: 0}
        """)
    with pytest.raises(UserError, match=r"profiles\.smoke\.log_interval"):
        load_matrix(str(path))
    path = write(tmp_path, """
        axes: {backbone: [r50]}
        profiles:
          smoke: {checkpoint_interval: null}
          ci: {checkpoint_interval: 0}
        """)
    with pytest.raises(UserError, match=r"profiles\.ci\.checkpoint_interval"):
        load_matrix(str(path))


def test_a_proposal_cap_per_neck(tmp_path: Path) -> None:
    path = write(tmp_path, """
        axes: {backbone: [r50]}
        profiles:
          smoke: {proposal_cap: {c4: 16, dc5: null}}
          mine: {extends: smoke, proposal_cap: 100}
        """)
    spec = load_matrix(str(path))
    budget = spec.profile("smoke").budget
    assert [budget.proposal_cap_for(n) for n in ("c4", "dc5", "fpn", None)] == [16, None, None, None]  # no default: uncapped
    assert [spec.profile("mine").budget.proposal_cap_for(n) for n in ("c4", "fpn")] == [100, 100]


def test_profile_jobs_is_a_positive_integer_or_auto(tmp_path: Path) -> None:
    path = write(tmp_path, """
        axes: {backbone: [r50]}
        profiles:
          smoke: {jobs: 3}
          mine: {extends: smoke, jobs: auto}
        """)
    spec = load_matrix(str(path))
    assert (spec.profile("smoke").jobs, spec.profile("mine").jobs, spec.profile("ci").jobs) == (3, "auto", 1)
    for bad in ("0", "many", "true"):
        path = write(tmp_path, f"""
            axes: {{backbone: [r50]}}
            profiles:
              smoke: {{jobs: {bad}}}
            """)
        with pytest.raises(UserError, match=r"field 'profiles\.smoke\.jobs': expected an integer >= 1 or 'auto'"):
            load_matrix(str(path))


# ------------------------------------------------------------------------------------------------
# Errors name the file, the cell, the field and the allowed values

BASE = "axes: {backbone: [r50]}\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("axes: {backbone: [r50]}\nrows: []\n", ["unknown key 'rows'", "allowed: title,"]),
        ("axes: {backbone: [r18]}\n", ["field 'axes.backbone'", "'r18'", "allowed: r50, r101, x101-32x4d"]),
        ("axes: {depth: [50]}\n", ["field 'axes'", "unknown axis 'depth'", "allowed: backbone, style"]),
        ("axes: {backbone: r50}\n", ["field 'axes.backbone'", "expected a list"]),
        (BASE + "include: [{backbone: x101-32x4d, style: caffe}]\n",
         ["cell 'faster-rcnn_x101-32x4d-caffe_fpn_1x_coco'", "field 'axes'", "impossible combination", "allowed: r50, r101"]),
        (BASE + "include: [{backbone: r101, name: dup}, {backbone: r50, loss: giou, name: dup}]\n",
         ["cell 'dup'", "same name"]),
        (BASE + "include: [{backbone: r101, colour: red}]\n", ["field 'include[0]'", "unknown key 'colour'", "allowed: backbone"]),
        (BASE + "exclude: [{loss: giou}]\n", ["field 'exclude[0]'", "unknown key 'loss'", "allowed: backbone"]),
        (BASE + "cells: {faster-rcnn_r50_fpn_2x_coco: {aliases: [x]}}\n",
         ["cell 'faster-rcnn_r50_fpn_2x_coco'", "does not produce", "did you mean: faster-rcnn_r50_fpn_1x_coco"]),
        (BASE + "cells: {faster-rcnn_r50_fpn_1x_coco: {weights: x}}\n",
         ["cell 'faster-rcnn_r50_fpn_1x_coco'", "unknown key 'weights'", "allowed: aliases, published"]),
        (BASE + "tables: [{id: t, heading: h, intro: '', columns: [Backbone, box AP], rows: "
                "[{cell: faster-rcnn_r50_fpn_9x_coco, labels: {Backbone: R-50}, printed: {box AP: '1'}}]}]\n",
         ["cell 'faster-rcnn_r50_fpn_9x_coco'", "field 'tables.t.rows[0].cell'", "unknown cell"]),
        (BASE + "tables: [{id: t, heading: h, intro: '', columns: [Backbone, box AP], rows: "
                "[{cell: faster-rcnn_r50_fpn_1x_coco, labels: {Backbone: R-50}, printed: {box AP: 'n/a'}}]}]\n",
         ["cell 'faster-rcnn_r50_fpn_1x_coco'", "'n/a' is not a number"]),
        (BASE + "tables: [{id: t, heading: h, intro: '', columns: [Backbone, box AP], rows: "
                "[{cell: faster-rcnn_r50_fpn_1x_coco, labels: {Style: x}, printed: {box AP: '1'}}]}]\n",
         ["unknown key 'Style'", "allowed: Backbone"]),
        (BASE + "profiles: {smoke: {max_iters: ten}}\n", ["field 'profiles.smoke.max_iters'", "expected an integer"]),
        (BASE + "profiles: {smoke: {compare: always}}\n", ["field 'profiles.smoke.compare'", "allowed: none, baselines, hardware, published"]),
        (BASE + "profiles: {new: {max_iters: 3}}\n", ["field 'profiles.new'", "missing fields", "allowed: data, compare"]),
        (BASE + "profiles: {x: {extends: nope}}\n", ["field 'profiles.x.extends'", "unknown profile 'nope'", "allowed: smoke, ci, hardware, full"]),
        (BASE + "profiles: {smoke: {cells: [r18*]}}\n", ["field 'profiles.smoke.cells'", "no cell matches 'r18*'"]),
        (BASE + "profiles: {smoke: {proposal_cap: {default: 48, c5: 24}}}\n",
         ["field 'profiles.smoke.proposal_cap'", "unknown key 'c5'", "allowed: default, fpn, c4, dc5"]),
        (BASE + "profiles: {smoke: {proposal_cap: {c4: 0}}}\n", ["field 'profiles.smoke.proposal_cap'", "expected an integer >= 1 or null"]),
        (BASE + "tolerances: {box_ap_pass: -1}\n", ["field 'tolerances.box_ap_pass'", "non-negative"]),
    ],
)
def test_bad_input_errors(tmp_path: Path, body: str, expected: list[str]) -> None:
    path = write(tmp_path, body)
    with pytest.raises(UserError) as err:
        load_matrix(str(path))
    msg = str(err.value)
    assert str(path.resolve()) in msg
    for part in expected:
        assert part in msg, (part, msg)


def test_published_must_agree_with_the_table(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + """
        cells:
          faster-rcnn_r50_fpn_1x_coco: {published: {box_ap: 37.5}}
        tables:
          - {id: t, heading: h, intro: '', columns: [Backbone, box AP, Config],
             rows: [{cell: faster-rcnn_r50_fpn_1x_coco, labels: {Backbone: R-50}, printed: {box AP: '37.4'}}]}
        """.replace("\n        ", "\n"))
    with pytest.raises(UserError, match="cell 'faster-rcnn_r50_fpn_1x_coco': field 'cells.published'"):
        load_matrix(str(path))


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "axes:\n  backbone: [r50\n  loss: [l1]\n")
    with pytest.raises(UserError) as err:
        load_matrix(str(path))
    msg = str(err.value)
    assert re.match(re.escape(str(path.resolve())) + r":\d+: invalid YAML: ", msg) and "\n" not in msg


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "cells:\n  faster-rcnn_r50_fpn_1x_coco: {aliases: [a]}\n  faster-rcnn_r50_fpn_1x_coco: {aliases: [b]}\n")
    with pytest.raises(UserError, match=re.escape(str(path.resolve())) + r":4: duplicate key 'faster-rcnn_r50_fpn_1x_coco'"):
        load_matrix(str(path))


def test_unknown_matrix_name_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown matrix 'retinanet'.*allowed: .*faster_rcnn"):
        load_matrix("retinanet")
    with pytest.raises(UserError, match=r"unknown matrix '\.\.'"):
        load_matrix("..", matrices_dir=tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_matrix(str(tmp_path / "nope.yaml"))
