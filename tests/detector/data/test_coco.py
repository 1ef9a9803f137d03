from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from detector.config import DetectorConfig, RunConfig
from detector.data.coco import (
    AspectRatioBatchSampler,
    CocoDetection,
    DataError,
    build_dataset,
    build_test_loader,
    build_train_loader,
    iterate_batches,
    subset_annotations,
)
from detector.data.synth import make_synthetic_coco
from detector.data.transforms import DetTransform
from detector.recipes import MS_RANGE

COCO128 = Path("/work/shared/data/coco128")
needs_coco128 = pytest.mark.skipif(not (COCO128 / "annotations/instances_train2017.json").is_file(), reason="coco128 missing")
SMALL = (320, 192)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), images=24, val_images=8)


def _run(root: Path, **kw: Any) -> RunConfig:
    return RunConfig(data_root=str(root), image_scale=SMALL, workers=0, **kw)


def _single(long: int = 64, short: int = 48) -> DetTransform:
    return DetTransform(long_side=long, short_sides=(short,))


def _write_root(tmp: Path, images: list[dict[str, Any]], anns: list[dict[str, Any]], cats: list[dict[str, Any]] | None = None,
                mode: str = "RGB") -> Path:
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    for im in images:
        fmt = "PNG" if im["file_name"].endswith(".png") else "JPEG"
        Image.new(mode, (im["width"], im["height"]), (10, 200, 30, 128)[: len(mode)] if mode != "L" else 90).save(tmp / "img" / im["file_name"], format=fmt)
    cats = cats or [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
    ann = tmp / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann


def _ann(i: int, image_id: int, cat: int, bbox: list[float], **kw: Any) -> dict[str, Any]:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, **kw}


def test_synthetic_items_labels_and_meta(synth: Path) -> None:
    ds = build_dataset(DetectorConfig(), _run(synth), train=True)
    assert len(ds) == 24 and ds.num_classes == 80 and ds.split == "train2017"
    assert ds.label_to_cat_id[:3] == [1, 2, 3] and ds.label_to_cat_id[-1] == 90
    assert ds.image_ids[0] == 0  # image id 0 is a normal id
    assert "segmentation" not in ds.coco.dataset["annotations"][0]  # masks dropped: smaller workers
    image, target, meta = ds[0]
    raw = ds.coco.imgToAnns[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and meta["image_id"] == 0
    assert meta["orig_size"] == (240, 320) and image.shape[1:] == meta["img_size"]
    ws, hs = meta["scale_factor"]
    expected = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in raw])
    expected *= torch.tensor([ws, hs, ws, hs])
    if meta["flipped"]:
        expected = torch.stack([image.shape[2] - expected[:, 2], expected[:, 1], image.shape[2] - expected[:, 0], expected[:, 3]], 1)
    assert torch.allclose(target["boxes"], expected, atol=1e-4)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert [ds.label_to_cat_id[int(lab)] for lab in target["labels"]] == [a["category_id"] for a in raw]


def test_class_subset_contiguous_labels(synth: Path) -> None:
    cfg = replace(DetectorConfig(), num_classes=3, data=replace(DetectorConfig().data, classes=("car", "person", "bicycle")))
    ds = build_dataset(cfg, _run(synth), train=True)
    # mmdet order: the file's category order (pycocotools getCatIds), not the order of `classes`.
    assert ds.label_to_cat_id == [1, 2, 3] and ds.class_names == ["person", "bicycle", "car"]
    with_cls = {a["image_id"] for a in ds.coco.dataset["annotations"] if a["category_id"] in (1, 2, 3)}
    assert set(ds.image_ids) == with_cls and len(ds) < 24
    labels = torch.cat([ds[i][1]["labels"] for i in range(len(ds))])
    assert labels.numel() > 0 and set(labels.tolist()) <= {0, 1, 2}
    test = build_dataset(cfg, _run(synth), train=False)
    assert test.split == "val2017" and len(test) == 8  # test mode keeps every image
    with pytest.raises(DataError, match="unknown category 'unicorn'.*allowed: person"):
        build_dataset(replace(cfg, data=replace(cfg.data, classes=("unicorn",))), _run(synth), train=True)


