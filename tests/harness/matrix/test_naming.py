"""harness.matrix.naming: v3 names from axes, and v2 / metafile / artifact spellings back to them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.matrix.naming import canonical as _canonical
from harness.matrix.naming import compose, is_safe_name, strip_artifact
from harness.matrix.parse import load_matrix


def canonical(name: str, aliases: dict[str, str] | None = None) -> str:
    """`naming.canonical` against the bundled matrix's alias table unless `aliases` is given."""
    return _canonical(name, load_matrix("faster_rcnn").aliases if aliases is None else aliases)

# A copy of ../shared/seed/faster_rcnn_README.md (MMDetection v3.3.0), so the tests run without shared/.
SEED = Path(__file__).resolve().parents[2] / "resources" / "faster_rcnn_README.md"


def test_compose_gives_every_regular_seed_name() -> None:
    spec = load_matrix("faster_rcnn")
    irregular = {"faster-rcnn_r50-caffe_c4-1x_coco": "faster-rcnn_r50-caffe-c4_1x_coco"}  # metafile Name
    for cell in spec.cells:
        assert compose(cell.axes) == irregular.get(cell.name, cell.name)


@pytest.mark.parametrize(
    ("axes", "name"),
    [
        ({}, "faster-rcnn_r50_fpn_1x_coco"),
        ({"backbone": "x101-64x4d", "schedule": "2x"}, "faster-rcnn_x101-64x4d_fpn_2x_coco"),
        ({"style": "caffe", "neck": "dc5", "schedule": "3x", "train_scale": "ms-choice"}, "faster-rcnn_r50-caffe-dc5_ms-3x_coco"),
        # the other multi-scale variant than MMDetection's convention is spelled out, so names stay unique
        ({"neck": "fpn", "schedule": "3x", "train_scale": "ms-choice"}, "faster-rcnn_r50_fpn_ms-choice-3x_coco"),
        ({"train_scale": "ms-range"}, "faster-rcnn_r50_fpn_ms-range-1x_coco"),
        ({"precision": "bf16", "loss": "giou"}, "faster-rcnn_r50_fpn_giou_bf16-1x_coco"),
        ({"classes": "person"}, "faster-rcnn_r50-imagenet-pre_fpn_1x_coco-person"),
        # the 2020 defaults (Q5) have no MMDetection name any more; the era prefixes the schedule
        ({"era": "jan-2020"}, "faster-rcnn_r50_fpn_jan-2020-1x_coco"),
        ({"era": "jan-2020", "precision": "amp"}, "faster-rcnn_r50_fpn_amp-jan-2020-1x_coco"),
    ],
)
def test_compose_grammar(axes: dict[str, str], name: str) -> None:
    assert compose(axes) == name


def test_canonical_maps_v2_metafile_and_artifacts() -> None:
    assert canonical("faster_rcnn_r50_fpn_1x_coco") == "faster-rcnn_r50_fpn_1x_coco"
    assert canonical("faster-rcnn_r50-caffe-c4_1x_coco") == "faster-rcnn_r50-caffe_c4-1x_coco"
    assert canonical("faster-rcnn_r50_fpn_fp16_1x_coco") == "faster-rcnn_r50_fpn_amp-1x_coco"
    assert canonical("faster_rcnn_r50_caffe_dc5_mstrain_3x_coco") == "faster-rcnn_r50-caffe-dc5_ms-3x_coco"
    assert canonical("faster-rcnn_r50_fpn_tnr-pretrain_1x_coco") == "faster-rcnn_r50-tnr-pre_fpn_1x_coco"
    assert canonical("faster_rcnn_r50_caffe_fpn_1x_coco_bbox_mAP-0.378_20200504_180032-c5925ee5.pth") == (
        "faster-rcnn_r50-caffe_fpn_1x_coco")
    assert canonical("faster_rcnn_r50_fpn_iou_1x_coco-fdd207f3.pth") == "faster-rcnn_r50_fpn_iou_1x_coco"
    assert canonical("configs/faster_rcnn/faster-rcnn_r101_fpn_ms-3x_coco.py") == "faster-rcnn_r101_fpn_ms-3x_coco"
    assert canonical("FASTER_RCNN_R50_FPN_2X_COCO") == "faster-rcnn_r50_fpn_2x_coco"
    assert canonical("mask-rcnn_r50_fpn_1x_coco") == "mask-rcnn_r50_fpn_1x_coco"  # unknown: unchanged
    assert canonical("a_b", {"a_b": "a-b"}) == "a-b"


def _link(text: str, line: str) -> str:
    match = re.search(rf"\[{text}\]\((.+?)\)", line)
    assert match is not None, (text, line)
    return match.group(1)


def test_every_seed_download_and_log_link_maps_to_its_row() -> None:
    text = SEED.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("|") and "[model](" in line]
    assert len(rows) == 31
    for line in rows:
        config, model, log = (_link(kind, line) for kind in ("config", "model", "log"))
        assert config.startswith("./") and config.endswith(".py")
        config = config[2:-3]
        assert canonical(model) == config, model
        assert canonical(log) == config, log


def test_strip_artifact_and_safe_names() -> None:
    assert strip_artifact("https://x/y/faster_rcnn_r50_fpn_1x_coco_20200130_204655.log.json") == "faster_rcnn_r50_fpn_1x_coco"
    assert strip_artifact("faster_rcnn_r50_fpn_1x_coco-person_20201216_175929-d022e227.pth") == (
        "faster_rcnn_r50_fpn_1x_coco-person")
    assert strip_artifact("faster-rcnn_r50_fpn_1x_coco") == "faster-rcnn_r50_fpn_1x_coco"
    assert is_safe_name("faster-rcnn_r50_fpn_1x_coco")
    for bad in ("", "../x", "a/b", ".hidden", "a..b", "a b"):
        assert not is_safe_name(bad)
