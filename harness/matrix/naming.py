"""Cell names: compose MMDetection v3 config names from axes, and map other spellings back to them.

Grammar of a composed name (MMDetection v3 config stems, reference 1.1):

    faster-rcnn_{backbone}[-caffe][{pretrain}][-c4|-dc5][_fpn][_{loss}]_{[amp-|bf16-][ms-]schedule}_coco[-{classes}]

* `-caffe` for `style: caffe`; `-c4` / `-dc5` join the backbone segment, FPN is its own `_fpn`.
* pretrain: nothing for the implied one (ImageNet for COCO, the caffe ms-3x COCO checkpoint for the
  COCO-subset finetunes), `-tnr-pre` for TNR, else `-{pretrain}-pre`.
* loss: nothing for L1 (the v3 default), else `_{loss}` (`_iou`, `_giou`, `_bounded-iou`).
* train scale: `ms-` is MMDetection's meaning of the word for that recipe: the 640-800 range of
  `common/ms_3x_coco.py` for FPN 3x, the six-value choice everywhere else (reference 1.4, 1.5);
  the other variant is spelled out (`ms-range-1x`, `ms-choice-3x`) so names stay unique.

The one irregular v3 stem, `faster-rcnn_r50-caffe_c4-1x_coco`, is given explicitly in the matrix.

Other spellings (v2 config names, v3 metafile `Name`s, weight / log file names, URLs) are mapped to
cell names by `canonical` through an alias table; the table of a matrix comes from its `cells:`
`aliases` (see `harness.matrix.spec.MatrixSpec.aliases`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from detector.api import DEFAULT_AXES

# Names become folder names under runs/: letters, digits, '.', '_', '-'; no leading dot, no '..'.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Suffixes that artifact file names add to a config stem (gather_models.py, reference 4.1):
# `_bbox_mAP-0.378_20200504_180032-c5925ee5`, `_20200130-047c8118`, `_20200504_180032`, `-fdd207f3`.
_EXTENSIONS = (".log.json", ".json", ".pth", ".pt", ".py", ".yaml", ".yml")
_MAP_SUFFIX = re.compile(r"_bbox_mAP-[0-9.]+.*$")
_DATE_SUFFIX = re.compile(r"_20\d{6}(_\d{6})?(-[0-9a-f]{8})?$")
_HASH_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def is_safe_name(name: str) -> bool:
    """Whether `name` can be used as one path component (no separators, no '..', no leading dot)."""
    return bool(_SAFE_NAME.match(name)) and ".." not in name


def compose(axes: Mapping[str, str]) -> str:
    """The MMDetection v3 config name of a cell.

    Args:
        axes: axis -> value (detector.recipes.AXES); missing axes take their default.

    Returns:
        e.g. `faster-rcnn_r50_fpn_1x_coco`, `faster-rcnn_r50-caffe-dc5_ms-3x_coco`,
        `faster-rcnn_r50_fpn_amp-1x_coco`, `faster-rcnn_r50-caffe_fpn_ms-1x_coco-person`.
    """
    a = {**DEFAULT_AXES, **axes}
    backbone = a["backbone"] + ("-caffe" if a["style"] == "caffe" else "")
    implied_pretrain = "coco-caffe-ms-3x" if a["classes"] in ("person", "person-bicycle-car") else "imagenet"
    if a["pretrain"] == "tnr":
        backbone += "-tnr-pre"
    elif a["pretrain"] != implied_pretrain:
        backbone += f"-{a['pretrain']}-pre"
    parts = ["faster-rcnn"]
    if a["neck"] == "fpn":
        parts += [backbone, "fpn"]
    else:
        parts.append(f"{backbone}-{a['neck']}")
    if a["loss"] != "l1":
        parts.append(a["loss"])
    schedule = a["schedule"]
    if a["train_scale"] != "single":
        conventional = "ms-range" if (a["neck"] == "fpn" and schedule == "3x") else "ms-choice"
        prefix = "ms" if a["train_scale"] == conventional else a["train_scale"]
        schedule = f"{prefix}-{schedule}"
    if a["era"] != "current":
        schedule = f"{a['era']}-{schedule}"  # not an MMDetection name: those configs exist no more
    if a["precision"] != "fp32":
        schedule = f"{a['precision']}-{schedule}"
    parts.append(schedule)
    # classes dataset: the user's own categories, not COCO's; the suffix says so.
    parts.append({"coco": "coco", "dataset": "dataset"}.get(a["classes"], f"coco-{a['classes']}"))
    return "_".join(parts)


def strip_artifact(name: str) -> str:
    """Reduce a file name, path or URL of a config / weight / log to its stem.

    `.../faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth` -> `faster_rcnn_r50_fpn_1x_coco`.
    """
    stem = name.strip().rstrip("/").rsplit("/", 1)[-1]
    for ext in _EXTENSIONS:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    stem = _MAP_SUFFIX.sub("", stem)
    stem = _DATE_SUFFIX.sub("", stem)
    return _HASH_SUFFIX.sub("", stem)


def canonical(name: str, aliases: Mapping[str, str]) -> str:
    """Map any known spelling of a cell to its v3 cell name.

    Args:
        name: a cell name, alias (v2 config name, metafile Name), or an artifact file name / URL.
        aliases: alias -> cell name (cell names map to themselves): `MatrixSpec.aliases`.

    Returns:
        The cell name, or the stripped `name` unchanged when no alias matches (callers check
        membership and raise their own error).
    """
    for candidate in (name, strip_artifact(name)):
        if candidate in aliases:
            return aliases[candidate]
    lowered = {key.lower(): value for key, value in aliases.items()}
    stem = strip_artifact(name).lower()
    return lowered.get(stem, strip_artifact(name))


__all__ = ["canonical", "compose", "is_safe_name", "strip_artifact"]
