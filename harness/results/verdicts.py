"""Tolerance rules: one measured number against its published value -> a verdict.

Pure functions on floats, shared by `harness.results.collect` (a verdict per run) and `harness.results.compare`
(a verdict per cell over its seeds). They live apart from both so that neither imports the other.

Rules (DESIGN.md "What the numbers mean"; shared/reference/ecosystem_anchors.md section 5):
- box AP: |delta| <= 0.2 pass, <= 0.3 warn, more fail. With K seeds the rule is applied to the
  95% Student-t interval of the mean: pass if the whole interval lies inside the pass band around
  the published value, fail if it lies entirely outside the warn band, warn otherwise. A single
  run is the degenerate interval [x, x], so both cases are one rule.
- Mem (GB), one-sided: more than 10% (relative) above the published Mem fails, at or below (however
  far below) passes; the relative difference is always shown. A modern stack uses far less than
  PyTorch 1.x did, which is not a regression (the torchvision counterpart measured in the same run
  shows how much of that is the framework). Only `cuda_max_allocated` is comparable (a CPU peak RSS
  measures something else).
- Which metrics a profile compares at all (`scope_of`): `published` (full) all three, `hardware`
  Mem and fps only (its box AP comes from a few iterations), the toy profiles none.
- fps: only on the published device class (V100, reference section 2.2); within 15% pass, else warn
  (never fail: fps is indicative only, reference Q7).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # only for annotations: verdicts stays importable without the matrix module
    from harness.matrix.spec import Profile, Published, Tolerances

Verdict = Literal["pass", "warn", "fail", "not comparable", "not run"]
VERDICTS: tuple[str, ...] = ("pass", "warn", "fail", "not comparable", "not run")

# The published Mem / fps were measured on V100s (reference sections 2.1, 2.2; metafile `hardware`).
PUBLISHED_DEVICE_CLASS = "V100"
COMPARABLE_MEM_KIND = "cuda_max_allocated"
# fps tolerance: +-10-15% relative on the same hardware (ecosystem_anchors.md section 5).
FPS_REL = 0.15
# Published numbers carry one decimal; 37.6 - 37.4 is 0.2000000000000028 in floating point.
EPS = 1e-9

# Two-sided 95% Student-t critical values t(0.975, df) for df = 1..30 (standard tables); beyond 30
# the normal 1.96 is close enough for a table with one decimal. scipy is not a dependency.
T95: dict[int, float] = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
    26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
}


def t_critical(df: int) -> float:
    """Two-sided 95% critical value of Student's t with `df` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T95.get(df, 1.96)


