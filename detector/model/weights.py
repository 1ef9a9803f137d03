"""Weights from local files: ImageNet backbones and whole published MMDetection detectors.

Nothing is downloaded: the user names local files, and every file is read with
`torch.load(path, map_location="cpu", weights_only=True)`. A file that does not fit raises
`WeightsError` (a `ValueError`) naming the file and listing missing, unexpected and mis-shaped keys.

Shorthand: "file keys" are the names in the checkpoint after unwrapping; "model keys" are
`model.state_dict()` names. Our module names follow MMDetection (ARCHITECTURE.md "The model"), so for
every layout below the mapping is the identity plus a few documented drops.

Key layouts, as looked up in the sources (not derived from our own modules):

* torchvision ImageNet ResNet / ResNeXt (`resnet50-0676ba61.pth`, ...): a bare state dict with
  `conv1`, `bn1`, `layer{1..4}.{b}.conv{1,2,3}` / `bn{1,2,3}`, `layer{s}.0.downsample.{0,1}` and the
  classifier `fc.{weight,bias}` (dropped). These are mmdet's `ResNet` names, which is why mmcv loads
  them with no renaming (`mmcv/runner/checkpoint.py::load_checkpoint` only strips `module.` and
  loads with `strict=False`).
* open-mmlab third-party backbones (`open-mmlab://detectron2/resnet50_caffe` ->
  `resnet50_msra-5891d200.pth`, `resnext101_32x4d-a5af3160.pth`, ...): the same mmdet names, optionally
  under `"state_dict"`, with BN running statistics but no `num_batches_tracked`. The MSRA files carry
  one extra `conv1.bias` that mmdet's bias-free stem ignores (mmcv logs "unexpected key in source
  state_dict: ... conv1.bias" for detectron2/resnet50_caffe in open-mmlab/mmdetection#3823 and
  ligang-cs/PseCo#7). mmdet's own Caffe2 converter `tools/model_converters/detectron2pytorch.py`
  writes exactly these names (res{i+1}_{j}_branch2{a,b,c} -> layer{i}.{j}.conv{1,2,3}, branch1 ->
  downsample.0, res_conv1_bn -> bn1). Detectron2-native names (`stem.conv1`, `res2.0.conv1.norm`,
  `shortcut`) and raw Caffe2 blobs (`res2_0_branch2a_w`) are refused with a hint.
* MMDetection v2 / v3 detectors: `{"meta": {...}, "state_dict": {...}}`
  (`tools/model_converters/publish_model.py` keeps only these two and writes the legacy non-zip
  format). Classes: `meta["CLASSES"]` (v2, mmcv `save_checkpoint`) or
  `meta["dataset_meta"]["classes"]` (v3, mmengine `Runner.save_checkpoint`). Keys: `backbone.*`,
  `neck.lateral_convs.<i>.conv.*`, `neck.fpn_convs.<i>.conv.*`, `rpn_head.rpn_conv|rpn_cls|rpn_reg.*`
  (a plain Conv2d when `num_convs=1`, `dense_heads/rpn_head.py`), `roi_head.bbox_head.shared_fcs.{0,1}`,
  `fc_cls` (num_classes + 1 rows, background last since v2.0), `fc_reg` (4 * num_classes); C4 adds
  `roi_head.shared_head.layer4.*` (`roi_heads/shared_heads/res_layer.py` registers `layer{stage+1}`)
  and its `BBoxHead(with_avg_pool=True)` has only `fc_cls` / `fc_reg`.
* mmdet v1 put the heads at the top level (`bbox_head.*`) with the background class first;
  `tools/model_converters/upgrade_model_version.py` adds `roi_head.` and rotates the class rows.
  Such files are refused with that hint instead of being loaded with a wrong class order.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detector.config import DetectorConfig, RunConfig
from detector.errors import WeightsError
from detector.model.pretrained import BackboneKind, pretrained_file, resolve_local

log = logging.getLogger(__name__)

_SHOWN = 10  # keys listed per category in an error message


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------
def _numpy_safe_globals() -> list[Any]:
    """numpy scalars / small arrays some mmdet v2 `meta` dicts hold (e.g. a `np.int64` seed).

    They are plain values; allow-listing their reconstructors keeps `weights_only=True` (no
    arbitrary code). numpy 1.x pickles them as `numpy.core.*`, numpy 2 as `numpy._core.*`.
    """
    import numpy as np

    try:
        from numpy._core import multiarray as ma
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as ma  # type: ignore[no-redef]
    dtypes = [type(np.dtype(c)) for c in ("b", "i1", "u1", "i2", "i4", "i8", "u4", "u8", "f2", "f4", "f8", "?")]
    safe: list[Any] = [ma.scalar, ma._reconstruct, np.ndarray, np.dtype, *dict.fromkeys(dtypes)]
    safe += [(ma.scalar, "numpy.core.multiarray.scalar"), (ma._reconstruct, "numpy.core.multiarray._reconstruct")]
    return safe


def read_checkpoint(path: str | Path) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`, with clear errors.

    A file that weights-only loading refuses only because its `meta` holds numpy scalars is read
    again with those numpy types allow-listed (still weights-only).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{p}: no such file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _is_refusal(exc):  # truncated zip, random bytes, not a pickle at all, ...
            raise WeightsError(f"{p}: cannot be read as a PyTorch checkpoint: {_damage_reason(p, exc)}") from None
        if "numpy" not in str(exc):
            raise WeightsError(f"{p}: refused by weights_only loading: {_unpickle_reason(exc)}") from None
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{p}: refused by weights_only loading: {_unpickle_reason(exc)}") from None


def _is_refusal(exc: BaseException) -> bool:
    """Whether torch's weights-only unpickler refused a global (as opposed to a damaged file)."""
    text = str(exc)
    return isinstance(exc, pickle.UnpicklingError) and (
        "Unsupported global" in text or "unsupported GLOBAL" in text
    )


