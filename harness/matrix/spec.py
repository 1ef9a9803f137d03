"""Load a matrix YAML (`matrices/*.yaml`) into typed, validated, frozen objects.

The file format is documented at the top of `matrices/faster_rcnn.yaml`. In short: `axes` form a
Cartesian product, `exclude` removes combinations and `include` merges into or adds combinations
with GitHub Actions semantics (`expand_matrix`), `defaults` fill unset axes, every combination is a
`Cell` named by its include `name` or `naming.compose`, and `cells` / `tables` / `profiles` /
`tolerances` add metadata. Each cell is resolved with `detector.recipes.resolve` at load time so an
impossible combination fails here, with the file and the cell named. The parsing and validation
live in `harness.matrix.parse`; this module holds the types, the expansion rule and the lookups.

Profiles of a user matrix: a matrix without `profiles:` inherits smoke / ci / full from
`matrices/faster_rcnn.yaml` (their `cells` restriction dropped, so they run every cell of the user
matrix); a profile it does declare with one of those names (or with `extends: NAME`) only needs the
fields it changes. Profiles of the bundled matrix itself must be complete.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detector.api import DetectorConfig
from harness.errors import UserError
from harness.matrix import naming
from harness.metrics import METRICS, PublishedTolerances

DEFAULT_MATRIX = "faster_rcnn"
# Seed column header -> Published field (`harness.metrics`). "Config" and "Download" are derived from the cell.
METRIC_COLUMNS: dict[str, str] = {m.title: m.column for m in METRICS}
DERIVED_COLUMNS = ("Config", "Download")
NOT_PUBLISHED = ("-", "")  # how the seed prints a missing number
COMPARE_MODES = ("none", "baselines", "hardware", "published")
NO_SECTION = "cells"  # section of a cell that appears in no table


@dataclass(frozen=True, kw_only=True)
class Published:
    """Numbers of the seed; None where the table shows "-" or an empty cell. One field per
    `harness.metrics.METRICS` entry, named by its `column` (a test holds the two together)."""

    box_ap: float | None = None
    mem_gb: float | None = None
    fps: float | None = None


@dataclass(frozen=True, kw_only=True)
class Cell:
    name: str  # MMDetection v3 config name
    axes: dict[str, str]  # full axes (defaults filled), the input of detector.recipes.resolve
    aliases: tuple[str, ...]
    published: Published
    section: str  # id of the first table the cell appears in, else NO_SECTION
    download: str | None
    notes: tuple[str, ...] = ()
    log: str | None = None  # training log URL from the seed
    # The resolved recipe (`detector.recipes.resolve(axes)`), resolved once when the matrix loads.
    config: DetectorConfig = field(repr=False, compare=False)

    @property
    def epochs(self) -> int:
        """Real epochs of the recipe: `max_epochs x repeat_times` (ms-3x: 12 x 3 = 36, Q4)."""
        return self.config.schedule.max_epochs * self.config.schedule.repeat_times

    @property
    def recipe_notes(self) -> tuple[str, ...]:
        """The quirk notes (Q1, Q2, Q5, FP16 ...) of the resolved recipe, then the YAML's notes."""
        return tuple(dict.fromkeys((*self.config.notes, *self.notes)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (`harness list --format json`): name, section, axes, published, ..."""
        out = asdict(self)
        del out["config"]
        return out


@dataclass(frozen=True, kw_only=True)
class Row:
    cell: str
    labels: dict[str, str]  # the seed's descriptive columns, e.g. {"Backbone": "R-50-C4", "Style": "caffe"}
    published: Published  # as printed in this row
    printed: dict[str, str] = field(default_factory=dict)  # metric column -> text exactly as printed ("-", "", "3.8")
    links: dict[str, str] = field(default_factory=dict)  # label column -> config stem its text links to


@dataclass(frozen=True, kw_only=True)
class Table:
    id: str
    heading: str
    intro: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]


@dataclass(frozen=True, kw_only=True)
class Budget:
    """How much of its recipe a run does and what it measures: the one budget type of a profile, of
    a regression check (`matrices/baselines/`) and, through `execute.plan.run_config`, of a RunConfig.
    None means the recipe's own (all its epochs, its image scale, every val image, its RoI counts)."""

    max_iters: int | None = None
    image_scale: tuple[int, int] | None = None  # (long, short)
    eval_max_images: int | None = None
    # Iterations between loss lines in log.jsonl (mmdet's LoggerHook default 50); the toy profiles
    # train a few iterations, so they log every one or their loss curves would be a single point.
    log_interval: int = 50
    warmup_iters: int | None = None  # None: the recipe's 500, capped at a third of max_iters
    # Caps RPN / RoI counts for toy budgets (a recorded deviation): one count for every cell, or one per
    # value of the `neck` axis with "default" for the rest (C4's res5 head runs once per RoI).
    proposal_cap: int | Mapping[str, int | None] | None = None
    checkpoint_interval: int | None = 1000  # None: no checkpoints (toy profiles re-run in seconds)
    bench_images: int = 0  # fps over this many images after training; 0: no fps measurement

    def proposal_cap_for(self, neck: str | None) -> int | None:
        """The proposal cap of a cell with this `neck` axis value."""
        cap = self.proposal_cap
        if isinstance(cap, Mapping):
            return cap[neck] if neck is not None and neck in cap else cap.get("default")
        return cap


# The limits of each budget field, written once: (minimum, may be null). The matrix's profiles and
# the baselines file are both checked against them.
BUDGET_LIMITS: dict[str, tuple[int, bool]] = {
    "max_iters": (1, True), "image_scale": (32, True), "eval_max_images": (1, True), "log_interval": (1, False),
    "warmup_iters": (0, True), "proposal_cap": (1, True), "checkpoint_interval": (1, True), "bench_images": (0, False),
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Profile:
    name: str
    data: str  # "synthetic", "none" (--data required) or an absolute path
    compare: str  # one of COMPARE_MODES
    budget: Budget
    images_per_gpu: int
    workers: int
    synth_images: int
    # Synthetic images' (width, height); None: the generator's default 320 x 240. The hardware profile
    # asks for the recipe's largest image (1333 x 800): both images of a batch then pad to 1344 x 800.
    synth_size: tuple[int, int] | None = None
    # fps with detections like a trained model's (random weights detect next to nothing): the
    # classifier bias of two classes is raised after evaluation, as `detector.bench.pair` does.
    bench_detections: bool = False
    # torchvision's R-50-FPN peak memory on the same image size, measured in the R-50-FPN cells'
    # processes on CUDA (the hardware page's "Framework" line).
    framework_memory: bool = False
    # Cells in flight at once when `--jobs` is not given: an integer, or "auto" (`execute.resources.resolve_jobs`:
    # one cell per CPU core on the local executor; 1 on CUDA, where cells would share the GPU they time).
    jobs: int | str = 1
    cells: tuple[str, ...]  # globs restricting the cells of this profile; () = all

    def data_root(self, override: str | Path | None = None) -> str:
        """The dataset to use: `--data` if given, else the profile's ("synthetic" or a path)."""
        if override is not None:
            return str(override)
        if self.data == "none":
            raise UserError(f"profile {self.name} needs --data ROOT (a COCO-2017-style root)")
        return self.data


@dataclass(frozen=True, kw_only=True)
class MatrixSpec:
    name: str
    path: Path
    title: str
    cells: tuple[Cell, ...]  # tables' order first, then the remaining combinations in expansion order
    tables: tuple[Table, ...]
    profiles: dict[str, Profile]
    tolerances: PublishedTolerances
    paper_title: str = ""
    paper_url: str = ""
    source: str = ""

    @property
    def aliases(self) -> dict[str, str]:
        """alias -> cell name, cell names included (mapping to themselves)."""
        table = {alias: c.name for c in self.cells for alias in c.aliases}
        table.update({c.name: c.name for c in self.cells})
        return table

    def cell(self, name_or_alias: str) -> Cell:
        name = naming.canonical(name_or_alias, self.aliases)
        for c in self.cells:
            if c.name == name:
                return c
        raise UserError(f"{self.path}: unknown cell {name_or_alias!r}{self._suggest(name_or_alias)}")

    def select(self, patterns: Sequence[str] = ()) -> list[Cell]:
        """Cells matching any pattern (exact names, aliases, fnmatch globs), in matrix order; () = all."""
        if isinstance(patterns, str):
            patterns = (patterns,)
        if not patterns:
            return list(self.cells)
        aliases = self.aliases
        chosen: set[str] = set()
        for pattern in patterns:
            hits = {naming.canonical(pattern, aliases)} & set(aliases.values())
            if not hits and any(ch in pattern for ch in "*?["):
                hits = {cell for key, cell in aliases.items() if fnmatch.fnmatchcase(key, pattern)}
            if not hits:
                raise UserError(f"{self.path}: no cell matches {pattern!r}{self._suggest(pattern)}")
            chosen |= hits
        return [c for c in self.cells if c.name in chosen]

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise UserError(f"{self.path}: unknown profile {name!r}; allowed: {', '.join(self.profiles)}")
        return self.profiles[name]

    def cells_for(self, profile: str | Profile, only: Sequence[str] = ()) -> list[Cell]:
        """Cells a run of `profile` covers: the profile's restriction, then `--only` patterns."""
        prof = self.profile(profile) if isinstance(profile, str) else profile
        allowed = {c.name for c in self.select(prof.cells)}
        return [c for c in self.select(only) if c.name in allowed]

    def table(self, table_id: str) -> Table:
        for t in self.tables:
            if t.id == table_id:
                return t
        raise UserError(f"{self.path}: unknown table {table_id!r}; allowed: {', '.join(t.id for t in self.tables)}")

    def _suggest(self, pattern: str) -> str:
        keys = list(self.aliases)
        loose = f"*{pattern.strip('*')}*"
        if any(ch in pattern for ch in "*?[") and any(fnmatch.fnmatchcase(k, loose) for k in keys):
            return f"; globs match whole names: did you mean {loose!r}?"
        stripped = naming.strip_artifact(pattern.replace("*", "").replace("?", ""))
        close = difflib.get_close_matches(stripped, keys, n=3, cutoff=0.4)
        names = list(dict.fromkeys(self.aliases[k] for k in close))
        if names:
            return f"; did you mean: {', '.join(names)}?"
        return f"; cells: {', '.join(c.name for c in self.cells[:5])}{' ...' if len(self.cells) > 5 else ''}"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def matrices_dir() -> Path:
    return repo_root() / "matrices"


def expand_matrix(axes: Mapping[str, Sequence[str]], include: Sequence[Mapping[str, str]] = (),
                  exclude: Sequence[Mapping[str, str]] = ()) -> list[dict[str, str]]:
    """GitHub Actions matrix expansion.

    The product of `axes` (first axis slowest), minus combinations matching every key of an
    `exclude` entry; then each `include` entry is merged into every remaining product combination
    whose *original* values it does not contradict (values added by earlier includes may be
    overwritten); an entry merged nowhere is appended as a new combination (never merged into).
    """
    keys = list(axes)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))] if keys else []
    combos = [c for c in combos if not any(all(c.get(k) == v for k, v in ex.items()) for ex in exclude)]
    originals = [dict(c) for c in combos]
    added: list[dict[str, str]] = []
    for entry in include:
        merged = False
        for combo, original in zip(combos, originals):
            if all(original[k] == v for k, v in entry.items() if k in original):
                combo.update(entry)
                merged = True
        if not merged:
            added.append(dict(entry))
    return combos + added


__all__ = ["BUDGET_LIMITS", "Budget", "Cell", "MatrixSpec", "Profile", "Published", "Row", "Table", "PublishedTolerances", "expand_matrix",
           "matrices_dir", "repo_root"]