def interval95(values: Sequence[float]) -> tuple[float, float, float, float]:
    """Mean, sample std (ddof 1), and the 95% t interval of the mean of `values`.

    One value gives std NaN and the degenerate interval [x, x].
    """
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        raise ValueError("interval95 needs at least one finite value")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return mean, math.nan, mean, mean
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_critical(n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def ap_verdict(low: float, high: float, published: float, *, pass_band: float, warn_band: float) -> Verdict:
    """Verdict of the AP interval [low, high] against `published` (percentage points)."""
    if low + EPS >= published - pass_band and high - EPS <= published + pass_band:
        # Both ends within the pass band (the EPS lets a printed 0.2 count as 0.2).
        return "pass"
    if high < published - warn_band - EPS or low > published + warn_band + EPS:
        return "fail"
    return "warn"


def mem_verdict(measured: float | None, mem_kind: str | None, published: float | None, *, rel: float) -> tuple[Verdict, str]:
    """Verdict and reason for a training-memory number (GB)."""
    if measured is None or _nan(measured):
        return "not run", "no memory measured"
    if published is None:
        return "not comparable", "no published Mem"
    if mem_kind != COMPARABLE_MEM_KIND:
        return "not comparable", f"Mem is {mem_kind or 'unknown'}, the published one is CUDA max_memory_allocated"
    d = (measured - published) / published
    if d <= rel + EPS:  # one-sided: using less memory than PyTorch 1.x did is not a regression
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
    if abs(d) <= FPS_REL + EPS:
        return "pass", f"fps {d:+.0%}"
    return "warn", f"fps {d:+.0%} (indicative, tolerance {FPS_REL:.0%})"


def combine(verdicts: Iterable[str]) -> Verdict:
    """One verdict from several metric verdicts: the worst compared one, else "not comparable"."""
    vs = set(verdicts)
    order: tuple[Verdict, ...] = ("fail", "warn", "pass")
    for v in order:
        if v in vs:
            return v
    return "not comparable"


def quirk_ids(notes: Iterable[str]) -> tuple[str, ...]:
    """Ids of the quirk notes ("Q5: ..." -> "Q5", "FP16: ..." -> "FP16"), in order, unique."""
    out: list[str] = []
    for note in notes:
        head, sep, _ = note.partition(":")
        if sep and head and head.replace("-", "").isalnum() and head.upper() == head and head not in out:
            out.append(head)
    return tuple(out)


METRICS = ("box_ap", "mem", "fps")


@dataclass(frozen=True, kw_only=True)
class Scope:
    """Which metrics of a profile's runs are compared with the published table, and why not the rest."""

    metrics: frozenset[str]
    reason: str | None = None  # None when every metric is compared


def scope_of(profile: Profile) -> Scope:
    """The metrics `profile` compares (`harness.matrix.spec.Profile`).

    Published numbers are full-recipe COCO val2017 runs: a profile with a reduced budget or image
    scale is toy scale for AP; the `hardware` profile trains a few iterations at full scale, which is
    what Mem and fps need and AP does not get.
    """
    name, mode, data = profile.name, profile.compare, profile.data
    if mode in ("published", "hardware") and profile.image_scale is not None:
        return Scope(metrics=frozenset(), reason=f"profile {name} trains at {profile.image_scale}, not the recipe's (1333, 800)")
    if mode == "hardware":
        return Scope(metrics=frozenset({"mem", "fps"}),
                     reason=f"profile {name} measures Mem and fps at full scale; its box AP is from a few iterations")  # fmt: skip
    if mode != "published":
        against = "stored baselines (`harness regression`)" if mode == "baselines" else "nothing"
        scale = "synthetic data" if data == "synthetic" else "a small subset"
        return Scope(metrics=frozenset(), reason=f"profile {name} is toy scale ({scale}, short budget) and compares against {against}")
    if profile.max_iters is not None:
        return Scope(metrics=frozenset(), reason=f"profile {name} stops at {profile.max_iters} iterations, not the recipe's epochs")
    return Scope(metrics=frozenset(METRICS))


def judge(
    *,
    scope: Scope,
    ap_low: float | None,
    ap_high: float | None,
    mem_gb: float | None,
    mem_kind: str | None,
    fps: float | None,
    device_class: str | None,
    eval_split: str | None,
    published: Published,
    tolerances: Tolerances,
) -> tuple[Verdict, dict[str, Verdict], list[str]]:
    """Verdict of finished run(s) of one cell on AP, Mem and fps against `published`.

    The one place where verdicts are decided; callers only put "fail" (a seed crashed) and "not
    run" (nothing finished) before it.

    Args:
        scope: what the profile compares (`scope_of`); a metric outside it is "not comparable".
        ap_low, ap_high: the AP interval (a single run: both equal the AP); None if the finished
            run(s) measured no AP, which fails where AP is compared.
        eval_split: where AP was evaluated; only val2017 is comparable with the published AP.
        published: a `harness.matrix.spec.Published`; tolerances: a `harness.matrix.spec.Tolerances`.

    Returns:
        (overall verdict, {"box_ap": v, "mem": v, "fps": v}, reasons), where overall is the worst
        compared metric verdict, or "not comparable" when no metric could be compared.
    """
    reasons: list[str] = []
    compared = set(scope.metrics)
    if scope.reason:
        reasons.append(scope.reason)
    splits = {s.strip() for s in (eval_split or "").split(",") if s.strip()}
    if "box_ap" in compared and splits - {"val2017"}:
        compared.clear()  # not COCO val2017: not the published experiment at all
        reasons.append(f"evaluated on the {eval_split} split, the published numbers are on val2017")
    pub_ap = published.box_ap
    ap: Verdict = "not comparable"
    if "box_ap" not in compared:
        pass
    elif ap_low is None or ap_high is None or _nan(ap_low):
        # Only finished runs are judged: one that finished without an AP did not do its job.
        ap = "fail"
        reasons.append("the run finished without a box AP")
    elif pub_ap is None:
        reasons.append("no published box AP")
    else:
        ap = ap_verdict(ap_low, ap_high, pub_ap, pass_band=tolerances.box_ap_pass, warn_band=tolerances.box_ap_warn)
        if ap != "pass":
            reasons.append(f"box AP off the published {pub_ap} by more than {tolerances.box_ap_pass}")
    mem, mem_reason = mem_verdict(mem_gb, mem_kind, published.mem_gb, rel=tolerances.mem_rel)
    fps_v, fps_reason = fps_verdict(fps, device_class, published.fps)
    if "mem" not in compared:
        mem = "not comparable"
    elif mem != "pass" and published.mem_gb is not None:  # an unpublished metric needs no explanation
        reasons.append(mem_reason)
    if "fps" not in compared:
        fps_v = "not comparable"
    elif fps_v != "pass" and published.fps is not None:
        reasons.append(fps_reason)
    per_metric: dict[str, Verdict] = {"box_ap": ap, "mem": mem, "fps": fps_v}
    return combine(per_metric.values()), per_metric, reasons


def _nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


__all__ = [
    "COMPARABLE_MEM_KIND",
    "FPS_REL",
    "PUBLISHED_DEVICE_CLASS",
    "T95",
    "VERDICTS",
    "Verdict",
    "ap_verdict",
    "combine",
    "fps_verdict",
    "interval95",
    "judge",
    "mem_verdict",
    "METRICS",
    "Scope",
    "scope_of",
    "quirk_ids",
    "t_critical",
]