def _damage_reason(path: Path, exc: BaseException) -> str:
    """What is wrong with a file torch cannot read at all, from its first bytes. torch's own text is
    cut at its advice: for random bytes it too suggests `weights_only=False`, which is never right."""
    import zipfile

    with path.open("rb") as fh:
        head = fh.read(8)
    if not head:
        return "the file is empty"
    text = str(exc).split("WeightsUnpickler error:")[-1].split(" Check the documentation")[0]
    detail = next((line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line), "")
    detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if head.startswith(b"PK\x03\x04"):  # a zip's local file header: torch.save's format
        if not zipfile.is_zipfile(path):
            return "a zip archive (torch.save's format) cut short: it has no end-of-archive record (an interrupted copy?)"
        return f"a zip archive (torch.save's format) that torch cannot read, damaged or not a checkpoint ({detail})"
    if head[:1] == b"\x80":  # the PROTO opcode: a pickle, as torch's legacy format starts
        return f"a pickle (torch's legacy format) that is damaged or truncated ({detail})"
    return f"neither a zip archive (torch.save's format) nor a pickle: it starts with {head!r}"


def _unpickle_reason(exc: BaseException) -> str:
    """The refused global in our words. torch's own text recommends `weights_only=False`, which would
    run code from the file: this harness never does, so that advice is not passed on."""
    text = str(exc)
    match = re.search(r"(?:unsupported GLOBAL|Unsupported global:?)\s*(?:GLOBAL\s*)?([\w.]+)", text)
    what = f" ({match.group(1)})" if match else ""
    return (f"it holds a Python object that is not plain weights{what}; the harness loads checkpoints with "
            "weights_only=True and never runs code from them: re-save the file with tensors only")


def split_checkpoint(obj: Any, path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors without `module.` prefixes, meta) of a `{"state_dict", "meta"}` file (mmcv,
    mmengine), a `{"model": ...}` file (ours, `detector.train.checkpoint`) or a bare state dict."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}")
    meta = obj["meta"] if isinstance(obj.get("meta"), dict) else {}
    sd = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    tensors = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:_SHOWN]))})")
    return tensors, dict(meta)


def checkpoint_classes(meta: dict[str, Any]) -> tuple[str, ...] | None:
    """Class names stored by mmcv (`meta["CLASSES"]`) or mmengine (`meta["dataset_meta"]["classes"]`)."""
    classes = meta.get("CLASSES")
    if classes is None and isinstance(meta.get("dataset_meta"), dict):
        classes = meta["dataset_meta"].get("classes")
    if isinstance(classes, str):
        return (classes,)
    return tuple(str(c) for c in classes) if isinstance(classes, (list, tuple)) else None


