"""`detector.metrics.Metrics`: metrics.json typed, written and read back."""

from __future__ import annotations

import json

from detector.metrics import Metrics


def test_round_trip_through_json() -> None:
    rec = Metrics(status="ok", coco={"bbox_mAP": 0.374}, box_ap=37.4, mem_gb=2.5, mem_kind="cuda_max_allocated",
                  fps=30.1, fps_images=100, iters=10, deviations=("image scale (320, 192) instead of (1333, 800)",))  # fmt: skip
    assert Metrics.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_reading_is_lenient_with_result_copies_and_older_files() -> None:
    rec = Metrics.from_dict({"box_ap": 1.5, "something_new": 3, "deviations": None})  # no status: a result.json copy
    assert (rec.status, rec.box_ap, rec.deviations, rec.fps_images) == (None, 1.5, (), 0)
    assert Metrics.from_dict(None) == Metrics()
