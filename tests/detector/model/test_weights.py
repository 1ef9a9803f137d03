"""detector.model.weights: published key layouts -> our model, fit errors, class order, initialise().

The checkpoint layouts here are written from the *published* architecture descriptions (mmdet
`ResNet.arch_settings`, `FPN`, `RPNHead`, `Shared2FCBBoxHead`, `shared_heads.ResLayer`) and the key
names seen in published files / mmcv load logs (open-mmlab/mmdetection#1316, #3823, #7960), never
from our own `model.state_dict()`. Every tensor gets distinct random values, so "loaded" means
"this exact file value landed under this exact name".
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from detector import recipes
from detector.config import BackboneConfig, DetectorConfig, RunConfig
from detector.errors import WeightsError
from detector.model.backbones import ResNet
from detector.model.faster_rcnn import build_detector
from detector.model.pretrained import PRETRAINED, pretrained_file, resolve_local
from detector.model.weights import initialise, load_backbone, load_detector, read_checkpoint

# mmdet v2 `CocoDataset.CLASSES` / v3 `METAINFO["classes"]`: COCO category names in id order.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)

# The non-backbone keys of faster_rcnn_r50_fpn_1x_coco as mmcv lists them (mmdetection#7960 log,
# minus its GN variant's norm keys), written out literally.
PUBLISHED_R50_FPN_HEAD_KEYS = (
    "neck.lateral_convs.0.conv.weight", "neck.lateral_convs.0.conv.bias",
    "neck.lateral_convs.1.conv.weight", "neck.lateral_convs.1.conv.bias",
    "neck.lateral_convs.2.conv.weight", "neck.lateral_convs.2.conv.bias",
    "neck.lateral_convs.3.conv.weight", "neck.lateral_convs.3.conv.bias",
    "neck.fpn_convs.0.conv.weight", "neck.fpn_convs.0.conv.bias",
    "neck.fpn_convs.1.conv.weight", "neck.fpn_convs.1.conv.bias",
    "neck.fpn_convs.2.conv.weight", "neck.fpn_convs.2.conv.bias",
    "neck.fpn_convs.3.conv.weight", "neck.fpn_convs.3.conv.bias",
    "rpn_head.rpn_conv.weight", "rpn_head.rpn_conv.bias",
    "rpn_head.rpn_cls.weight", "rpn_head.rpn_cls.bias",
    "rpn_head.rpn_reg.weight", "rpn_head.rpn_reg.bias",
    "roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.fc_cls.bias",
    "roi_head.bbox_head.fc_reg.weight", "roi_head.bbox_head.fc_reg.bias",
    "roi_head.bbox_head.shared_fcs.0.weight", "roi_head.bbox_head.shared_fcs.0.bias",
    "roi_head.bbox_head.shared_fcs.1.weight", "roi_head.bbox_head.shared_fcs.1.bias",
)
# Backbone keys as printed in mmdetection#1316 (a v1/v2 R-50 detector checkpoint).
PUBLISHED_R50_BACKBONE_SAMPLE = (
    "backbone.conv1.weight", "backbone.bn1.weight", "backbone.bn1.bias", "backbone.bn1.running_mean",
    "backbone.bn1.running_var", "backbone.bn1.num_batches_tracked", "backbone.layer1.0.conv1.weight",
    "backbone.layer1.0.conv2.weight", "backbone.layer1.0.bn1.weight", "backbone.layer1.0.bn3.running_var",
    "backbone.layer1.0.downsample.0.weight", "backbone.layer1.0.downsample.1.weight",
    "backbone.layer1.0.downsample.1.num_batches_tracked", "backbone.layer1.1.conv1.weight",
)
# Unused by mmdet's C4 trunk when loading detectron2/resnet50_caffe (mmdetection#3823 log).
PUBLISHED_MSRA_SAMPLE = (
    "layer4.0.downsample.0.weight", "layer4.0.downsample.1.bias", "layer4.0.downsample.1.running_mean",
    "layer4.0.conv1.weight", "layer4.0.bn1.running_var", "layer4.2.conv3.weight", "conv1.bias",
)

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------------
# Published layouts, from the architecture descriptions
# --------------------------------------------------------------------------------------------------
def resnet_layout(*, depth: int = 50, groups: int = 1, base_width: int = 64, stages: tuple[int, ...] = (1, 2, 3, 4),
                  tracked: bool = True, stem: bool = True) -> dict[str, Shape]:
    """mmdet `ResNet` / `ResNeXt` keys: `arch_settings` {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)},
    planes 64 * 2**i, expansion 4, ResNeXt width floor(planes * base_width / 64) * groups,
    downsample = Sequential(conv 1x1, BN) on the first block of a stage."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    out: dict[str, Shape] = {}

    def bn(name: str, c: int) -> None:
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{p}"] = (c,)
        if tracked:
            out[f"{name}.num_batches_tracked"] = ()

    if stem:
        out["conv1.weight"] = (64, 3, 7, 7)
        bn("bn1", 64)
    inplanes = 64
    for s in range(1, 5):
        planes = 64 * 2 ** (s - 1)
        width = planes if groups == 1 else planes * base_width // 64 * groups
        for b in range(blocks[s - 1]):
            cin = inplanes if b == 0 else planes * 4
            if s in stages:
                p = f"layer{s}.{b}"
                out[f"{p}.conv1.weight"] = (width, cin, 1, 1)
                bn(f"{p}.bn1", width)
                out[f"{p}.conv2.weight"] = (width, width // groups, 3, 3)
                bn(f"{p}.bn2", width)
                out[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
                bn(f"{p}.bn3", planes * 4)
                if b == 0:
                    out[f"{p}.downsample.0.weight"] = (planes * 4, cin, 1, 1)
                    bn(f"{p}.downsample.1", planes * 4)
        inplanes = planes * 4
    return out


def faster_rcnn_fpn_layout(*, num_classes: int = 80, **backbone: int) -> dict[str, Shape]:
    """faster-rcnn_r50_fpn: FPN(256, 4 laterals), RPNHead(256, 3 anchors), Shared2FCBBoxHead(1024)."""
    out = {f"backbone.{k}": v for k, v in resnet_layout(**backbone).items()}
    for i, c in enumerate((256, 512, 1024, 2048)):
        out[f"neck.lateral_convs.{i}.conv.weight"], out[f"neck.lateral_convs.{i}.conv.bias"] = (256, c, 1, 1), (256,)
    for i in range(4):
        out[f"neck.fpn_convs.{i}.conv.weight"], out[f"neck.fpn_convs.{i}.conv.bias"] = (256, 256, 3, 3), (256,)
    out.update(_rpn(256, 3))
    h = "roi_head.bbox_head"
    out.update({f"{h}.shared_fcs.0.weight": (1024, 256 * 7 * 7), f"{h}.shared_fcs.0.bias": (1024,),
                f"{h}.shared_fcs.1.weight": (1024, 1024), f"{h}.shared_fcs.1.bias": (1024,)})
    out.update(_predictors(num_classes, 1024))
    return out


def faster_rcnn_c4_layout() -> dict[str, Shape]:
    """faster-rcnn_r50-caffe-c4 (reference 1.6): 3-stage trunk, RPN on C4 (1024, 15 anchors),
    `shared_head` = ResLayer stage 3 (`layer4`), `BBoxHead(with_avg_pool=True, in 2048)`."""
    out = {f"backbone.{k}": v for k, v in resnet_layout(stages=(1, 2, 3)).items()}
    out.update(_rpn(1024, 15))
    out.update({f"roi_head.shared_head.{k}": v for k, v in resnet_layout(stages=(4,), stem=False).items()})
    out.update(_predictors(80, 2048))
    return out


def faster_rcnn_dc5_layout() -> dict[str, Shape]:
    """faster-rcnn_r50-caffe-dc5: full trunk, RPN on C5 (2048, 15 anchors), Shared2FCBBoxHead(2048 * 7 * 7)."""
    out = {f"backbone.{k}": v for k, v in resnet_layout().items()}
    out.update(_rpn(2048, 15))
    h = "roi_head.bbox_head"
    out.update({f"{h}.shared_fcs.0.weight": (1024, 2048 * 7 * 7), f"{h}.shared_fcs.0.bias": (1024,),
                f"{h}.shared_fcs.1.weight": (1024, 1024), f"{h}.shared_fcs.1.bias": (1024,)})
    out.update(_predictors(80, 1024))
    return out


def _rpn(c: int, anchors: int) -> dict[str, Shape]:
    return {"rpn_head.rpn_conv.weight": (c, c, 3, 3), "rpn_head.rpn_conv.bias": (c,),
            "rpn_head.rpn_cls.weight": (anchors, c, 1, 1), "rpn_head.rpn_cls.bias": (anchors,),
            "rpn_head.rpn_reg.weight": (4 * anchors, c, 1, 1), "rpn_head.rpn_reg.bias": (4 * anchors,)}


def _predictors(num_classes: int, c: int) -> dict[str, Shape]:
    h = "roi_head.bbox_head"
    return {f"{h}.fc_cls.weight": (num_classes + 1, c), f"{h}.fc_cls.bias": (num_classes + 1,),
            f"{h}.fc_reg.weight": (4 * num_classes, c), f"{h}.fc_reg.bias": (4 * num_classes,)}


def fill(layout: dict[str, Shape], seed: int = 0, *, zeros: bool = False) -> dict[str, torch.Tensor]:
    """Distinct random values per tensor (int64 step counters for num_batches_tracked); `zeros`
    for files that are only meant to be refused."""
    g = torch.Generator().manual_seed(seed)
    if zeros:
        return {k: torch.zeros(s, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
                for k, s in layout.items()}
    return {k: (torch.randint(0, 10**6, (), generator=g) if k.endswith("num_batches_tracked")
                else torch.randn(s, generator=g)) for k, s in layout.items()}


def save(obj: object, path: Path, *, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def assert_loaded(model: torch.nn.Module, source: dict[str, torch.Tensor], rename=lambda k: k) -> int:
    sd = model.state_dict()
    n = 0
    for k, v in source.items():
        assert torch.equal(sd[rename(k)], v.to(sd[rename(k)].dtype)), rename(k)
        n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Fixtures: one model per architecture for the whole module (building R-50 costs seconds)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fpn_model() -> torch.nn.Module:
    return build_detector(DetectorConfig())


@pytest.fixture(scope="module")
def c4_cfg() -> DetectorConfig:
    return recipes.resolve({"style": "caffe", "neck": "c4"}, name="faster-rcnn_r50-caffe_c4-1x_coco")


@pytest.fixture(scope="module")
def c4_model(c4_cfg: DetectorConfig) -> torch.nn.Module:
    return build_detector(c4_cfg)


def test_layout_generator_is_anchored_to_published_names() -> None:
    layout = faster_rcnn_fpn_layout()
    heads = {k for k in layout if not k.startswith("backbone.")}
    assert heads == set(PUBLISHED_R50_FPN_HEAD_KEYS)
    assert set(PUBLISHED_R50_BACKBONE_SAMPLE) <= set(layout)
    msra = resnet_layout(tracked=False) | {"conv1.bias": (64,)}
    assert set(PUBLISHED_MSRA_SAMPLE) <= set(msra)
    # torchvision's own ResNet-50 is the published torchvision layout: same names and shapes, plus fc.
    tv = torchvision.models.resnet50(weights=None).state_dict()
    assert {k: tuple(v.shape) for k, v in tv.items() if not k.startswith("fc.")} == resnet_layout()


@pytest.mark.parametrize(
    ("axes", "layout"),
    [
        ({}, faster_rcnn_fpn_layout()),
        ({"backbone": "r101", "style": "caffe"}, faster_rcnn_fpn_layout(depth=101)),
        ({"backbone": "x101-32x4d"}, faster_rcnn_fpn_layout(depth=101, groups=32, base_width=4)),
        ({"backbone": "x101-64x4d"}, faster_rcnn_fpn_layout(depth=101, groups=64, base_width=4)),
        ({"backbone": "x101-32x8d", "schedule": "3x", "train_scale": "ms-range"},
         faster_rcnn_fpn_layout(depth=101, groups=32, base_width=8)),
        ({"style": "caffe", "neck": "c4"}, faster_rcnn_c4_layout()),
        ({"style": "caffe", "neck": "dc5"}, faster_rcnn_dc5_layout()),
        ({"style": "caffe", "classes": "person-bicycle-car", "pretrain": "coco-caffe-ms-3x"}, faster_rcnn_fpn_layout(num_classes=3)),
    ],
    ids=["r50-fpn", "r101-caffe-fpn", "x101-32x4d", "x101-64x4d", "x101-32x8d", "c4", "dc5", "3-classes"],
)
def test_every_architecture_has_the_published_layout(axes: dict[str, str], layout: dict[str, Shape]) -> None:
    """Names and shapes of each matrix architecture equal the published checkpoint layout, so a
    published file of that row loads by key (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = build_detector(recipes.resolve(axes))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout


# --------------------------------------------------------------------------------------------------
# Whole detectors
# --------------------------------------------------------------------------------------------------
def test_mmdet_v2_checkpoint_loads_every_tensor(fpn_model: torch.nn.Module, tmp_path: Path) -> None:
    source = fill(faster_rcnn_fpn_layout(), seed=1)
    assert set(fpn_model.state_dict()) == set(source)  # our names are exactly the published ones
    # v2 publish_model.py: {"meta", "state_dict"}, legacy serialization; a numpy seed in meta
    # (mmdet v2 init_random_seed) must not break weights_only loading.
    meta = {"mmdet_version": "2.25.0", "CLASSES": COCO_CLASSES, "seed": np.int64(1234), "epoch": 12, "config": "..."}
    path = save({"meta": meta, "state_dict": source}, tmp_path / "faster_rcnn_r50_fpn_1x_coco.pth", legacy=True)
    report = load_detector(fpn_model, path, cfg=DetectorConfig(), classes=COCO_CLASSES)
    assert assert_loaded(fpn_model, source) == len(source) == len(report.loaded)
    assert report.classes == COCO_CLASSES and not report.skipped and not report.ignored


def test_mmdet_v3_checkpoint_with_ddp_prefix_in_fp16(fpn_model: torch.nn.Module, tmp_path: Path) -> None:
    # Half-precision tensors, as the 2020 FP16 hook (a half model) may have saved them: cast on load.
    source = {k: v.half() if v.is_floating_point() else v for k, v in fill(faster_rcnn_fpn_layout(), seed=2).items()}
    meta = {"dataset_meta": {"classes": COCO_CLASSES, "palette": [(220, 20, 60)] * 80}, "mmengine_version": "0.10.3"}
    path = save({"meta": meta, "state_dict": {f"module.{k}": v for k, v in source.items()}}, tmp_path / "v3.pth")
    report = load_detector(fpn_model, path, cfg=DetectorConfig(), classes=COCO_CLASSES)
    assert assert_loaded(fpn_model, source) == len(source)
    assert report.classes == COCO_CLASSES


def test_class_order_must_match_the_dataset(fpn_model: torch.nn.Module, tmp_path: Path) -> None:
    source = fill(faster_rcnn_fpn_layout(), seed=3)
    before = fpn_model.state_dict()["rpn_head.rpn_conv.weight"].clone()
    swapped = list(COCO_CLASSES)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    path = save({"meta": {"CLASSES": tuple(swapped)}, "state_dict": source}, tmp_path / "swapped.pth")
    with pytest.raises(WeightsError, match=r"class order.*checkpoint class 2 is 'motorcycle', dataset class 2 is 'car'"):
        load_detector(fpn_model, path, cfg=DetectorConfig(), classes=COCO_CLASSES)
    assert torch.equal(fpn_model.state_dict()["rpn_head.rpn_conv.weight"], before)  # nothing half-loaded


def test_c4_checkpoint_with_shared_head(c4_model: torch.nn.Module, c4_cfg: DetectorConfig, tmp_path: Path) -> None:
    source = fill(faster_rcnn_c4_layout(), seed=4)
    assert set(c4_model.state_dict()) == set(source)
    path = save({"meta": {"CLASSES": COCO_CLASSES}, "state_dict": source}, tmp_path / "c4.pth", legacy=True)
    load_detector(c4_model, path, cfg=c4_cfg, classes=COCO_CLASSES)
    assert assert_loaded(c4_model, source) == len(source)


def test_subset_finetune_skips_mismatched_predictors(tmp_path: Path) -> None:
    cfg = recipes.resolve({"style": "caffe", "train_scale": "ms-choice", "classes": "person", "pretrain": "coco-caffe-ms-3x"})
    model = build_detector(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if ".fc_cls." in k or ".fc_reg." in k}
    source = fill(faster_rcnn_fpn_layout(), seed=5)  # the 80-class COCO caffe ms-3x checkpoint
    path = save({"meta": {"CLASSES": COCO_CLASSES}, "state_dict": source}, tmp_path / "coco_3x.pth")
    with pytest.raises(WeightsError, match="trained for 80 classes.*the model has 1"):
        load_detector(model, path, cfg=cfg)
    report = load_detector(model, path, cfg=cfg, finetune=True)
    assert sorted(report.skipped) == sorted(fresh)
    for k, v in fresh.items():
        assert torch.equal(model.state_dict()[k], v)  # mmdet re-initialises them: left as built
    kept = {k: v for k, v in source.items() if k not in fresh}
    assert assert_loaded(model, kept) == len(source) - 4
    # The run's initialisation does the same from RunConfig.load_from_path (no ImageNet file needed).
    run = RunConfig(data_root=str(tmp_path), load_from_path=str(path))
    model.state_dict()["backbone.conv1.weight"].zero_()
    assert initialise(model, cfg, run) == []
    assert torch.equal(model.state_dict()["backbone.conv1.weight"], source["backbone.conv1.weight"])


def test_unfitting_file_lists_missing_unexpected_and_shapes(fpn_model: torch.nn.Module, tmp_path: Path) -> None:
    source = fill(faster_rcnn_fpn_layout(), seed=6)
    del source["neck.fpn_convs.3.conv.bias"], source["backbone.layer2.1.conv2.weight"]
    source["neck.fpn_convs.4.conv.weight"] = torch.zeros(256, 256, 3, 3)  # e.g. a RetinaNet-style extra conv
    source["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(91, 1024)  # torchvision's 91 slots
    source["roi_head.bbox_head.fc_cls.bias"] = torch.zeros(91)
    path = save({"state_dict": source}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError) as err:
        load_detector(fpn_model, path, cfg=DetectorConfig())
    text = str(err.value)
    assert str(path) in text
    assert "missing from the file (2): " in text and "neck.fpn_convs.3.conv.bias" in text
    assert "backbone.layer2.1.conv2.weight" in text
    assert "unexpected in the file (1): neck.fpn_convs.4.conv.weight" in text
    assert "shape mismatches (2)" in text and "roi_head.bbox_head.fc_cls.weight: file [91, 1024] vs model [81, 1024]" in text


def test_architecture_mismatch_is_named(c4_model: torch.nn.Module, c4_cfg: DetectorConfig, tmp_path: Path) -> None:
    path = save({"state_dict": fill(faster_rcnn_fpn_layout(), zeros=True)}, tmp_path / "fpn.pth")
    with pytest.raises(WeightsError, match=r"(?s)missing from the file \(50\): roi_head.shared_head.layer4.0.conv1.weight.*"
                                           r"rpn_head.rpn_conv.weight: file \[256, 256, 3, 3\] vs model \[1024, 1024, 3, 3\]"
                                           r".*hint: the file's layout is FPN, the model's is C4"):
        load_detector(c4_model, path, cfg=c4_cfg)


def test_many_missing_keys_are_counted_and_truncated(fpn_model: torch.nn.Module, tmp_path: Path) -> None:
    source = fill(resnet_layout(), seed=7)  # an ImageNet backbone given as a detector checkpoint
    path = save(source, tmp_path / "resnet50.pth")
    with pytest.raises(WeightsError) as err:
        load_detector(fpn_model, path, cfg=DetectorConfig())
    text = str(err.value)
    # num_batches_tracked is never required (ImageNet / MSRA files do not all carry it)
    counted = [k for k in fpn_model.state_dict() if not k.endswith("num_batches_tracked")]
    assert f"missing from the file ({len(counted)}): backbone.conv1.weight, " in text and "(+" in text
    assert f"unexpected in the file ({len(source)}): conv1.weight, " in text
    assert "hint: an ImageNet backbone file" in text


def test_foreign_layouts_get_a_hint(fpn_model: torch.nn.Module, tmp_path: Path) -> None:
    v1 = {k.replace("roi_head.", ""): v for k, v in fill(faster_rcnn_fpn_layout(), seed=8).items()}
    with pytest.raises(WeightsError, match="MMDetection v1 .*upgrade_model_version.py"):
        load_detector(fpn_model, save({"state_dict": v1}, tmp_path / "v1.pth"), cfg=DetectorConfig())
    d2 = {"stem.conv1.weight": torch.zeros(64, 3, 7, 7), "res2.0.conv1.norm.weight": torch.zeros(64)}
    with pytest.raises(WeightsError, match="Detectron2-native names"):
        load_backbone(fpn_model, save(d2, tmp_path / "d2.pth"))


def test_unreadable_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="junk.pth: cannot be read as a PyTorch checkpoint"):
        read_checkpoint(junk)
    with pytest.raises(WeightsError, match="no such file"):
        read_checkpoint(tmp_path / "absent.pth")
    pickled = save({"state_dict": {"w": torch.zeros(1)}, "obj": io.StringIO()}, tmp_path / "object.pth")
    with pytest.raises(WeightsError, match="object.pth: refused by weights_only loading.*StringIO"):
        read_checkpoint(pickled)


@pytest.mark.parametrize(("legacy", "keep", "words"), [
    (False, 0.5, "a zip archive (torch.save's format) cut short"),
    (True, 0.5, "a pickle (torch's legacy format) that is damaged or truncated"),
    (False, 0.0, "the file is empty"),
    (None, 0.0, "neither a zip archive (torch.save's format) nor a pickle: it starts with b'garbage"),
])
def test_a_damaged_file_says_what_it_is_and_never_advises_weights_only_false(
        tmp_path: Path, legacy: bool | None, keep: float, words: str) -> None:
    """torch's own text for a file it cannot read at all suggests weights_only=False even for random bytes."""
    whole = save({"state_dict": {"w": torch.zeros(4096)}}, tmp_path / "whole.pth", legacy=bool(legacy)).read_bytes()
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"garbage\n" * 4 if legacy is None else whole[: int(len(whole) * keep)])
    with pytest.raises(WeightsError) as info:
        read_checkpoint(damaged)
    assert f"damaged.pth: cannot be read as a PyTorch checkpoint: {words}" in str(info.value)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# ImageNet backbones
# --------------------------------------------------------------------------------------------------
def test_torchvision_resnet50(fpn_model: torch.nn.Module, tmp_path: Path) -> None:
    tv = torchvision.models.resnet50(weights=None)
    for p in tv.state_dict().values():  # make BN statistics non-trivial too
        if p.is_floating_point():
            p.normal_()
    source = tv.state_dict()
    path = save(source, tmp_path / "resnet50-0676ba61.pth")
    report = load_backbone(fpn_model, path, kind="torchvision")
    body = {k: v for k, v in source.items() if not k.startswith("fc.")}
    assert assert_loaded(fpn_model, body, rename=lambda k: f"backbone.{k}") == len(body) == len(report.loaded)
    assert sorted(report.ignored) == ["backbone.fc.bias", "backbone.fc.weight"]
    with pytest.raises(WeightsError, match="'state_dict' wrapper"):
        load_backbone(fpn_model, save({"state_dict": source}, tmp_path / "wrapped.pth"), kind="torchvision")


def test_msra_caffe_backbone_initialises_c4_trunk_and_shared_head(c4_model: torch.nn.Module, tmp_path: Path) -> None:
    # resnet50_msra-5891d200.pth: mmdet names, BN statistics without num_batches_tracked, plus the
    # caffe stem's conv1.bias that mmdet ignores; here under mmcv's "state_dict" wrapper.
    source = fill(resnet_layout(tracked=False) | {"conv1.bias": (64,)}, seed=9)
    tracked_before = c4_model.state_dict()["backbone.layer1.0.bn1.num_batches_tracked"].clone()
    path = save({"state_dict": source}, tmp_path / "resnet50_msra-5891d200.pth", legacy=True)
    report = load_backbone(c4_model, path, kind="mmcv")
    trunk = {k: v for k, v in source.items() if not k.startswith(("layer4.", "conv1.bias"))}
    head = {k: v for k, v in source.items() if k.startswith("layer4.")}
    assert assert_loaded(c4_model, trunk, rename=lambda k: f"backbone.{k}") == len(trunk)
    assert assert_loaded(c4_model, head, rename=lambda k: f"roi_head.shared_head.{k}") == len(head) > 0
    assert report.ignored == ("backbone.conv1.bias",)
    assert torch.equal(c4_model.state_dict()["backbone.layer1.0.bn1.num_batches_tracked"], tracked_before)
    with pytest.raises(WeightsError, match=r"unexpected in the file \(1\): backbone.conv1.bias"):
        load_backbone(c4_model, save(source, tmp_path / "bare.pth"), kind="torchvision")  # caffe files only


def test_resnext_backbone(tmp_path: Path) -> None:
    # open-mmlab ResNeXt files use the ResNet names with grouped conv2 (mmdet `ResNeXt`); 50-32x4d
    # has the same block layout as the 101 ones at a third of the build time.
    trunk = ResNet(BackboneConfig(depth=50, groups=32, base_width=4))
    source = fill(resnet_layout(depth=50, groups=32, base_width=4, tracked=False), seed=10)
    path = save({"state_dict": source, "meta": {}}, tmp_path / "resnext50-32x4d-0ab1a123.pth")
    load_backbone(trunk, path, kind="auto")
    assert assert_loaded(trunk, source) == len(source)
    r50 = save(fill(resnet_layout(), zeros=True), tmp_path / "r50.pth")
    with pytest.raises(WeightsError, match=r"(?s)r50.pth: does not fit.*shape mismatches.*conv2.weight: file \[64, 64, 3, 3\] vs model \[128, 4, 3, 3\]"):
        load_backbone(trunk, r50)


def test_wrong_depth_is_refused(fpn_model: torch.nn.Module, tmp_path: Path) -> None:
    r101 = save(fill(resnet_layout(depth=101), zeros=True), tmp_path / "resnet101-63fe2227.pth")
    before = fpn_model.state_dict()["backbone.conv1.weight"].clone()
    with pytest.raises(WeightsError, match=r"(?s)resnet101-63fe2227.pth: does not fit.*unexpected in the file \(\d+\): backbone.layer3.6"):
        load_backbone(fpn_model, r101, kind="torchvision")
    assert torch.equal(fpn_model.state_dict()["backbone.conv1.weight"], before)


# --------------------------------------------------------------------------------------------------
# Names -> files, run initialisation
# --------------------------------------------------------------------------------------------------
def test_published_names_map_to_local_files(tmp_path: Path) -> None:
    assert pretrained_file("open-mmlab://detectron2/resnet50_caffe").file == "resnet50_msra-5891d200.pth"
    assert pretrained_file("torchvision://resnet50").file == "resnet50-0676ba61.pth"
    for axes in ({}, {"backbone": "r101", "style": "caffe"}, {"backbone": "x101-32x8d"}, {"pretrain": "tnr"},
                 {"backbone": "x101-64x4d"}):
        assert recipes.resolve(axes).pretrained in PRETRAINED
    with pytest.raises(WeightsError, match="unknown pretrained name 'torchvision://vgg16'; allowed: torchvision://resnet50"):
        pretrained_file("torchvision://vgg16")
    with pytest.raises(WeightsError, match=r"expected the file resnet101_msra-6cc46731.pth.*https://download.openmmlab.com"):
        resolve_local("open-mmlab://detectron2/resnet101_caffe", tmp_path)
    (tmp_path / "resnet50-19c8e357.pth").write_bytes(b"")  # the 2020 name of the same weights
    assert resolve_local("torchvision://resnet50", tmp_path).name == "resnet50-19c8e357.pth"


def test_initialise_from_a_weights_folder(fpn_model: torch.nn.Module, tmp_path: Path) -> None:
    source = torchvision.models.resnet50(weights=None).state_dict()
    save(source, tmp_path / "resnet50-0676ba61.pth")
    run = RunConfig(data_root=str(tmp_path), pretrained_path=str(tmp_path))
    assert initialise(fpn_model, DetectorConfig(), run) == []
    assert torch.equal(fpn_model.state_dict()["backbone.layer3.5.conv2.weight"], source["layer3.5.conv2.weight"])
    notes = initialise(fpn_model, DetectorConfig(), RunConfig(data_root=str(tmp_path)))
    assert notes == ["backbone randomly initialised: no local file for torchvision://resnet50 (expected resnet50-0676ba61.pth)"]
    with pytest.raises(WeightsError, match="no local file"):
        initialise(fpn_model, DetectorConfig(), RunConfig(data_root=str(tmp_path)), require=True)
