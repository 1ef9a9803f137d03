"""The metrics the harness compares with the published table: one entry each, in one table.

An entry says everything the rest of the harness needs to know about a metric: its key (the verdict
and scope name), the column it has in the collect / compare frames and the `Published` field of the
same name, the `metrics.json` field it is read from, its title in the seed table and on the
terminal, how a cell's seeds are reduced, the column that says whether a number is comparable at
all, and its verdict rule with the reason text. `matrix` (seed columns), `results.collect` (one row
per run), `results.verdicts.judge` (the verdicts), `results.compare` (seeds -> cell), the page, the
metafile and `harness list` iterate `METRICS`; a new metric is a new entry here.

Rules (DESIGN.md "What the numbers mean"; ecosystem_anchors.md section 5):
- box AP: |delta| <= 0.2 pass, <= 0.3 warn, more fail. With K seeds the rule is applied to the 95%
  Student-t interval of the mean: pass if the whole interval lies inside the pass band around the
  published value, fail if it lies entirely outside the warn band, warn otherwise. A single run is
  the degenerate interval [x, x], so both cases are one rule.
- Mem (GB), one-sided: more than 10% (relative) above the published Mem fails, at or below (however
  far below) passes; the relative difference is always shown. A modern stack uses far less than
  PyTorch 1.x did, which is not a regression (issue 13 changed DESIGN's two-sided rule). Only
  `cuda_max_allocated` is comparable (a CPU peak RSS measures something else).
- fps: only on the published device class (V100, reference section 2.2); within 15% pass, else warn
  (never fail: fps is indicative only, reference Q7).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["pass", "warn", "fail", "not comparable", "not run"]

# The published Mem / fps were measured on V100s (reference sections 2.1, 2.2; metafile `hardware`).
PUBLISHED_DEVICE_CLASS = "V100"
COMPARABLE_MEM_KIND = "cuda_max_allocated"
# fps tolerance: +-10-15% relative on the same hardware (ecosystem_anchors.md section 5).
FPS_REL = 0.15
# Published numbers carry one decimal; 37.6 - 37.4 is 0.2000000000000028 in floating point.
EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class PublishedTolerances:
    """A matrix's `tolerances:` block: the AP bands (percentage points) and the Mem limit (relative)."""

    box_ap_pass: float = 0.2
    box_ap_warn: float = 0.3
    mem_rel: float = 0.10


@dataclass(frozen=True, kw_only=True)
class Measured:
    """A cell's (or one run's) value of a metric: the mean, and for interval metrics the 95% interval.

    `context` is the value of the metric's comparability column (`mem_kind`, `device_class`).
    """

    mean: float | None
    low: float | None = None
    high: float | None = None
    context: str | None = None


# (measured, published, tolerances) -> (verdict, reason or None when nothing needs explaining)
Rule = Callable[[Measured, "float | None", PublishedTolerances], "tuple[Verdict, str | None]"]


@dataclass(frozen=True, kw_only=True)
class Metric:
    key: str  # verdict / scope name: "box_ap", "mem", "fps"
    column: str  # frame column and `Published` field: "box_ap", "mem_gb", "fps"
    field: str  # metrics.json field
    title: str  # the seed table's column title
    label: str  # the terminal tables' column title
    short: str  # its name in prose
    seeds: Literal["interval", "mean"]  # how a cell's seeds are reduced
    context: str | None  # frame column that says whether the number is comparable ...
    comparable: str | None  # ... when it holds this value
    mark: str  # printed beside a measured number that is not comparable (explained under the tables)
    verdict_column: str  # the compare frame's column for this metric's verdict
    rule: Rule

    @property
    def published_column(self) -> str:
        return f"published_{self.column}"

    def mark_for(self, value: object, context: object) -> str:
        """`mark` when a measured `value` is there but its `context` makes it not comparable."""
        return self.mark if self.context and finite(value) and context != self.comparable else ""


def ap_verdict(low: float, high: float, published: float, *, pass_band: float, warn_band: float) -> Verdict:
    """Verdict of the AP interval [low, high] against `published` (percentage points)."""
    if low + EPS >= published - pass_band and high - EPS <= published + pass_band:
        # Both ends within the pass band (the EPS lets a printed 0.2 count as 0.2).
        return "pass"
    if high < published - warn_band - EPS or low > published + warn_band + EPS:
        return "fail"
    return "warn"


