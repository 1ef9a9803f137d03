"""A run's data root: where it is, that it holds COCO 2017, and its splits validated once.

`--data ROOT`, else the profile's data path, else a synthetic set generated once under
`<runs>/_data/`; then `check_data` validates the train split (and val2017 when present) before any
cell starts, and `DataCheck.fit` sizes or checks each cell's categories against the file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from detector.api import DatasetReport, DetectorConfig, check_classes, validate_split
from harness.errors import UserError
from harness.matrix.spec import MatrixSpec, Profile

TRAIN_ANN = "annotations/instances_train2017.json"
TRAIN_IMAGES = "train2017"
VAL_ANN = "annotations/instances_val2017.json"
VAL_IMAGES = "val2017"



def check_coco_root(root: Path, what: str, *, need: str = "train") -> Path:
    """`root` made absolute, if it holds what is needed; UserError naming what is missing.

    need="train": the train split (training runs); need="eval": a split to evaluate on, val2017
    preferred, else train2017 (`harness verify` needs no 18 GB train split).
    """
    root = Path(root).expanduser().resolve()
    holds = f"a COCO-2017 root holds {TRAIN_ANN} and {TRAIN_IMAGES}/"
    if need == "eval":
        holds = f"a COCO-2017 root to evaluate on holds {VAL_ANN} and {VAL_IMAGES}/ (or {TRAIN_ANN} and {TRAIN_IMAGES}/)"
    if not root.is_dir():
        raise UserError(f"{what} {root}: no such folder; {holds}")
    splits = [(TRAIN_ANN, TRAIN_IMAGES)] if need == "train" else [(VAL_ANN, VAL_IMAGES), (TRAIN_ANN, TRAIN_IMAGES)]
    for ann, images in splits:
        if (root / ann).is_file() and (root / images).is_dir():
            return root
    ann, images = splits[0]
    missing = [ann] if not (root / ann).is_file() else []
    missing += [f"{images}/"] if not (root / images).is_dir() else []
    raise UserError(f"{what} {root}: missing {' and '.join(missing)} ({holds})")


def synthetic_root(runs_dir: Path, *, images: int, seed: int, size: tuple[int, int] | None = None) -> Path:
    """The synthetic COCO set for (images, seed), generated once under `<runs>/_data/` and reused.

    Generated into a temporary folder and renamed into place under a lock, so a second runner
    never sees half a dataset and never generates it twice.
    """
    from detector.api import make_synthetic_coco

    base = Path(runs_dir) / "_data"
    base.mkdir(parents=True, exist_ok=True)
    root = base / (f"synthetic-{images}-s{seed}" + (f"-{size[0]}x{size[1]}" if size else ""))
    with open(base / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (root / TRAIN_ANN).is_file():
            return root
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=base))
        try:
            if size:
                make_synthetic_coco(tmp, images=images, seed=seed, size=size)
            else:
                make_synthetic_coco(tmp, images=images, seed=seed)
            shutil.rmtree(root, ignore_errors=True)  # a leftover without annotations
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def dataset_root(
    matrix: MatrixSpec, profile: Profile, *, data: str | None, runs_dir: Path, seed: int, log: Callable[[str], None]
) -> Path:
    """The data root of a run: `--data`, else the profile's path, else the generated synthetic set."""
    if data:
        return check_coco_root(Path(data), "--data")
    data_root = profile.data_root(None)  # UserError for a profile without data ("none")
    if data_root == "synthetic":
        t0 = time.monotonic()
        root = synthetic_root(runs_dir, images=profile.synth_images, seed=seed, size=profile.synth_size)
        if time.monotonic() - t0 > 1.0:
            took = time.monotonic() - t0
            log(f"generated the synthetic set ({profile.synth_images} images, seed {seed}) in {took:.1f} s")
        return root
    path = Path(data_root).expanduser()
    if not path.is_absolute():
        path = Path(matrix.path).parent / path
    return check_coco_root(path, f"profile {profile.name!r} data (use --data ROOT to point at COCO 2017):")


@dataclass(frozen=True, kw_only=True)
class DataCheck:
    """The validated splits of a run's data root (`check_data`), what cells are fitted against."""

    train: DatasetReport
    val: DatasetReport | None

    def fit(self, cell: str, cfg: DetectorConfig, *, from_dataset: bool) -> DetectorConfig:
        """`cfg` trained on the file's own categories (`from_dataset`), else checked against them."""
        if from_dataset:
            names = tuple(name for _id, name in sorted(self.train.categories))  # id order
            return dataclasses.replace(cfg, num_classes=len(names), data=dataclasses.replace(cfg.data, classes=names))
        for split in (self.train, self.val):
            if split is not None:
                check_classes(split, cell=cell, classes=cfg.data.classes, num_classes=cfg.num_classes)
        return cfg

    def trained(self, cfg: DetectorConfig) -> tuple[str, ...]:
        """The category names `cfg` trains on this data, in label order: its own list, else the file's
        categories in id order (how `detector.data.coco` labels them when the recipe names none)."""
        return tuple(cfg.data.classes) or tuple(name for _id, name in sorted(self.train.categories))

    def notes_for(self, cfg: DetectorConfig) -> tuple[str, ...]:
        """The run's data notes for result.json: repairs, drops, and the categories trained."""
        notes = [f"data: {n}" for split in (self.train, self.val) if split is not None for n in split.notes]
        if cfg.data.classes and len(cfg.data.classes) == len(self.train.categories) and set(cfg.data.classes) == set(
            self.train.category_names
        ):
            notes.append(f"data: trained on the dataset's own {len(cfg.data.classes)} categories: {', '.join(cfg.data.classes)}")
        return tuple(notes)


def check_data(data_root: Path, *, log: Callable[[str], None]) -> DataCheck:
    """Validate the train split (and val2017 when present) once, before any cell starts."""
    t0 = time.monotonic()
    train = validate_split(data_root / TRAIN_ANN, data_root / TRAIN_IMAGES)
    has_val = (data_root / VAL_ANN).is_file() and (data_root / VAL_IMAGES).is_dir()
    val = validate_split(data_root / VAL_ANN, data_root / VAL_IMAGES) if has_val else None
    took = time.monotonic() - t0
    counted = f"{train.images} train images" + (f", {val.images} val images" if val else "")
    log(f"data checked in {took:.1f} s: {counted}, {len(train.categories)} categories")
    for split in (train, val):
        for note in split.notes if split else ():
            log(f"data: {note}")
    return DataCheck(train=train, val=val)


__all__ = [
    "TRAIN_ANN", "TRAIN_IMAGES", "VAL_ANN", "VAL_IMAGES", "DataCheck", "check_coco_root", "check_data",
    "dataset_root", "synthetic_root",
]  # fmt: skip
