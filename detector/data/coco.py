"""COCO detection dataset, aspect-ratio grouped sampling and loaders (reference section 1.3).

Shorthand: an item is `(image, target, meta)`:
    image:  uint8 `[3, H, W]` RGB, already resized (and maybe flipped) by `detector.data.transforms`;
            `collate` turns it into the float `[0, 255]` tensor the model takes.
    target: {"boxes": float32 `[N, 4]` x1y1x2y2 in the resized image, "labels": int64 `[N]` in
            [0, num_classes)}; crowd boxes are left out (mmdet ignores them for Faster R-CNN).
    meta:   {"image_id", "orig_size" (h, w), "img_size" (h', w'), "scale_factor" (w', h' ratios),
            "flipped", "index", "epoch"}.

Category handling follows mmdet `CocoDataset`: `classes` (names) select categories; labels are
contiguous in the order of the file's category list (pycocotools `getCatIds(catNms=...)`), and
`label_to_cat_id[label]` maps back. Training filters are `filter_cfg=dict(filter_empty_gt=True,
min_size=32)` exactly as mmdet v3 `CocoDataset.filter_data` applies them (see `_train_filter`).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from detector.config import DetectorConfig, RunConfig
from detector.data.transforms import DetTransform, build_transform
from detector.errors import DataError
from detector.jsonio import read_json, write_json_atomic

Item = tuple[Tensor, dict[str, Tensor], dict[str, Any]]
Batch = tuple[list[Tensor], list[dict[str, Tensor]], list[dict[str, Any]]]


def load_coco(ann_file: Path, *, drop_segmentation: bool = False) -> COCO:
    """A pycocotools `COCO` index of `ann_file`, checked for consistency, with pycocotools' prints silenced.

    `drop_segmentation=True` removes the masks (most of a COCO file's size), which box training
    and box evaluation never read; datasets do so to keep worker processes small.

    Raises:
        DataError (naming the file): missing / invalid JSON, missing top-level keys, duplicate image
        or annotation ids, annotations whose `image_id` or `category_id` is not declared, or whose
        `bbox` is not 4 numbers.
    """
    data = read_json(ann_file, "annotation file")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise DataError(f"annotation file {ann_file}: expected a COCO object with lists 'images', 'annotations', 'categories'")
    try:
        image_ids = [im["id"] for im in data["images"]]
        cat_ids = {c["id"] for c in data["categories"]}
        sizes_ok = all(int(im["width"]) > 0 and int(im["height"]) > 0 for im in data["images"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"annotation file {ann_file}: malformed image or category entry ({exc!r})") from None
    if not sizes_ok:
        raise DataError(f"annotation file {ann_file}: every image needs a positive 'width' and 'height'")
    known = set(image_ids)
    if len(known) != len(image_ids):
        raise DataError(f"annotation file {ann_file}: duplicate image ids")
    ann_ids = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise DataError(f"annotation file {ann_file}: each annotation must be an object, got {ann!r}")
        where = f"annotation file {ann_file}: annotation {ann.get('id')!r}"
        if ann.get("image_id") not in known:
            raise DataError(f"{where} refers to image id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            raise DataError(f"{where} refers to category id {ann.get('category_id')!r}, which is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{where}: 'bbox' must be [x, y, w, h], got {bbox!r}")
        if ann.get("id") in ann_ids:
            raise DataError(f"{where}: duplicate annotation id")
        ann_ids.add(ann.get("id"))
        # Repairs `detector.data.validate` reports before training: pycocotools' evaluation reads both.
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(bbox[2]) * float(bbox[3])
        if drop_segmentation:
            ann.pop("segmentation", None)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_image(path: Path, *, context: str = "") -> Tensor:
    """The image file as uint8 [3, H, W] RGB (grayscale, palette, CMYK and RGBA converted as cv2 'color' does)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now so a truncated file fails here, with its path
            rgb = img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path}: file not found" + (f" ({context})" if context else "")) from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"image {path}: cannot decode ({exc})") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def select_categories(coco: COCO, classes: Sequence[str], source: Path | str) -> list[int]:
    """COCO category ids for `classes` (all if empty), in the file's order as mmdet gets them."""
    all_cats = coco.dataset["categories"]
    if not classes:
        return [c["id"] for c in all_cats]
    names = [c["name"] for c in all_cats]
    unknown = [n for n in classes if n not in names]
    if unknown:
        raise DataError(f"annotation file {source}: unknown category {unknown[0]!r}; allowed: {', '.join(names)}")
    return [c["id"] for c in all_cats if c["name"] in classes]