def _foreign_layout_hint(keys: Sequence[str]) -> str | None:
    """A hint when the file uses a naming scheme we deliberately do not translate."""
    if any(k.startswith(("stem.", "backbone.bottom_up.")) or ".shortcut." in k for k in keys):
        return ("Detectron2-native names (stem.conv1, res2.0.conv1.norm, shortcut): use the open-mmlab converted "
                "file instead (e.g. resnet50_msra-5891d200.pth for detectron2/resnet50_caffe)")
    if any(k.endswith(("_w", "_bn_s", "_bn_b")) and k.startswith(("res", "conv1")) for k in keys):
        return ("raw Caffe2 blob names (res2_0_branch2a_w): convert them with mmdet's "
                "tools/model_converters/detectron2pytorch.py first")
    if _is_mmdet_v1(keys):
        return _V1_HINT
    return None


_V1_HINT = ("an MMDetection v1 checkpoint (heads without 'roi_head.', background class first): upgrade it "
            "with mmdet's tools/model_converters/upgrade_model_version.py")


def _is_mmdet_v1(keys: Sequence[str]) -> bool:
    return any(k.startswith(("bbox_head.", "shared_head.")) for k in keys) and not any(k.startswith("roi_head.") for k in keys)


# --------------------------------------------------------------------------------------------------
# Matching and loading
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LoadReport:
    """What a load did. `loaded`: model keys set from the file; `skipped`: model keys deliberately
    left at their init (finetune heads); `ignored`: file keys not used (classifier, caffe conv1 bias);
    `kept`: model keys absent from the file and left as they are (`num_batches_tracked`)."""

    path: str
    loaded: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    classes: tuple[str, ...] | None = None

    def summary(self) -> str:
        text = f"{self.path}: loaded {len(self.loaded)} tensors"
        if self.skipped:
            text += f"; re-initialised {len(self.skipped)} ({', '.join(self.skipped)})"
        if self.ignored:
            text += f"; ignored {len(self.ignored)} file keys ({_short(self.ignored)})"
        return text


def _short(keys: Sequence[str]) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _match(
    targets: dict[str, Tensor],
    source: dict[str, Tensor],
    *,
    path: str | Path,
    what: str,
    ignorable: Callable[[str], bool],
    skippable: Callable[[str], bool] = lambda _k: False,
    hint: str | None = None,
) -> tuple[dict[str, Tensor], LoadReport]:
    """Pair model keys (`targets`: model key -> current tensor) with file keys (`source`, already in
    model naming). Returns the tensors to load and the report; raises WeightsError listing every
    missing / unexpected / mis-shaped key (at most `_SHOWN` each, with counts)."""
    missing = [k for k in targets if k not in source and not k.endswith("num_batches_tracked")]
    kept = [k for k in targets if k not in source and k.endswith("num_batches_tracked")]
    ignored = [k for k in source if k not in targets and ignorable(k)]
    unexpected = [k for k in source if k not in targets and not ignorable(k)]
    mismatched, skipped, to_load = [], [], {}
    for k, t in targets.items():
        if k not in source:
            continue
        if tuple(source[k].shape) == tuple(t.shape):
            to_load[k] = source[k]
        elif skippable(k):
            skipped.append(k)
        else:
            mismatched.append(f"{k}: file {list(source[k].shape)} vs model {list(t.shape)}")
    if missing or unexpected or mismatched:
        lines = [f"{path}: does not fit {what} ({len(source)} keys in the file, {len(targets)} in the model)"]
        if missing:
            lines.append(f"  missing from the file ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected in the file ({len(unexpected)}): {_short(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_short(mismatched)}")
        hint = hint or _foreign_layout_hint(list(source))
        if hint:
            lines.append(f"  hint: {hint}")
        raise WeightsError("\n".join(lines))
    report = LoadReport(path=str(path), loaded=tuple(to_load), skipped=tuple(skipped), ignored=tuple(ignored), kept=tuple(kept))
    return to_load, report


