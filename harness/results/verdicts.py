"""Verdicts: which metrics a profile compares, seed intervals, and the one `judge` of a cell.

Pure functions on floats, shared by `harness.results.collect` (a verdict per run) and
`harness.results.compare` (a verdict per cell over its seeds). The metrics themselves and their
tolerance rules are the table in `harness.metrics`; `judge` iterates it.

- Which metrics a profile compares at all (`scope_of`): `published` (full) all, `hardware` Mem and
  fps only (its box AP comes from a few iterations), the toy profiles none.
- Only COCO val2017 with the recipe's categories is the published experiment: AP evaluated elsewhere,
  or a model trained on a dataset's own categories, makes nothing comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.metrics import METRICS, Measured, Verdict

if TYPE_CHECKING:  # only for annotations: verdicts stays importable without the matrix module
    from harness.matrix.spec import Profile, Published
    from harness.metrics import PublishedTolerances

VERDICTS: tuple[str, ...] = ("pass", "warn", "fail", "not comparable", "not run")

# COCO val2017: the published box AP is over all of it.
COCO_VAL_IMAGES = 5000

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
    if mode in ("published", "hardware") and profile.budget.image_scale is not None:
        return Scope(metrics=frozenset(), reason=f"profile {name} trains at {profile.budget.image_scale}, not the recipe's (1333, 800)")
    if mode == "hardware":
        return Scope(metrics=frozenset({"mem", "fps"}),
                     reason=f"profile {name} measures Mem and fps at full scale; its box AP is from a few iterations")  # fmt: skip
    if mode != "published":
        against = "stored baselines (`harness regression`)" if mode == "baselines" else "nothing"
        scale = "synthetic data" if data == "synthetic" else "a small subset"
        return Scope(metrics=frozenset(), reason=f"profile {name} is toy scale ({scale}, short budget) and compares against {against}")
    if profile.budget.max_iters is not None:
        return Scope(metrics=frozenset(), reason=f"profile {name} stops at {profile.budget.max_iters} iterations, not the recipe's epochs")
    return Scope(metrics=frozenset(m.key for m in METRICS))


def judge(
    *,
    scope: Scope,
    measured: Mapping[str, Measured],
    eval_split: str | None,
    published: Published,
    tolerances: PublishedTolerances,
    other_categories: str | None = None,
    eval_images: int | None = None,
) -> tuple[Verdict, dict[str, Verdict], list[str]]:
    """Verdict of finished run(s) of one cell on every metric of `harness.metrics.METRICS`.

    The one place where verdicts are decided; the precedence before it (a crashed seed fails the
    cell, nothing finished is "not run") is `precedence`.

    Args:
        scope: what the profile compares (`scope_of`); a metric outside it is "not comparable".
        measured: metric key -> its value(s) (a single run: low == high == the value); a metric
            missing here was not measured.
        eval_split: where AP was evaluated; only val2017 is comparable with the published numbers.
        other_categories: what the run trained when not the recipe's categories (`--classes dataset`
            on another dataset), as `other_categories_of` words it; None: the recipe's.
        eval_images: how many images AP was evaluated on (None: not recorded); the published box AP is
            over all `COCO_VAL_IMAGES` of val2017, so AP over fewer (or more) is not compared.
        published: a `harness.matrix.spec.Published`; tolerances: a `harness.matrix.spec.PublishedTolerances`.

    Returns:
        (overall verdict, {metric key: verdict}, reasons), where overall is the worst compared
        metric verdict, or "not comparable" when no metric could be compared.
    """
    reasons: list[str] = []
    compared = set(scope.metrics)
    if scope.reason:
        reasons.append(scope.reason)
    splits = {s.strip() for s in (eval_split or "").split(",") if s.strip()}
    if "box_ap" in compared and splits - {"val2017"}:
        compared.clear()  # not COCO val2017: not the published experiment at all
        reasons.append(f"evaluated on the {eval_split} split, the published numbers are on val2017")
    if compared and other_categories:
        compared.clear()  # another dataset's categories: not the published experiment either
        reasons.append(f"trained {other_categories}, the published numbers are COCO's")
    if "box_ap" in compared and eval_images is not None and eval_images != COCO_VAL_IMAGES:
        compared.discard("box_ap")  # Mem and fps do not depend on how many images were scored
        reasons.append(f"box AP over {eval_images:,} images; the published box AP is over the {COCO_VAL_IMAGES:,} of COCO val2017")
    per_metric: dict[str, Verdict] = {}
    for metric in METRICS:
        if metric.key not in compared:
            per_metric[metric.key] = "not comparable"
            continue
        verdict, reason = metric.rule(measured.get(metric.key, Measured(mean=None)), getattr(published, metric.column), tolerances)
        per_metric[metric.key] = verdict
        if reason:
            reasons.append(reason)
    return combine(per_metric.values()), per_metric, reasons


def precedence(*, n_ok: int, n_failed: int) -> Verdict | None:
    """The verdict that comes before `judge`: a crashed or diverged seed fails the cell whatever the
    profile (the cell does not work), then a cell with no finished seed is "not run"; None: judge it."""
    if n_failed:
        return "fail"
    if not n_ok:
        return "not run"
    return None


def other_categories_of(trained: Sequence[str], recipe: Sequence[str]) -> str | None:
    """None when a run trained the recipe's categories (in any label order: AP is per category), else
    the words `judge` gives as the reason. `trained` empty: not recorded, taken as the recipe's."""
    if not trained or set(trained) == set(recipe):
        return None
    few = ", ".join(list(trained)[:3]) + (", ..." if len(trained) > 3 else "")
    return f"{len(trained)} categories of its own ({few}), not the recipe's {len(recipe)}"


def checkpoint_verdict(*, box_ap: float, images: int, eval_split: str, published: Published,
                       tolerances: PublishedTolerances) -> tuple[Verdict, list[str]]:
    """`harness verify`: a checkpoint's box AP against its published row, through `judge`. Only an
    evaluation over all of COCO val2017 is the published experiment."""
    verdict, _per_metric, reasons = judge(scope=Scope(metrics=frozenset({"box_ap"})),
                                          measured={"box_ap": Measured(mean=box_ap, low=box_ap, high=box_ap)},
                                          eval_split=eval_split, published=published, tolerances=tolerances,
                                          eval_images=images)  # fmt: skip
    return verdict, reasons


__all__ = ["T95", "VERDICTS", "Scope", "COCO_VAL_IMAGES", "checkpoint_verdict", "combine", "interval95", "judge", "other_categories_of", "precedence", "quirk_ids", "scope_of", "t_critical"]