class CocoDetection(Dataset[Item]):
    """A COCO-style detection split (see the module docstring for items and categories).

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder holding the images' `file_name`s.
        transform: the train or test pipeline (`detector.data.transforms.build_transform`).
        classes: category names to keep (empty: all categories of the file).
        train: apply the training filters (test mode keeps every image, as mmdet `test_mode`).
        filter_empty_gt / min_size: mmdet `filter_cfg` (reference 1.3: True / 32).
        seed: base seed of the per-item augmentation generator.
        max_images: keep only the first N images (file order) after filtering, e.g. for quick evals.
    """

    def __init__(self, *, ann_file: Path, image_dir: Path, transform: DetTransform, classes: Sequence[str] = (),
                 train: bool, filter_empty_gt: bool = True, min_size: int = 32, seed: int = 0,
                 max_images: int | None = None) -> None:
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir}: not found (annotations: {self.ann_file})")
        self.coco = load_coco(self.ann_file, drop_segmentation=True)
        self.transform, self.train, self.seed = transform, train, seed
        self.cat_ids: list[int] = select_categories(self.coco, classes, self.ann_file)
        self.cat_id_to_label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        ids = [im["id"] for im in self.coco.dataset["images"]]
        if train:
            ids = self._train_filter(ids, filter_empty_gt, min_size)
        self.image_ids: list[int] = ids[:max_images] if max_images is not None else ids
        self.split = self.image_dir.name

    def _train_filter(self, ids: list[int], filter_empty_gt: bool, min_size: int) -> list[int]:
        # mmdet v3 CocoDataset.filter_data (same as v2 _filter_imgs): an image is dropped when it has
        # no annotation of the selected categories -- crowd annotations count, as `cat_img_map` holds
        # them -- and when min(width, height) from the JSON is below min_size: min_size is about the
        # *image*, not the boxes. Images whose only boxes are crowd or degenerate therefore stay and
        # train with an empty target, as in mmdet.
        with_cat = set()
        for cid in self.cat_ids:
            with_cat.update(self.coco.catToImgs.get(cid, []))
        keep = []
        for image_id in ids:
            info = self.coco.imgs[image_id]
            if filter_empty_gt and image_id not in with_cat:
                continue
            if min(info["width"], info["height"]) >= min_size:
                keep.append(image_id)
        return keep

    @property
    def label_to_cat_id(self) -> list[int]:
        return list(self.cat_ids)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def group_ids(self) -> list[int]:
        """Aspect group of each item from the JSON sizes: 0 if w >= h, 1 if w < h (mmdet AspectRatioBatchSampler)."""
        return [int(self.coco.imgs[i]["width"] < self.coco.imgs[i]["height"]) for i in self.image_ids]

    def annotations(self, image_id: int) -> tuple[Tensor, Tensor]:
        """Usable (non-crowd) boxes [N, 4] x1y1x2y2 float32 and labels [N] int64 of one image.

        Mirrors mmdet `CocoDataset.parse_data_info`: skip `ignore`, boxes whose intersection with the
        image is empty, `area <= 0`, w < 1 or h < 1, and categories not selected. Boxes are not
        clipped here (the resize clips them). Crowd boxes become mmdet "ignored instances", which
        Faster R-CNN never uses (ignore_iof_thr = -1), so they are simply left out.
        """
        info = self.coco.imgs[image_id]
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("ignore", False) or ann.get("iscrowd", 0):
                continue
            x1, y1, w, h = (float(v) for v in ann["bbox"])
            inter_w = max(0.0, min(x1 + w, info["width"]) - max(x1, 0.0))
            inter_h = max(0.0, min(y1 + h, info["height"]) - max(y1, 0.0))
            if inter_w * inter_h == 0 or ann.get("area", w * h) <= 0 or w < 1 or h < 1:
                continue
            label = self.cat_id_to_label.get(ann["category_id"])
            if label is None:
                continue
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(label)
        return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64))

    def load_image(self, image_id: int) -> Tensor:
        """The image as uint8 [3, H, W] RGB (`read_image`)."""
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        return read_image(path, context=f"image id {image_id} in {self.ann_file}")

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        """`key` is an index, or (index, epoch) as `AspectRatioBatchSampler` yields it.

        The augmentation generator is seeded by (seed, epoch, index): the same seed gives the
        same scales and flips whatever the worker count or rank.
        """
        index, epoch = (int(key), 0) if isinstance(key, (int, np.integer)) else key
        image_id = self.image_ids[index]
        image = self.load_image(image_id)
        boxes, labels = self.annotations(image_id)
        rng = np.random.default_rng([self.seed, epoch, index]) if self.transform.random else None
        orig_size = (int(image.shape[1]), int(image.shape[2]))
        image, boxes, tmeta = self.transform(image, boxes, rng)
        meta = {"image_id": image_id, "orig_size": orig_size, "index": index, "epoch": epoch, **tmeta}
        return image, {"boxes": boxes, "labels": labels}, meta


