"""`harness.metrics`: the one table of compared metrics, its rules, and that the rest follows it."""

from __future__ import annotations

import dataclasses

import pytest

from harness.matrix.spec import METRIC_COLUMNS, Published
from harness.metrics import BY_KEY, METRICS, Measured, PublishedTolerances
from harness.results.verdicts import Scope, judge

TOL = PublishedTolerances()


def test_published_has_one_field_per_metric_and_the_seed_titles_follow_the_table() -> None:
    assert [f.name for f in dataclasses.fields(Published)] == [m.column for m in METRICS]
    assert METRIC_COLUMNS == {m.title: m.column for m in METRICS}
    assert len({m.key for m in METRICS}) == len({m.verdict_column for m in METRICS}) == len(METRICS)


@pytest.mark.parametrize(
    ("key", "measured", "published", "verdict", "reason"),
    [
        ("box_ap", Measured(mean=37.5, low=37.5, high=37.5), 37.4, "pass", None),
        ("box_ap", Measured(mean=37.0, low=37.0, high=37.0), 37.4, "fail", "box AP off the published 37.4 by more than 0.2"),
        ("box_ap", Measured(mean=None), 37.4, "fail", "the run finished without a box AP"),
        ("box_ap", Measured(mean=30.0, low=30.0, high=30.0), None, "not comparable", "no published box AP"),
        ("mem", Measured(mean=2.0, context="cuda_max_allocated"), 4.0, "pass", None),  # one-sided: far below passes
        ("mem", Measured(mean=4.5, context="cuda_max_allocated"), 4.0, "fail", "Mem +12% (more than 10% above the published)"),
        ("mem", Measured(mean=4.5, context="cpu_peak_rss"), 4.0, "not comparable",
         "Mem is cpu_peak_rss, the published one is CUDA max_memory_allocated"),
        ("mem", Measured(mean=4.5, context="cuda_max_allocated"), None, "not comparable", None),  # unpublished: nothing to say
        ("fps", Measured(mean=10.0, context="V100"), 21.4, "warn", "fps -53% (indicative, tolerance 15%)"),  # never fails
        ("fps", Measured(mean=10.0, context="H200"), 21.4, "not comparable", "fps on H200, published on V100"),
        ("fps", Measured(mean=None), 21.4, "not run", "no fps measured"),
    ],
)  # fmt: skip
def test_rules(key: str, measured: Measured, published: float | None, verdict: str, reason: str | None) -> None:
    assert BY_KEY[key].rule(measured, published, TOL) == (verdict, reason)


def test_judge_asks_only_the_metrics_in_scope() -> None:
    published = Published(box_ap=37.4, mem_gb=4.0, fps=21.4)
    measured = {"box_ap": Measured(mean=30.0, low=30.0, high=30.0), "mem": Measured(mean=3.0, context="cuda_max_allocated")}
    overall, per_metric, reasons = judge(scope=Scope(metrics=frozenset({"mem"}), reason="hardware"), measured=measured,
                                         eval_split="val2017", published=published, tolerances=TOL)  # fmt: skip
    assert (overall, per_metric) == ("pass", {"box_ap": "not comparable", "mem": "pass", "fps": "not comparable"})
    assert reasons == ["hardware"]
    overall, per_metric, _ = judge(scope=Scope(metrics=frozenset(BY_KEY)), measured=measured, eval_split="val2017",
                                   published=published, tolerances=TOL)  # fmt: skip
    assert overall == "fail" and per_metric["box_ap"] == "fail" and per_metric["fps"] == "not run"


def test_marks_only_measured_numbers_that_are_not_comparable() -> None:
    mem, fps, ap = BY_KEY["mem"], BY_KEY["fps"], BY_KEY["box_ap"]
    assert mem.mark_for(1.8, "cpu_peak_rss") == "‡" and mem.mark_for(1.8, "cuda_max_allocated") == ""
    assert fps.mark_for(5.7, "cpu") == "†" and fps.mark_for(float("nan"), "cpu") == "" and fps.mark_for(None, "cpu") == ""
    assert ap.mark_for(37.0, None) == ""
