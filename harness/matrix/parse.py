"""Parse and validate a matrix YAML into `harness.matrix.spec` objects (the format: `matrices/faster_rcnn.yaml`).

Every mistake is a `UserError` of the form `FILE: cell 'X': field 'Y': problem; allowed: ...`.
Each cell is resolved with `detector.recipes.resolve` here, so an impossible combination fails at
load time. Profiles of a user matrix inherit from the bundled matrix (see `harness.matrix.spec`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import yaml

from detector.api import AXES, DEFAULT_AXES, ConfigError, DetectorConfig, resolve
from harness.errors import UserError
from harness.matrix import naming
from harness.matrix.spec import (
    BUDGET_LIMITS,
    COMPARE_MODES,
    DEFAULT_MATRIX,
    DERIVED_COLUMNS,
    METRIC_COLUMNS,
    NO_SECTION,
    NOT_PUBLISHED,
    Budget,
    Cell,
    MatrixSpec,
    Profile,
    Published,
    PublishedTolerances,
    Row,
    Table,
    expand_matrix,
    matrices_dir,
)
from harness.metrics import METRICS

_TOP_KEYS = ("title", "paper", "source", "defaults", "axes", "include", "exclude", "cells", "tables", "profiles", "tolerances")
_CELL_KEYS = ("aliases", "published", "download", "log", "notes")
_TABLE_KEYS = ("id", "heading", "intro", "columns", "rows")
_ROW_KEYS = ("cell", "labels", "printed", "links")
_PUBLISHED_KEYS = tuple(m.column for m in METRICS)
# A profile's YAML is flat: its budget fields (`Budget`, limits in `BUDGET_LIMITS`) beside the rest.
_BUDGET_FIELDS = tuple(f.name for f in fields(Budget))
_PROFILE_FIELDS = ("data", "compare", *_BUDGET_FIELDS, "images_per_gpu", "workers", "synth_images", "synth_size",
                   "bench_detections", "framework_memory", "jobs", "cells")
_OPTIONAL_PROFILE_FIELDS = {"proposal_cap": None, "log_interval": 50, "warmup_iters": None, "synth_size": None,
                            "bench_detections": False, "framework_memory": False, "jobs": 1}


class _Ctx:
    """Formats every error as `FILE: cell 'X': field 'Y': problem; allowed: ...`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, msg: str, *, cell: str | None = None, field: str | None = None,
             allowed: Sequence[Any] | None = None) -> NoReturn:
        where = [str(self.path)] + ([f"cell {cell!r}"] if cell else []) + ([f"field {field!r}"] if field else [])
        tail = f"; allowed: {', '.join(str(a) for a in allowed)}" if allowed is not None else ""
        raise UserError(f"{': '.join(where)}: {msg}{tail}")

    def mapping(self, value: Any, field: str, keys: Sequence[str] | None = None, *, cell: str | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(f"expected a mapping, got {type(value).__name__}", cell=cell, field=field)
        for key in value:
            if keys is not None and key not in keys:
                self.fail(f"unknown key {key!r}", cell=cell, field=field, allowed=keys)
        return value

    def seq(self, value: Any, field: str, *, cell: str | None = None) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(f"expected a list, got {type(value).__name__}", cell=cell, field=field)
        return value

    def text(self, value: Any, field: str, *, cell: str | None = None, optional: bool = False) -> str:
        if value is None and optional:
            return ""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail(f"expected a string, got {type(value).__name__}", cell=cell, field=field)
        return str(value)

    def axis_value(self, axis: str, value: Any, field: str, *, cell: str | None = None) -> str:
        if axis not in AXES:
            self.fail(f"unknown axis {axis!r}", cell=cell, field=field, allowed=list(AXES))
        text = self.text(value, f"{field}.{axis}", cell=cell)
        if text not in AXES[axis]:
            self.fail(f"{text!r} is not a value of axis {axis!r}", cell=cell, field=f"{field}.{axis}", allowed=AXES[axis])
        return text


def parse(path: Path) -> MatrixSpec:
    """Load and validate one matrix file (an absolute path)."""
    ctx = _Ctx(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
        _check_duplicate_keys(ctx, yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}{line}: invalid YAML: {problem}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    top = ctx.mapping(raw, "(top level)", _TOP_KEYS)
    defaults = {**DEFAULT_AXES, **{k: ctx.axis_value(k, v, "defaults") for k, v in ctx.mapping(top.get("defaults"), "defaults").items()}}
    axes: dict[str, list[str]] = {}
    for axis, values in ctx.mapping(top.get("axes"), "axes").items():
        vals = [ctx.axis_value(axis, v, "axes") for v in ctx.seq(values, f"axes.{axis}")]
        if not vals or len(set(vals)) != len(vals):
            ctx.fail("needs a non-empty list of distinct values", field=f"axes.{axis}", allowed=AXES.get(axis, ()))
        axes[axis] = vals
    include = [_entry(ctx, e, i, "include", list(AXES) + ["name"]) for i, e in enumerate(ctx.seq(top.get("include"), "include"))]
    exclude = [_entry(ctx, e, i, "exclude", list(axes)) for i, e in enumerate(ctx.seq(top.get("exclude"), "exclude"))]
    combos = expand_matrix(axes, include, exclude)
    if not combos:
        ctx.fail("the matrix has no cells (empty axes and include, or everything excluded)", field="axes")

    full: dict[str, dict[str, str]] = {}
    configs: dict[str, DetectorConfig] = {}
    for combo in combos:
        explicit = combo.pop("name", None)
        axes_full = {axis: combo.get(axis, defaults[axis]) for axis in AXES}
        name = explicit or naming.compose(axes_full)
        if not naming.is_safe_name(name):
            ctx.fail("a cell name may only use letters, digits, '.', '_' and '-'", cell=name, field="include.name")
        if name in full:
            ctx.fail(f"two combinations have the same name (axes {full[name]} and {axes_full}); give one an explicit name", cell=name, field="include")
        for other, other_axes in full.items():
            if other_axes == axes_full:
                ctx.fail(f"same axes as cell {other!r}: a cell shown twice must be referenced twice in tables, not declared twice", cell=name, field="include")
        try:
            configs[name] = resolve(axes_full, name=name)
        except ConfigError as exc:
            ctx.fail(f"impossible combination: {exc}", cell=name, field="axes")
        full[name] = axes_full

    metas = ctx.mapping(top.get("cells"), "cells")
    for name in metas:
        if name not in full:
            ctx.fail(f"`cells` describes a cell the matrix does not produce{_close(name, full)}", cell=str(name), field="cells")
    tables = tuple(_table(ctx, t, i, full) for i, t in enumerate(ctx.seq(top.get("tables"), "tables")))
    ids = [t.id for t in tables]
    if len(set(ids)) != len(ids):
        ctx.fail(f"duplicate table ids in {ids}", field="tables")
    first_row: dict[str, tuple[str, Row]] = {}
    for t in tables:
        for row in t.rows:
            first_row.setdefault(row.cell, (t.id, row))
    ordered = list(first_row) + [n for n in full if n not in first_row]
    cells = tuple(_cell(ctx, n, full[n], configs[n], metas.get(n), first_row.get(n)) for n in ordered)
    owner: dict[str, str] = {n: n for n in full}
    for c in cells:
        for alias in c.aliases:
            if owner.setdefault(alias, c.name) != c.name:
                ctx.fail(f"alias {alias!r} already names cell {owner[alias]!r}", cell=c.name, field="cells.aliases")

    paper = ctx.mapping(top.get("paper"), "paper", ("title", "url"))
    spec = MatrixSpec(
        name=path.stem, path=path, title=ctx.text(top.get("title", path.stem), "title"), cells=cells, tables=tables,
        profiles={}, tolerances=_tolerances(ctx, top.get("tolerances")),
        paper_title=ctx.text(paper.get("title"), "paper.title", optional=True),
        paper_url=ctx.text(paper.get("url"), "paper.url", optional=True),
        source=ctx.text(top.get("source"), "source", optional=True),
    )
    profiles = _profiles(ctx, top.get("profiles"), _inherited_profiles(path))
    for prof in profiles.values():
        try:
            spec.select(prof.cells)
        except UserError as exc:
            ctx.fail(str(exc).split(": ", 1)[-1], field=f"profiles.{prof.name}.cells")
    return replace(spec, profiles=profiles)


def _check_duplicate_keys(ctx: _Ctx, node: yaml.Node | None) -> None:
    """yaml.safe_load keeps the last of two equal keys silently; a repeated cell name must fail."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise UserError(f"{ctx.path}:{key.start_mark.line + 1}: duplicate key {key.value!r}")
                seen.add(key.value)
            _check_duplicate_keys(ctx, value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(ctx, item)


def _entry(ctx: _Ctx, raw: Any, index: int, field: str, keys: Sequence[str]) -> dict[str, str]:
    entry = ctx.mapping(raw, f"{field}[{index}]", keys)
    if not entry:
        ctx.fail("an empty entry", field=f"{field}[{index}]")
    out = {}
    for key, value in entry.items():
        out[key] = ctx.text(value, f"{field}[{index}].name") if key == "name" else ctx.axis_value(key, value, f"{field}[{index}]")
    return out


def _close(name: Any, names: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(name), list(names), n=3, cutoff=0.4)
    return f"; did you mean: {', '.join(close)}?" if close else ""


def _number(ctx: _Ctx, text: str, *, cell: str, field: str) -> float | None:
    if text.strip() in NOT_PUBLISHED:
        return None
    try:
        return float(text)
    except ValueError:
        ctx.fail(f"{text!r} is not a number", cell=cell, field=field, allowed=["a number", "'-'", "''"])


def _table(ctx: _Ctx, raw: Any, index: int, cells: Mapping[str, Any]) -> Table:
    t = ctx.mapping(raw, f"tables[{index}]", _TABLE_KEYS)
    tid = ctx.text(t.get("id"), f"tables[{index}].id")
    where = f"tables.{tid}"
    columns = tuple(ctx.text(c, f"{where}.columns") for c in ctx.seq(t.get("columns"), f"{where}.columns"))
    metric_cols = [c for c in columns if c in METRIC_COLUMNS]
    label_cols = [c for c in columns if c not in METRIC_COLUMNS and c not in DERIVED_COLUMNS]
    rows = []
    for r_index, r_raw in enumerate(ctx.seq(t.get("rows"), f"{where}.rows")):
        r = ctx.mapping(r_raw, f"{where}.rows[{r_index}]", _ROW_KEYS)
        cell = ctx.text(r.get("cell"), f"{where}.rows[{r_index}].cell")
        if cell not in cells:
            ctx.fail(f"the row references an unknown cell{_close(cell, cells)}", cell=cell, field=f"{where}.rows[{r_index}].cell")
        labels = {ctx.text(k, f"{where}.labels"): ctx.text(v, f"{where}.labels.{k}", cell=cell)
                  for k, v in ctx.mapping(r.get("labels"), f"{where}.rows[{r_index}].labels", label_cols, cell=cell).items()}
        printed = {k: ctx.text(v, f"{where}.printed.{k}", cell=cell, optional=True)
                   for k, v in ctx.mapping(r.get("printed"), f"{where}.rows[{r_index}].printed", metric_cols, cell=cell).items()}
        for got, want, what in ((labels, label_cols, "labels"), (printed, metric_cols, "printed")):
            if set(got) != set(want):
                ctx.fail(f"missing columns {sorted(set(want) - set(got))}", cell=cell, field=f"{where}.rows[{r_index}].{what}", allowed=want)
        links = {k: ctx.text(v, f"{where}.links.{k}", cell=cell)
                 for k, v in ctx.mapping(r.get("links"), f"{where}.rows[{r_index}].links", label_cols, cell=cell).items()}
        for target in links.values():
            if target not in cells:
                ctx.fail(f"link to an unknown cell {target!r}{_close(target, cells)}", cell=cell, field=f"{where}.rows[{r_index}].links")
        numbers = {METRIC_COLUMNS[k]: _number(ctx, v, cell=cell, field=f"{where}.printed.{k}") for k, v in printed.items()}
        rows.append(Row(cell=cell, labels=labels, published=Published(**numbers), printed=printed, links=links))
    return Table(id=tid, heading=ctx.text(t.get("heading"), f"{where}.heading", optional=True),
                 intro=ctx.text(t.get("intro"), f"{where}.intro", optional=True), columns=columns, rows=tuple(rows))


def _cell(ctx: _Ctx, name: str, axes: dict[str, str], config: DetectorConfig, raw: Any, first: tuple[str, Row] | None) -> Cell:
    meta = ctx.mapping(raw, f"cells.{name}", _CELL_KEYS, cell=name)
    aliases = tuple(ctx.text(a, "cells.aliases", cell=name) for a in ctx.seq(meta.get("aliases"), "cells.aliases", cell=name))
    notes = tuple(ctx.text(n, "cells.notes", cell=name) for n in ctx.seq(meta.get("notes"), "cells.notes", cell=name))
    published = first[1].published if first else Published()
    if "published" in meta:
        given = ctx.mapping(meta["published"], "cells.published", _PUBLISHED_KEYS, cell=name)
        values: dict[str, float | None] = {}
        for key, value in given.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                ctx.fail(f"expected a number or null, got {value!r}", cell=name, field=f"cells.published.{key}")
            values[key] = None if value is None else float(value)
        if first and Published(**values) != published:
            ctx.fail(f"{values} disagrees with the first table row {published}", cell=name, field="cells.published")
        published = Published(**values)
    return Cell(name=name, axes=axes, config=config, aliases=aliases, published=published, section=first[0] if first else NO_SECTION,
                download=ctx.text(meta.get("download"), "cells.download", cell=name, optional=True) or None,
                log=ctx.text(meta.get("log"), "cells.log", cell=name, optional=True) or None, notes=notes)


def _tolerances(ctx: _Ctx, raw: Any) -> PublishedTolerances:
    values = {}
    for key, value in ctx.mapping(raw, "tolerances", ("box_ap_pass", "box_ap_warn", "mem_rel")).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            ctx.fail(f"expected a non-negative number, got {value!r}", field=f"tolerances.{key}")
        values[key] = float(value)
    tol = PublishedTolerances(**values)
    if tol.box_ap_warn < tol.box_ap_pass:
        ctx.fail("box_ap_warn must be >= box_ap_pass", field="tolerances")
    return tol


@lru_cache(maxsize=4)
def _bundled_profiles(path: Path) -> dict[str, Profile]:
    spec = parse(path)
    return {name: _replace_cells(p) for name, p in spec.profiles.items()}


def _replace_cells(p: Profile) -> Profile:
    return replace(p, cells=())


def _flat(p: Profile) -> dict[str, Any]:
    """A profile's fields as its YAML writes them (the budget's beside the rest), for `extends`."""
    return {**{f: getattr(p.budget, f) for f in _BUDGET_FIELDS}, **{f: getattr(p, f) for f in _PROFILE_FIELDS if f not in _BUDGET_FIELDS}}


def _profile(name: str, flat: dict[str, Any]) -> Profile:
    budget = Budget(**{f: flat[f] for f in _BUDGET_FIELDS})
    return Profile(name=name, budget=budget, **{k: v for k, v in flat.items() if k not in _BUDGET_FIELDS})


def _inherited_profiles(path: Path) -> dict[str, Profile]:
    bundled = (matrices_dir() / f"{DEFAULT_MATRIX}.yaml").resolve()
    if path == bundled or not bundled.is_file():
        return {}
    return _bundled_profiles(bundled)


def _profiles(ctx: _Ctx, raw: Any, inherited: dict[str, Profile]) -> dict[str, Profile]:
    declared = ctx.mapping(raw, "profiles")
    if not declared and not inherited:
        ctx.fail("no profiles declared", field="profiles", allowed=list(_PROFILE_FIELDS))
    out = dict(inherited)
    for name, body in declared.items():
        name = str(name)
        if not naming.is_safe_name(name):
            ctx.fail("a profile name may only use letters, digits, '.', '_' and '-'", field=f"profiles.{name}")
        fields = dict(ctx.mapping(body, f"profiles.{name}", (*_PROFILE_FIELDS, "extends")))
        parent_name = fields.pop("extends", name if name in out else None)  # `out` holds inherited ones too
        parent = out.get(str(parent_name)) if parent_name is not None else None
        if parent_name is not None and parent is None:
            ctx.fail(f"extends unknown profile {parent_name!r}", field=f"profiles.{name}.extends", allowed=list(out))
        base = _flat(parent) if parent else {}
        missing = [f for f in _PROFILE_FIELDS if f not in fields and f not in base and f not in _OPTIONAL_PROFILE_FIELDS]
        if missing:
            ctx.fail(f"missing fields {missing}", field=f"profiles.{name}", allowed=list(_PROFILE_FIELDS))
        merged = {**_OPTIONAL_PROFILE_FIELDS, **base, **{k: _profile_field(ctx, name, k, v) for k, v in fields.items()}}
        out[name] = _profile(name, merged)
    return out


def _profile_field(ctx: _Ctx, profile: str, key: str, value: Any) -> Any:
    where = f"profiles.{profile}.{key}"

    def integer(v: Any, minimum: int, nullable: bool) -> int | None:
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            ctx.fail(f"expected an integer >= {minimum}{' or null' if nullable else ''}, got {v!r}", field=where)
        return v

    if key == "data":
        text = "none" if value is None else ctx.text(value, where)
        if text in ("synthetic", "none"):
            return text
        return str((ctx.path.parent / Path(text).expanduser()).resolve())  # relative to the YAML file
    if key == "compare":
        text = ctx.text(value, where)
        if text not in COMPARE_MODES:
            ctx.fail(f"{text!r} is not a comparison mode", field=where, allowed=COMPARE_MODES)
        return text
    if key in ("bench_detections", "framework_memory"):
        if not isinstance(value, bool):
            ctx.fail(f"expected true or false, got {value!r}", field=where)
        return value
    if key in ("image_scale", "synth_size"):
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != 2:
            ctx.fail(f"expected [{'long, short' if key == 'image_scale' else 'width, height'}] or null, got {value!r}", field=where)
        low = 64 if key == "synth_size" else BUDGET_LIMITS[key][0]
        return (integer(value[0], low, False), integer(value[1], low, False))
    if key == "cells":
        return tuple(ctx.text(v, where) for v in ctx.seq(value, where))
    if key == "jobs":
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            ctx.fail(f"expected an integer >= 1 or 'auto', got {value!r}", field=where)
        return value
    minimum, nullable = BUDGET_LIMITS.get(key, ({"images_per_gpu": 1}.get(key, 0), False))
    if key == "proposal_cap" and isinstance(value, dict):  # one cap per value of the neck axis
        allowed = ("default", *AXES["neck"])
        for neck in value:
            if neck not in allowed:
                ctx.fail(f"unknown key {neck!r}: a value of the neck axis, or default", field=where, allowed=allowed)
        return {str(neck): integer(cap, minimum, nullable=True) for neck, cap in value.items()}
    return integer(value, minimum, nullable=nullable)


def load_matrix(name_or_path: str | Path, *, matrices_dir: Path | None = None) -> MatrixSpec:
    """Load `matrices/<name>.yaml` (a bare name) or a YAML file path; every error is a UserError."""
    return parse(_find(str(name_or_path), matrices_dir).resolve())


def _find(name_or_path: str, directory: Path | None) -> Path:
    base = directory if directory is not None else matrices_dir()
    looks_like_path = "/" in name_or_path or "\\" in name_or_path or name_or_path.endswith((".yaml", ".yml"))
    if looks_like_path or Path(name_or_path).is_file():
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"matrix file {name_or_path!r} does not exist")
        return path
    path = base / f"{name_or_path}.yaml"
    if not naming.is_safe_name(name_or_path) or not path.is_file():
        available = sorted(p.stem for p in base.glob("*.yaml")) if base.is_dir() else []
        raise UserError(f"unknown matrix {name_or_path!r} (looked in {base}); allowed: {', '.join(available) or 'none'} or a path to a YAML file")
    return path