def build_dataset(cfg: DetectorConfig, run: RunConfig, *, train: bool) -> CocoDetection:
    """The train split, or the evaluation split (val when `run.val_ann` exists, else train in test mode)."""
    root = Path(run.data_root)
    if not root.is_dir():
        raise DataError(f"data root {root}: folder not found")
    ann, images = run.train_ann, run.train_images
    if not train and run.val_ann is not None and run.val_images is not None and (root / run.val_ann).is_file():
        ann, images = run.val_ann, run.val_images
    return CocoDetection(
        ann_file=root / ann, image_dir=root / images, classes=cfg.data.classes, train=train,
        transform=build_transform(cfg.data, train=train, image_scale=run.image_scale),
        filter_empty_gt=cfg.data.filter_empty_gt, min_size=cfg.data.min_size, seed=run.seed,
        max_images=None if train else run.eval_max_images,
    )


def collate(batch: Sequence[Item]) -> Batch:
    """List of items -> (images as uint8 [3, H, W], targets, metas); sizes may differ. The images stay
    uint8 (the model normalises them in float32 on its device): a quarter of the bytes to pin and to
    copy to a GPU, and no float conversion in the loader."""
    return ([img for img, _, _ in batch], [t for _, t, _ in batch], [m for _, _, m in batch])