def test_eval_split_falls_back_to_train(synth: Path) -> None:
    ds = build_dataset(DetectorConfig(), _run(synth, val_ann="annotations/missing.json"), train=False)
    assert ds.split == "train2017" and len(ds) == 24 and not ds.transform.random
    assert len(build_dataset(DetectorConfig(), _run(synth, eval_max_images=5), train=False)) == 5


def test_augmentation_is_seeded_by_seed_epoch_index(synth: Path) -> None:
    data = replace(DetectorConfig().data, train_scale="ms_range", ms_short_sides=MS_RANGE)
    cfg = replace(DetectorConfig(), data=data)
    a = build_dataset(cfg, _run(synth, seed=1), train=True)
    b = build_dataset(cfg, _run(synth, seed=1), train=True)
    keys = [(i, e) for i in range(6) for e in range(2)]
    metas_a = [(a[k][2]["img_size"], a[k][2]["flipped"]) for k in keys]
    assert metas_a == [(b[k][2]["img_size"], b[k][2]["flipped"]) for k in keys]
    assert torch.equal(a[(3, 1)][0], b[(3, 1)][0])
    assert len(set(metas_a)) > 3  # scales and flips actually vary over index and epoch


def test_filters_crowd_degenerate_and_sizes(tmp_path: Path) -> None:
    images = [
        {"id": 0, "file_name": "a.jpg", "width": 64, "height": 48},  # normal, with crowd + degenerate boxes
        {"id": 1, "file_name": "b.jpg", "width": 64, "height": 48},  # only a crowd box: kept (mmdet)
        {"id": 2, "file_name": "c.jpg", "width": 64, "height": 48},  # no annotation: dropped in training
        {"id": 3, "file_name": "d.jpg", "width": 100, "height": 20},  # min(w, h) < 32: dropped in training
        {"id": 4, "file_name": "e.jpg", "width": 64, "height": 48},  # only a 'train' box
    ]
    anns = [
        _ann(1, 0, 1, [4, 5, 20, 30]),
        _ann(2, 0, 3, [30, 10, 20, 10], iscrowd=1),
        _ann(3, 0, 1, [10, 10, 0.5, 10]),  # w < 1
        _ann(4, 0, 1, [10, 10, 10, 0.9]),  # h < 1
        _ann(5, 0, 3, [70, 10, 10, 10]),  # outside the image
        {**_ann(6, 0, 3, [10, 10, 10, 10]), "area": 0},  # zero area
        _ann(7, 0, 3, [50, 30, 30, 30]),  # crosses the border: kept, clipped by the resize
        _ann(8, 1, 1, [0, 0, 64, 48], iscrowd=1),
        _ann(9, 3, 1, [0, 0, 10, 10]),
        _ann(10, 4, 7, [0, 0, 10, 10]),
    ]
    ann = _write_root(tmp_path, images, anns)
    ds = CocoDetection(ann_file=ann, image_dir=tmp_path / "img", transform=_single(), classes=("person", "car"), train=True)
    assert ds.image_ids == [0, 1]
    _, target, _ = ds[0]
    assert target["labels"].tolist() == [0, 1]
    assert target["boxes"].tolist() == [[4.0, 5.0, 24.0, 35.0], [50.0, 30.0, 64.0, 48.0]]
    assert ds[1][1]["boxes"].shape == (0, 4) and ds[1][1]["labels"].shape == (0,)
    all_cats = CocoDetection(ann_file=ann, image_dir=tmp_path / "img", transform=_single(), train=True)
    assert all_cats.image_ids == [0, 1, 4]
    no_filter = CocoDetection(ann_file=ann, image_dir=tmp_path / "img", transform=_single(), train=True,
                              filter_empty_gt=False, min_size=0)
    assert no_filter.image_ids == [0, 1, 2, 3, 4]
    test = CocoDetection(ann_file=ann, image_dir=tmp_path / "img", transform=_single(), classes=("person",), train=False)
    assert test.image_ids == [0, 1, 2, 3, 4]