def _assign(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy `tensors` into `module` in place (dtype / device of the module are kept)."""
    result = module.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # _match only passes model keys


def load_backbone(model: nn.Module, path: str | Path, *, kind: BackboneKind = "auto") -> LoadReport:
    """ImageNet weights into `model.backbone` (or `model` itself if it is the trunk).

    C4 (reference 1.6): the trunk stops after `layer3` and the file's `layer4.*` initialise
    `model.roi_head.shared_head.layer4`, as mmdet's `init_cfg=Pretrained` on the shared `ResLayer`
    does (its keys are `layer4.*`, the same as the file's).

    Args:
        kind: "torchvision" ignores only `fc.*`; "mmcv" also the caffe stem's `conv1.bias` and
            accepts a `"state_dict"` wrapper; "auto" accepts both. A whole detector checkpoint is
            also accepted: its `backbone.*` keys are used (mmdet `Pretrained(prefix='backbone.')`).
    """
    if kind not in ("torchvision", "mmcv", "auto"):
        raise WeightsError(f"kind: {kind!r} is not allowed; allowed: 'torchvision', 'mmcv', 'auto'")
    obj = read_checkpoint(path)
    if kind == "torchvision" and isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        raise WeightsError(f"{path}: has a 'state_dict' wrapper, not the bare torchvision layout; use kind='mmcv' or 'auto'")
    source, _meta = split_checkpoint(obj, path)
    if any(k.startswith("backbone.") for k in source):
        source = {k[len("backbone."):]: v for k, v in source.items() if k.startswith("backbone.")}
    backbone = getattr(model, "backbone", model)
    shared = getattr(getattr(model, "roi_head", None), "shared_head", None)
    targets = {f"backbone.{k}" if backbone is not model else k: v for k, v in backbone.state_dict().items()}
    renamed = {f"backbone.{k}" if backbone is not model else k: v for k, v in source.items()}
    if shared is not None:
        head_keys = {f"roi_head.shared_head.{k}": v for k, v in shared.state_dict().items()}
        targets.update(head_keys)
        for k in head_keys:  # file layer4.* feeds the shared head when the trunk has no layer4
            file_key = k[len("roi_head.shared_head."):]
            if file_key in source and f"backbone.{file_key}" not in targets:
                renamed[k] = renamed.pop(f"backbone.{file_key}")
    drop_fc = ("fc.weight", "fc.bias")
    drop = drop_fc if kind == "torchvision" else (*drop_fc, "conv1.bias")
    prefix = "backbone." if backbone is not model else ""
    ignorable = {prefix + k for k in drop}
    to_load, report = _match(targets, renamed, path=path, what="the ImageNet backbone", ignorable=ignorable.__contains__,
                             hint=_foreign_layout_hint(list(source)))
    _assign(model, to_load)
    log.info(report.summary())
    return report


def load_detector(
    model: nn.Module,
    path: str | Path,
    *,
    cfg: DetectorConfig,
    classes: Sequence[str] | None = None,
    finetune: bool = False,
    contents: Any = None,
) -> LoadReport:
    """A whole published MMDetection v2 / v3 checkpoint (or one of ours) into `model`.

    Args:
        cfg: the model's config (its `num_classes` is checked against the file's class list).
        classes: the dataset's class names in label order (category-id order for COCO). When the
            file records its classes they must be the same, in the same order; label i of the
            checkpoint is then category i of the dataset.
        finetune: mmdet `load_from` for a model with another class count (the COCO-subset
            finetunes, reference 1.5): `roi_head.bbox_head.fc_cls` / `fc_reg` whose shapes differ are
            skipped and keep their fresh init, as mmcv's non-strict load does; no class check.
        contents: the file as `read_checkpoint(path)` returned it, when the caller already read it
            (a published detector is ~170 MB: `detector.verify` checks its classes before building
            the model, then loads the same object).
    """
    obj = read_checkpoint(path) if contents is None else contents
    return _load_detector(model, obj, path, cfg=cfg, classes=classes, finetune=finetune)


def _load_detector(model: nn.Module, obj: Any, path: str | Path, *, cfg: DetectorConfig,
                   classes: Sequence[str] | None, finetune: bool) -> LoadReport:
    source, meta = split_checkpoint(obj, path)
    file_classes = checkpoint_classes(meta)
    if _is_mmdet_v1(list(source)):
        raise WeightsError(f"{path}: {_V1_HINT}")
    if not finetune and file_classes is not None:
        check_checkpoint_classes(path, file_classes, cfg.num_classes, classes)
    elif not finetune:
        log.warning("%s: records no class names; assuming the dataset's category order", path)
    head = ("roi_head.bbox_head.fc_cls.", "roi_head.bbox_head.fc_reg.")
    backbone_only = "conv1.weight" in source and not any(k.startswith("backbone.") for k in source)
    targets = dict(model.state_dict())
    kinds = _detector_kind(list(source)), _detector_kind(list(targets))
    hint = "an ImageNet backbone file, not a detector: give it as the pretrained backbone" if backbone_only else (
        f"the file's layout is {kinds[0]}, the model's is {kinds[1]}" if kinds[0] != kinds[1] else None)
    to_load, report = _match(
        targets,
        source,
        path=path,
        what=f"the detector {cfg.name}",
        ignorable=lambda _k: False,
        skippable=(lambda k: k.startswith(head)) if finetune else (lambda _k: False),
        hint=hint,
    )
    _assign(model, to_load)
    report = dataclasses.replace(report, classes=file_classes)
    if report.skipped:
        log.warning("%s: shapes differ, re-initialised as mmdet load_from does: %s", path, ", ".join(report.skipped))
    log.info(report.summary())
    return report


def _detector_kind(keys: Sequence[str]) -> str:
    """FPN (a neck), C4 (a shared res5 head) or DC5 (neither), from the key names alone."""
    if any(k.startswith("neck.") for k in keys):
        return "FPN"
    return "C4" if any(k.startswith("roi_head.shared_head.") for k in keys) else "DC5"


def check_checkpoint_classes(path: str | Path, file_classes: tuple[str, ...], num_classes: int, classes: Sequence[str] | None) -> None:
    """The file's class list against the model's class count and, when given, the dataset's classes in
    label order: `WeightsError` naming the first position that differs."""
    if len(file_classes) != num_classes:
        raise WeightsError(
            f"{path}: trained for {len(file_classes)} classes ({_short(file_classes)}), the model has {num_classes}"
        )
    if classes is None:
        return
    classes = tuple(classes)
    if file_classes != classes:
        bad = [i for i, (a, b) in enumerate(zip(file_classes, classes)) if a != b]
        i = bad[0] if bad else min(len(file_classes), len(classes))
        at = lambda seq: repr(seq[i]) if i < len(seq) else "nothing"  # noqa: E731
        raise WeightsError(
            f"{path}: class order differs from the dataset's: checkpoint class {i} is {at(file_classes)}, "
            f"dataset class {i} is {at(classes)} ({len(bad)} positions differ; checkpoint has "
            f"{len(file_classes)} classes, dataset {len(classes)})"
        )


# --------------------------------------------------------------------------------------------------
# A run's initialisation (used by the engine / detector.run)
# --------------------------------------------------------------------------------------------------
def initialise(model: nn.Module, cfg: DetectorConfig, run: RunConfig, *, require: bool = False) -> list[str]:
    """Apply the cell's initialisation from local files, as mmdet orders it: ImageNet backbone
    (`cfg.pretrained` <- `run.pretrained_path`), then `cfg.load_from` <- `run.load_from_path`
    (finetune semantics), which overwrites everything it fits.

    Returns:
        Deviations to record in metrics.json (a published initialisation that had no local file).
    Raises:
        WeightsError: a file that does not fit, or with `require=True` a missing file.
    """
    notes: list[str] = []
    if cfg.load_from and run.load_from_path:
        load_detector(model, run.load_from_path, cfg=cfg, finetune=True)
        return notes
    if cfg.load_from:
        notes.append(f"load_from {cfg.load_from} not given (run.load_from_path); started from the ImageNet backbone")
    if cfg.pretrained:
        if run.pretrained_path:
            entry = pretrained_file(cfg.pretrained)
            load_backbone(model, resolve_local(cfg.pretrained, run.pretrained_path), kind=entry.kind)
        else:
            entry = pretrained_file(cfg.pretrained)
            notes.append(f"backbone randomly initialised: no local file for {cfg.pretrained} (expected {entry.file})")
    if require and notes:
        raise WeightsError("; ".join(notes))
    return notes


__all__ = [
    "LoadReport",
    "checkpoint_classes",
    "initialise",
    "load_backbone",
    "load_detector",
    "read_checkpoint",
    "check_checkpoint_classes",
    "split_checkpoint",
]
