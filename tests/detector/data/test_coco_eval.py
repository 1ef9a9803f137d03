from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detector.data.coco import load_coco
from detector.data.coco_eval import (
    CATEGORY_KEYS,
    METRIC_KEYS,
    detections_to_coco,
    evaluate,
    evaluate_files,
    score,
)
from detector.data.synth import make_synthetic_coco
from detector.errors import DataError

COCO128 = Path("/work/shared/data/coco128/annotations/instances_train2017.json")


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_synthetic_coco(tmp_path_factory.mktemp("synth"), images=32, val_images=0)
    return root / "annotations/instances_train2017.json"


def _noisy_detections(gt: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Jittered gt boxes with random scores, some dropped, some wrong classes, some false positives."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]][:6]
    dets = []
    for ann in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        cat = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
        dets.append({"image_id": ann["image_id"], "category_id": cat, "score": float(rng.random()),
                     "bbox": [float(x + jitter[0]), float(y + jitter[1]), float(max(1.0, w + jitter[2])), float(max(1.0, h + jitter[3]))]})
    for im in gt["images"][::3]:
        dets.append({"image_id": im["id"], "category_id": int(rng.choice(cats)), "score": float(rng.random()),
                     "bbox": [float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), 30.0, 40.0]})
    return dets


def _pycocotools(ann: Path, dets: Path, cat_ids: list[int] | None = None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(str(dets)), "bbox")
        ev.params.maxDets = [100, 300, 1000]
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_evaluate_files_equals_pycocotools(gt_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(_noisy_detections(json.loads(gt_file.read_text()), 0)))
    ours = evaluate_files(gt_file, dets).stats
    assert list(ours) == list(METRIC_KEYS)
    np.testing.assert_array_equal([ours[k] for k in METRIC_KEYS], _pycocotools(gt_file, dets))
    assert 0.2 < ours["bbox_mAP"] < 0.95 and ours["bbox_mAP_50"] > ours["bbox_mAP_75"]
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    # With <= 100 detections per image, the headline AP equals pycocotools' default-parameter AP.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(str(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours["bbox_mAP"] == ev.stats[0] and ours["bbox_AR@100"] == ev.stats[8]


def test_category_subset(gt_file: Path, tmp_path: Path) -> None:
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(_noisy_detections(json.loads(gt_file.read_text()), 1)))
    ours = evaluate_files(gt_file, dets, categories=["person", "car"])
    np.testing.assert_array_equal([ours.stats[k] for k in METRIC_KEYS], _pycocotools(gt_file, dets, cat_ids=[1, 3]))
    assert ours.stats != evaluate_files(gt_file, dets).stats
    assert list(ours.per_category) == ["person", "car"]
    with pytest.raises(DataError, match="unknown category 'people'"):
        evaluate_files(gt_file, dets, categories=["people"])


def test_each_category_scores_as_if_evaluated_alone(gt_file: Path, tmp_path: Path) -> None:
    """mmdet's classwise AP read from pycocotools' precision array is, category by category, what
    pycocotools computes evaluating that category alone (each category is matched on its own)."""
    gt = json.loads(gt_file.read_text())
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(_noisy_detections(gt, 3)))
    ours = evaluate_files(gt_file, dets)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    assert list(ours.per_category) == [names[i] for i in sorted(names)]  # every category, in id order
    with_gt = sorted({a["category_id"] for a in gt["annotations"]})
    assert 3 <= len(with_gt) < len(names)
    for cat_id in with_gt:
        alone = _pycocotools(gt_file, dets, cat_ids=[cat_id])
        row = ours.per_category[names[cat_id]]
        assert list(row) == list(CATEGORY_KEYS)
        # mAP at maxDets 1000 (mmdet's index -1) equals stats[0] at 100: under 100 detections an image.
        assert row["mAP"] == alone[0] and row["mAP_50"] == alone[1] and row["mAP_75"] == alone[2]
        assert [row["mAP_s"], row["mAP_m"], row["mAP_l"]] == [None if v == -1 else v for v in alone[3:6]]
    for cat_id in set(names) - set(with_gt):
        assert ours.per_category[names[cat_id]] == dict.fromkeys(CATEGORY_KEYS)  # no ground truth: no AP
    aps = [v for v in ours.category_ap().values() if v is not None]
    assert len(aps) == len(with_gt) and np.mean(aps) == pytest.approx(ours.stats["bbox_mAP"], abs=1e-12)