class AspectRatioBatchSampler(Sampler[list[tuple[int, int]]]):
    """mmengine `DefaultSampler(shuffle=True, round_up=True)` + mmdet `AspectRatioBatchSampler`.

    Each epoch: a permutation from `torch.Generator().manual_seed(seed + epoch)`, padded by
    repetition to a multiple of `world_size`, this rank's slice `[rank::world_size]`; then
    indices are bucketed by aspect group and a batch is emitted when a bucket is full; leftovers
    of both buckets are mixed at the end. Yields lists of (index, epoch).
    `set_epoch(epoch, start_batch)` picks the epoch and skips its first `start_batch` batches
    (resume) without loading them.
    """

    def __init__(self, *, group_ids: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = False) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler setup: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if not group_ids:
            raise DataError("the training set is empty after filtering (no image with annotations of the selected classes)")
        self.group_ids, self.batch_size, self.seed = list(group_ids), batch_size, seed
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        self.num_samples = math.ceil(len(self.group_ids) / world_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        n = len(self.group_ids)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self.num_samples * self.world_size
        order = (order * (total // n + 1))[:total]
        return order[self.rank:total:self.world_size]

    def _batches(self) -> Iterator[list[int]]:
        buckets: list[list[int]] = [[], []]
        for idx in self._indices():
            bucket = buckets[self.group_ids[idx]]
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        left = buckets[0] + buckets[1]
        while left:
            if len(left) <= self.batch_size:
                if len(left) == self.batch_size or not self.drop_last:
                    yield left
                return
            yield left[:self.batch_size]
            left = left[self.batch_size:]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for i, batch in enumerate(self._batches()):
            if i >= self.start_batch:
                yield [(idx, self.epoch) for idx in batch]

    def __len__(self) -> int:
        """Batches in a full epoch (before `start_batch` skipping)."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)


def build_train_loader(dataset: CocoDetection, images_per_gpu: int, workers: int, seed: int, rank: int = 0,
                       world_size: int = 1, *, pin_memory: bool = False) -> DataLoader[Item]:
    """Training loader of one rank: shuffled, aspect-grouped batches of `images_per_gpu` (reference 1.3)."""
    sampler = AspectRatioBatchSampler(group_ids=dataset.group_ids(), batch_size=images_per_gpu, seed=seed,
                                      rank=rank, world_size=world_size)
    # An own generator: creating a DataLoader iterator draws the workers' base seed from it, and
    # without one that draw would consume the global torch RNG the RPN / RoI samplers use.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      persistent_workers=workers > 0, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def build_test_loader(dataset: CocoDetection, workers: int, rank: int = 0, world_size: int = 1) -> DataLoader[Item]:
    """Batch-1 loader in dataset order; with world_size > 1 rank r gets items r, r + W, ... (no padding,
    so gathering every rank's results gives each image exactly once)."""
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=1, sampler=indices, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0))


def iterate_batches(loader: DataLoader[Item], *, start_iter: int = 0) -> Iterator[tuple[int, int, Batch]]:
    """Yield (iteration, epoch, batch) forever, starting at iteration `start_iter` (resume).

    An epoch is `len(loader.batch_sampler)` iterations; the batch sampler is told the epoch (new
    shuffle) and, on resume, how many batches of that epoch to skip.
    """
    sampler = loader.batch_sampler
    if not isinstance(sampler, AspectRatioBatchSampler):
        raise TypeError("iterate_batches needs a loader from build_train_loader")
    epoch, skip = divmod(start_iter, len(sampler))
    it = start_iter
    while True:
        sampler.set_epoch(epoch, start_batch=skip)
        for batch in loader:
            yield it, epoch, batch
            it += 1
        epoch, skip = epoch + 1, 0


def subset_annotations(ann_in: Path, out: Path, *, categories: list[str] | None, max_images: int | None) -> dict[str, Any]:
    """Write a deterministic subset of a COCO annotation file (`harness data subset`).

    Keeps the annotations of `categories` (all when None) and the images that have at least one of
    them (all images when None), then the first `max_images` of those by image id. The category
    list is kept whole, so label mapping and `classes=` selection work on the subset as on the
    original. Returns a summary: {"ann_in", "out", "images", "annotations", "categories"}.
    """
    out = Path(out)
    if str(out).endswith(("/", "\\")) or out.is_dir():
        raise DataError(f"--out {out}: is a folder; give the file to write, e.g. {out / 'instances_train2017.json'}")
    if out.exists() and out.resolve() == Path(ann_in).resolve():
        raise DataError(f"--out {out}: is the input annotation file; the subset never overwrites its source")
    if out.exists():
        raise DataError(f"--out {out}: exists; the subset never overwrites a file (give a new name, or delete it first)")
    coco = load_coco(ann_in)
    data = coco.dataset
    if max_images is not None and max_images < 1:
        raise DataError(f"max_images must be >= 1, got {max_images}")
    cat_ids = set(select_categories(coco, categories or (), ann_in))
    anns = [a for a in data["annotations"] if a["category_id"] in cat_ids]
    with_ann = {a["image_id"] for a in anns}
    images = sorted((im for im in data["images"] if categories is None or im["id"] in with_ann), key=lambda im: im["id"])
    if max_images is not None:
        images = images[:max_images]
    kept = {im["id"] for im in images}
    anns = sorted((a for a in anns if a["image_id"] in kept), key=lambda a: a["id"])
    subset = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    subset.update(images=images, annotations=anns)
    write_json_atomic(out, subset)
    names = [c["name"] for c in data["categories"] if c["id"] in cat_ids]
    return {"ann_in": str(ann_in), "out": str(out), "images": len(images), "annotations": len(anns), "categories": names}


__all__ = [
    "AspectRatioBatchSampler", "CocoDetection", "DataError", "build_dataset", "build_test_loader",
    "build_train_loader", "collate", "iterate_batches", "load_coco", "read_json", "select_categories",
    "subset_annotations",
]