def test_grayscale_and_rgba_become_rgb(tmp_path: Path) -> None:
    images = [{"id": 5, "file_name": "x.png", "width": 40, "height": 36}]
    for mode in ("L", "RGBA", "P"):
        root = tmp_path / mode
        ann = _write_root(root, images, [_ann(1, 5, 1, [1, 1, 10, 10])], mode=mode)
        image, _, meta = CocoDetection(ann_file=ann, image_dir=root / "img", transform=_single(), train=True, min_size=0)[0]
        assert image.shape == (3, 48, 53) and meta["orig_size"] == (36, 40)
    gray = CocoDetection(ann_file=tmp_path / "L" / "ann.json", image_dir=tmp_path / "L" / "img", transform=_single(40, 36),
                         train=True, min_size=0).load_image(5)
    assert bool((gray == 90).all())


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "file not found"), ('{"images": [', "invalid JSON"), ("[1, 2]", "expected a COCO object"),
     ('{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}], "categories": [{"id": 1, "name": "p"}],'
      ' "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]}', "image id 2"),
     ('{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}], "categories": [{"id": 1, "name": "p"}],'
      ' "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}]}', "category id 9"),
     ('{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}], "categories": [{"id": 1, "name": "p"}],'
      ' "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}]}', "bbox"),
     ('{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}], "categories": [{"id": 1, "name": "p"}],'
      ' "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]},'
      ' {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}]}', "duplicate annotation id")],
)
def test_annotation_file_errors_name_the_file(tmp_path: Path, content: str | None, match: str) -> None:
    (tmp_path / "img").mkdir()
    ann = tmp_path / "instances_bad.json"
    if content is not None:
        ann.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        CocoDetection(ann_file=ann, image_dir=tmp_path / "img", transform=_single(), train=True)
    assert str(ann) in str(err.value)


