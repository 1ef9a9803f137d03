"""harness.results.verdicts: the verdict of a published checkpoint (`harness verify`)."""

from __future__ import annotations

import pytest

from harness.matrix.spec import Published
from harness.metrics import Measured, PublishedTolerances
from harness.results.verdicts import COCO_VAL_IMAGES, Scope, checkpoint_verdict, judge, other_categories_of

PUBLISHED = Published(box_ap=37.4, mem_gb=4.0, fps=21.4)


@pytest.mark.parametrize(("box_ap", "verdict"), [(37.4, "pass"), (37.6, "pass"), (37.1, "warn"), (37.0, "fail"), (38.0, "fail")])
def test_the_ap_bands_over_all_of_val2017(box_ap: float, verdict: str) -> None:
    got, reasons = checkpoint_verdict(box_ap=box_ap, images=COCO_VAL_IMAGES, eval_split="val2017", published=PUBLISHED,
                                      tolerances=PublishedTolerances())  # fmt: skip
    assert got == verdict
    assert (reasons == []) == (verdict == "pass")


@pytest.mark.parametrize(("images", "split", "why"), [(500, "val2017", "500 images"), (COCO_VAL_IMAGES, "train2017", "train2017")])
def test_a_part_of_val2017_or_another_split_is_not_comparable(images: int, split: str, why: str) -> None:
    got, reasons = checkpoint_verdict(box_ap=37.4, images=images, eval_split=split, published=PUBLISHED,
                                      tolerances=PublishedTolerances())  # fmt: skip
    assert got == "not comparable" and any(why in r for r in reasons)


def test_an_unpublished_row_is_not_comparable() -> None:
    got, reasons = checkpoint_verdict(box_ap=37.4, images=COCO_VAL_IMAGES, eval_split="val2017", published=Published(),
                                      tolerances=PublishedTolerances())  # fmt: skip
    assert got == "not comparable" and "no published box AP" in reasons


def test_other_categories_are_named_and_label_order_does_not_matter() -> None:
    coco3 = ("person", "bicycle", "car")
    assert other_categories_of((), coco3) is None  # not recorded: taken as the recipe's
    assert other_categories_of(coco3[::-1], coco3) is None  # AP is per category: the order is no other experiment
    assert other_categories_of(("person", "bicycle"), coco3) == "2 categories of its own (person, bicycle), not the recipe's 3"
    many = tuple(f"c{i}" for i in range(5))
    assert other_categories_of(many, coco3) == "5 categories of its own (c0, c1, c2, ...), not the recipe's 3"


def test_judge_compares_nothing_for_another_dataset_s_categories() -> None:
    published = Published(box_ap=37.4, mem_gb=4.0, fps=21.4)
    measured = {"box_ap": Measured(mean=37.4, low=37.4, high=37.4), "mem": Measured(mean=4.0, context="cuda_max_allocated")}
    kw = {"scope": Scope(metrics=frozenset({"box_ap", "mem"})), "measured": measured, "eval_split": "val2017",
          "published": published, "tolerances": PublishedTolerances()}
    assert judge(**kw)[0] == "pass"  # type: ignore[arg-type]
    verdict, per_metric, reasons = judge(**kw, other_categories="3 categories of its own (a, b, c), not the recipe's 80")  # type: ignore[arg-type]
    assert verdict == "not comparable" and set(per_metric.values()) == {"not comparable"}
    assert reasons == ["trained 3 categories of its own (a, b, c), not the recipe's 80, the published numbers are COCO's"]
