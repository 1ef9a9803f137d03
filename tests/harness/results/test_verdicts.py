"""harness.results.verdicts: the verdict of a published checkpoint (`harness verify`)."""

from __future__ import annotations

import pytest

from harness.matrix.spec import Published
from harness.metrics import PublishedTolerances
from harness.results.verdicts import COCO_VAL_IMAGES, checkpoint_verdict

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