def test_perfect_and_empty_detections(gt_file: Path) -> None:
    gt = load_coco(gt_file)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt.dataset["annotations"]]
    assert evaluate(gt, perfect) == {k: 1.0 for k in METRIC_KEYS}
    assert len(perfect) == len(gt.dataset["annotations"]) and "area" not in perfect[0]  # input left untouched
    assert evaluate(gt, []) == {k: 0.0 for k in METRIC_KEYS}
    assert all(ap is None or ap == pytest.approx(1.0) for ap in score(gt, perfect).category_ap().values())
    only_zero = evaluate(gt, [d for d in perfect if d["image_id"] == 0], img_ids=[0])
    assert only_zero["bbox_mAP"] == 1.0  # image id 0 evaluates like any other


def test_detections_to_coco_round_trip(gt_file: Path) -> None:
    gt = load_coco(gt_file)
    label_to_cat_id = [c["id"] for c in gt.dataset["categories"]]
    cat_to_label = {c: i for i, c in enumerate(label_to_cat_id)}
    outputs, metas = [], []
    for image_id in gt.getImgIds():
        anns = gt.imgToAnns[image_id]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns])
        outputs.append({"boxes": boxes.reshape(-1, 4), "scores": torch.linspace(1.0, 0.5, len(anns)),
                        "labels": torch.tensor([cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)})
        metas.append({"image_id": image_id})
    outputs.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)})
    metas.append({"image_id": 0})
    dets = detections_to_coco(outputs, metas, label_to_cat_id)
    assert len(dets) == len(gt.dataset["annotations"])
    first = gt.imgToAnns[0][0]
    assert dets[0]["image_id"] == 0 and dets[0]["category_id"] == first["category_id"]
    assert dets[0]["bbox"] == pytest.approx(first["bbox"]) and isinstance(dets[0]["score"], float)
    json.dumps(dets)  # plain Python types only
    assert evaluate(gt, dets)["bbox_mAP"] == 1.0
    with pytest.raises(ValueError, match="outputs"):
        detections_to_coco(outputs, metas[:-1], label_to_cat_id)


@pytest.mark.parametrize(
    ("dets", "match"),
    [(None, "file not found"), ("[{", "invalid JSON"), ('{"a": 1}', "expected a JSON list"),
     ('[{"image_id": 99999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]', "image_id 99999"),
     ('[{"image_id": 0, "category_id": 12, "bbox": [0, 0, 1, 1], "score": 0.5}]', "category_id 12"),
     ('[{"image_id": 0, "category_id": 1, "bbox": [0, 0, 1], "score": 0.5}]', "bbox"),
     ('[{"image_id": 0, "category_id": 1, "bbox": [0, 0, 1, 1]}]', "score")],
)
def test_file_errors_name_the_file(gt_file: Path, tmp_path: Path, dets: str | None, match: str) -> None:
    path = tmp_path / "my_dets.json"
    if dets is not None:
        path.write_text(dets)
    with pytest.raises(DataError, match=match) as err:
        evaluate_files(gt_file, path)
    assert str(path) in str(err.value)
    with pytest.raises(DataError, match="missing_gt.json"):
        evaluate_files(tmp_path / "missing_gt.json", path)


def test_gt_annotation_id_zero_is_refused(tmp_path: Path) -> None:
    gt = {"images": [{"id": 0, "file_name": "a.jpg", "width": 50, "height": 50}], "categories": [{"id": 1, "name": "person"}],
          "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "bbox": [1, 1, 20, 20], "area": 400, "iscrowd": 0}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(DataError, match="id 0"):
        evaluate(load_coco(path), [{"image_id": 0, "category_id": 1, "bbox": [1, 1, 20, 20], "score": 1.0}])


@pytest.mark.skipif(not COCO128.is_file(), reason="coco128 missing")
def test_coco128_with_crowd_equals_pycocotools(tmp_path: Path) -> None:
    gt = json.loads(COCO128.read_text())
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(_noisy_detections(gt, 2)))
    ours = evaluate_files(COCO128, dets).stats
    np.testing.assert_array_equal([ours[k] for k in METRIC_KEYS], _pycocotools(COCO128, dets))
    assert evaluate(load_coco(COCO128, drop_segmentation=True), json.loads(dets.read_text())) == ours
    # Crowd regions are "ignore": detecting them must not count as true or false positives.
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    assert evaluate(load_coco(COCO128), perfect)["bbox_mAP"] == 1.0


def test_a_repeated_category_name_keeps_both_categories_apart(tmp_path: Path) -> None:
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": 50, "height": 50}],
          "categories": [{"id": 1, "name": "widget"}, {"id": 2, "name": "widget"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20], "area": 400, "iscrowd": 0}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    scores = score(load_coco(path), [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20], "score": 1.0}])
    assert scores.category_ap() == {"widget": pytest.approx(1.0), "widget (id 2)": None}