def test_image_errors_name_the_file(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "ok.jpg", "width": 64, "height": 48}, {"id": 2, "file_name": "gone.jpg", "width": 64, "height": 48}]
    ann = _write_root(tmp_path, images[:1], [_ann(1, 1, 1, [0, 0, 5, 5])])
    data = json.loads(ann.read_text())
    data["images"] = images
    data["annotations"].append(_ann(2, 2, 1, [0, 0, 5, 5]))
    ann.write_text(json.dumps(data))
    ds = CocoDetection(ann_file=ann, image_dir=tmp_path / "img", transform=_single(), train=True)
    with pytest.raises(DataError, match="gone.jpg: file not found"):
        ds[1]
    good = (tmp_path / "img" / "ok.jpg").read_bytes()
    (tmp_path / "img" / "ok.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="ok.jpg: cannot decode"):
        ds[0]
    with pytest.raises(DataError, match="image folder"):
        CocoDetection(ann_file=ann, image_dir=tmp_path / "nope", transform=_single(), train=True)
    with pytest.raises(DataError, match="data root"):
        build_dataset(DetectorConfig(), _run(tmp_path / "nothing"), train=True)


def test_sampler_groups_covers_and_splits_ranks() -> None:
    groups = [0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0]
    s = AspectRatioBatchSampler(group_ids=groups, batch_size=2, seed=3)
    batches = [[i for i, _ in b] for b in s]
    assert len(batches) == len(s) == 6
    assert sorted(i for b in batches for i in b) == list(range(11))
    assert sum(len({groups[i] for i in b}) > 1 for b in batches) <= 1  # only the mixed leftover batch
    assert batches == [[i for i, _ in b] for b in s]  # same epoch -> same order
    s.set_epoch(1)
    epoch1 = [[i for i, e in b if e == 1] for b in s]
    assert epoch1 != batches and sorted(i for b in epoch1 for i in b) == list(range(11))
    s.set_epoch(1, start_batch=4)
    assert [[i for i, _ in b] for b in s] == epoch1[4:]
    ranks = [AspectRatioBatchSampler(group_ids=groups, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    seen = Counter(i for r in ranks for b in r for i, _ in b)
    assert set(seen) == set(range(11)) and sum(seen.values()) == 12  # padded to a multiple of world_size
    assert all(len(r) == 3 for r in ranks)


def test_loaders_and_resume(synth: Path) -> None:
    ds = build_dataset(DetectorConfig(), _run(synth), train=True)
    loader = build_train_loader(ds, 2, 0, 7)
    per_epoch = len(loader)
    assert per_epoch == 12
    stream = iterate_batches(loader)
    first = [(it, ep, [m["image_id"] for m in b[2]]) for it, ep, b in (next(stream) for _ in range(per_epoch + 3))]
    assert first[per_epoch][:2] == (per_epoch, 1)
    images, targets, metas = next(iterate_batches(loader))[2]
    assert all(img.dtype == torch.uint8 and img.shape[0] == 3 for img in images)
    assert len({int(img.shape[1] > img.shape[2]) for img in images}) == 1  # one aspect group per batch
    resumed = iterate_batches(build_train_loader(ds, 2, 0, 7), start_iter=per_epoch - 1)
    assert [(it, ep, [m["image_id"] for m in b[2]]) for it, ep, b in (next(resumed) for _ in range(4))] == first[per_epoch - 1:]
    state = torch.get_rng_state()
    list(build_test_loader(build_dataset(DetectorConfig(), _run(synth), train=False), 0))
    assert torch.equal(state, torch.get_rng_state())  # loaders leave the global RNG alone
    test = build_dataset(DetectorConfig(), _run(synth), train=False)
    ids = [[m["image_id"] for m in b[2]] for r in (0, 1) for b in build_test_loader(test, 0, rank=r, world_size=2)]
    assert all(len(b) == 1 for b in ids) and sorted(i for b in ids for i in b) == sorted(test.image_ids)


def test_train_loader_with_worker(synth: Path) -> None:
    ds = build_dataset(DetectorConfig(), _run(synth), train=True)
    with_worker = [[m["image_id"] for m in b[2]] for b in build_train_loader(ds, 2, 1, 0)]
    without = [[m["image_id"] for m in b[2]] for b in build_train_loader(ds, 2, 0, 0)]
    assert with_worker == without


def test_subset_annotations(synth: Path, tmp_path: Path) -> None:
    src = synth / "annotations/instances_train2017.json"
    out = tmp_path / "sub" / "person.json"
    summary = subset_annotations(src, out, categories=["person", "car"], max_images=5)
    data = json.loads(out.read_text())
    assert summary == {"ann_in": str(src), "out": str(out), "images": 5, "annotations": len(data["annotations"]),
                       "categories": ["person", "car"]}
    assert len(data["categories"]) == 80 and {a["category_id"] for a in data["annotations"]} <= {1, 3}
    ids = [im["id"] for im in data["images"]]
    assert ids == sorted(ids) and {a["image_id"] for a in data["annotations"]} == set(ids)
    again = tmp_path / "again.json"
    subset_annotations(src, again, categories=["person", "car"], max_images=5)
    assert again.read_bytes() == out.read_bytes()
    everything = subset_annotations(src, tmp_path / "all.json", categories=None, max_images=None)
    assert everything["images"] == 24
    with pytest.raises(DataError, match="unknown category 'cart'"):
        subset_annotations(src, tmp_path / "x.json", categories=["cart"], max_images=None)


@needs_coco128
def test_coco128_crowd_grayscale_and_filters() -> None:
    raw = json.loads((COCO128 / "annotations/instances_train2017.json").read_text())
    run = RunConfig(data_root=str(COCO128), val_ann=None, image_scale=SMALL, workers=0)
    train = build_dataset(DetectorConfig(), run, train=True)
    assert len(train) == 126  # the two images without annotations are filtered
    assert len(build_dataset(DetectorConfig(), run, train=False)) == 128
    crowd_images = {a["image_id"] for a in raw["annotations"] if a["iscrowd"]}
    total = 0
    for image_id in crowd_images:
        boxes, labels = train.annotations(image_id)
        usable = [a for a in raw["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        assert boxes.shape[0] == labels.shape[0] == len(usable)
        total += boxes.shape[0]
    assert total > 0
    gray = train[train.image_ids.index(86)][0]
    assert gray.shape[0] == 3 and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    person = build_dataset(replace(DetectorConfig(), num_classes=1, data=replace(DetectorConfig().data, classes=("person",))),
                           run, train=True)
    assert person.label_to_cat_id == [1]
    assert 0 < len(person) < 126 and all(person.annotations(i)[1].eq(0).all() for i in person.image_ids[:10])
    np.testing.assert_array_equal(train.group_ids()[:3], [int(train.coco.imgs[i]["width"] < train.coco.imgs[i]["height"])
                                                          for i in train.image_ids[:3]])
