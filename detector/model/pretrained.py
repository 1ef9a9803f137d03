"""Published initialisation names -> local files (reference 1.5 "Pretrained-checkpoint URL mapping").

A recipe names its initialisation as MMDetection does (`torchvision://resnet50`,
`open-mmlab://detectron2/resnet50_caffe`); nothing is downloaded, so each name stands for a file the
user fetches and names with `--pretrained NAME=FILE`. No torch import: the harness checks these
names and files before any cell starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from detector.errors import WeightsError

BackboneKind = Literal["torchvision", "mmcv", "auto"]


@dataclass(frozen=True, kw_only=True)
class PretrainedFile:
    """Where a published initialisation name resolves to (`mmcv/model_zoo/open_mmlab.json`,
    `mmengine/hub/torchvision_0.12.json`). `alternates` are older file names of the same weights."""

    name: str
    file: str
    url: str
    kind: BackboneKind
    alternates: tuple[str, ...] = ()


_TV = "https://download.pytorch.org/models/"
_OMM = "https://download.openmmlab.com/pretrain/third_party/"


def _entry(name: str, base: str, file: str, *alternates: str) -> tuple[str, PretrainedFile]:
    kind: BackboneKind = "torchvision" if base == _TV else "mmcv"
    return name, PretrainedFile(name=name, file=file, url=base + file, kind=kind, alternates=alternates)


PRETRAINED: dict[str, PretrainedFile] = dict((
    # The 2020-era docs name resnet50-19c8e357 / resnet101-5d3b4d8f: the same IMAGENET1K_V1 weights (Q9).
    _entry("torchvision://resnet50", _TV, "resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    _entry("torchvision://resnet101", _TV, "resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth"),
    # TNR: faster-rcnn_r50-tnr-pre_fpn_1x_coco.py names this URL itself (IMAGENET1K_V2, reference 1.5).
    _entry("torchvision://resnet50_v2", _TV, "resnet50-11ad3fa6.pth"),
    _entry("open-mmlab://detectron2/resnet50_caffe", _OMM, "resnet50_msra-5891d200.pth"),
    _entry("open-mmlab://detectron2/resnet101_caffe", _OMM, "resnet101_msra-6cc46731.pth"),
    _entry("open-mmlab://detectron2/resnext101_32x8d", _OMM, "resnext101_32x8d-1516f1aa.pth"),
    _entry("open-mmlab://resnext101_32x4d", _OMM, "resnext101_32x4d-a5af3160.pth"),
    _entry("open-mmlab://resnext101_64x4d", _OMM, "resnext101_64x4d-ee2c6f71.pth"),
))


def pretrained_file(name: str) -> PretrainedFile:
    """The local file a published initialisation name stands for (WeightsError if unknown)."""
    if name not in PRETRAINED:
        raise WeightsError(f"unknown pretrained name {name!r}; allowed: {', '.join(PRETRAINED)}")
    return PRETRAINED[name]


def resolve_local(name: str, path: str | Path) -> Path:
    """The file to load for `name`: `path` itself if it is a file, else the expected file (or an
    older name of it) inside the folder `path`."""
    entry = pretrained_file(name)
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for fname in (entry.file, *entry.alternates):
            if (p / fname).is_file():
                return p / fname
    raise WeightsError(
        f"{p}: no weights for {name}: expected the file {entry.file} (or a folder holding it); "
        f"it is published at {entry.url} and must be fetched by the user (nothing is downloaded)"
    )


__all__ = ["PRETRAINED", "BackboneKind", "PretrainedFile", "pretrained_file", "resolve_local"]