def _box_ap_rule(m: Measured, published: float | None, tol: PublishedTolerances) -> tuple[Verdict, str | None]:
    if m.low is None or m.high is None or _nan(m.low):
        # Only finished runs are judged: one that finished without an AP did not do its job.
        return "fail", "the run finished without a box AP"
    if published is None:
        return "not comparable", "no published box AP"
    verdict = ap_verdict(m.low, m.high, published, pass_band=tol.box_ap_pass, warn_band=tol.box_ap_warn)
    return verdict, None if verdict == "pass" else f"box AP off the published {published} by more than {tol.box_ap_pass}"


def mem_change_verdict(d: float, *, rel: float) -> Verdict:
    """The Mem rule on a relative change `d` from the reference: one-sided, since using less memory
    than the reference (PyTorch 1.x's published Mem, or earlier runs) is not a regression."""
    return "pass" if d <= rel + EPS else "fail"


def fps_change_verdict(d: float) -> Verdict:
    """The fps rule on a relative change `d`: within `FPS_REL` either way passes, beyond only warns
    (speed is indicative)."""
    return "pass" if abs(d) <= FPS_REL + EPS else "warn"


def mem_verdict(measured: float | None, mem_kind: str | None, published: float | None, *, rel: float) -> tuple[Verdict, str]:
    """Verdict and reason for a training-memory number (GB)."""
    if measured is None or _nan(measured):
        return "not run", "no memory measured"
    if published is None:
        return "not comparable", "no published Mem"
    if mem_kind != COMPARABLE_MEM_KIND:
        return "not comparable", f"Mem is {mem_kind or 'unknown'}, the published one is CUDA max_memory_allocated"
    d = (measured - published) / published
    if mem_change_verdict(d, rel=rel) == "pass":
        return "pass", f"Mem {d:+.0%}"
    return "fail", f"Mem {d:+.0%} (more than {rel:.0%} above the published)"


def fps_verdict(measured: float | None, device_class: str | None, published: float | None) -> tuple[Verdict, str]:
    """Verdict and reason for an inference-speed number (images / s)."""
    if measured is None or _nan(measured) or measured <= 0:
        return "not run", "no fps measured"
    if published is None:
        return "not comparable", "no published fps"
    if device_class != PUBLISHED_DEVICE_CLASS:
        return "not comparable", f"fps on {device_class or 'unknown device'}, published on {PUBLISHED_DEVICE_CLASS}"
    d = (measured - published) / published
    if fps_change_verdict(d) == "pass":
        return "pass", f"fps {d:+.0%}"
    return "warn", f"fps {d:+.0%} (indicative, tolerance {FPS_REL:.0%})"


def _mem_rule(m: Measured, published: float | None, tol: PublishedTolerances) -> tuple[Verdict, str | None]:
    verdict, reason = mem_verdict(m.mean, m.context, published, rel=tol.mem_rel)
    return verdict, reason if verdict != "pass" and published is not None else None  # unpublished: nothing to explain


def _fps_rule(m: Measured, published: float | None, tol: PublishedTolerances) -> tuple[Verdict, str | None]:
    verdict, reason = fps_verdict(m.mean, m.context, published)
    return verdict, reason if verdict != "pass" and published is not None else None


# In the order verdicts are judged and their reasons given (the seed table has its own column order).
METRICS: tuple[Metric, ...] = (
    Metric(key="box_ap", column="box_ap", field="box_ap", title="box AP", label="box AP", short="box AP", seeds="interval",
           context=None, comparable=None, mark="", verdict_column="ap_verdict", rule=_box_ap_rule),
    Metric(key="mem", column="mem_gb", field="mem_gb", title="Mem (GB)", label="Mem (GB)", short="Mem", seeds="mean",
           context="mem_kind", comparable=COMPARABLE_MEM_KIND, mark="‡", verdict_column="mem_verdict", rule=_mem_rule),
    Metric(key="fps", column="fps", field="fps", title="Inf time (fps)", label="fps", short="fps", seeds="mean",
           context="device_class", comparable=PUBLISHED_DEVICE_CLASS, mark="†", verdict_column="fps_verdict", rule=_fps_rule),
)  # fmt: skip
BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}
BY_TITLE: dict[str, Metric] = {m.title: m for m in METRICS}


def finite(x: object) -> bool:
    """A finite real number and not a bool: what a measured value must be to be shown or judged
    (pandas gives NaN for a missing one, numpy its own scalar types)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


__all__ = [
    "BY_KEY", "BY_TITLE", "COMPARABLE_MEM_KIND", "EPS", "FPS_REL", "METRICS", "Measured", "Metric",
    "PUBLISHED_DEVICE_CLASS", "PublishedTolerances", "Verdict", "ap_verdict", "finite", "fps_change_verdict", "fps_verdict", "mem_change_verdict", "mem_verdict",
]  # fmt: skip
