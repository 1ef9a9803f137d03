"""The one door from `harness/` into `detector/`: everything the harness may use, and nothing else.

`tests/harness/test_architecture.py` fails if any harness module imports another detector module.
The harness runs a cell through `python -m detector.run CELL_DIR` (a process, not an import) and
reads back `metrics.json`; everything else it needs is here:

- light names (no torch import): configs, recipes, user-error types, JSON files;
- heavy functions (they import torch / pycocotools on first use, so `harness --help`, matrix
  validation and planning stay fast): looked up in `_LAZY` on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from detector.config import DetectorConfig, RunConfig
from detector.errors import USER_ERRORS, ConfigError, DataError, WeightsError
from detector.jsonio import write_json_atomic
from detector.metrics import Metrics
from detector.recipes import AXES, DEFAULT_AXES, resolve

if TYPE_CHECKING:  # what the lazy names are, for type checkers and readers
    from detector.bench.measure import bench, device_class
    from detector.data.coco import subset_annotations
    from detector.data.coco_eval import evaluate_files
    from detector.data.synth import COCO_CATEGORIES, make_synthetic_coco
    from detector.data.validate import DatasetReport, check_classes, validate_split
    from detector.model.faster_rcnn import build_detector, describe
    from detector.model.pretrained import PRETRAINED, resolve_local
    from detector.parity.check import parity_check
    from detector.parity.mmdet_side import parity_versions
    from detector.verify import verify

__all__ = [
    "AXES", "COCO_CATEGORIES", "DEFAULT_AXES", "USER_ERRORS", "PRETRAINED", "ConfigError", "DataError", "DatasetReport", "DetectorConfig", "Metrics",
    "RunConfig", "WeightsError", "bench", "build_detector", "cannot_build", "check_classes", "describe",
    "device_class", "parity_check", "parity_versions", "evaluate_files", "make_synthetic_coco", "resolve", "resolve_local", "subset_annotations",
    "validate_split", "verify", "write_json_atomic",
]  # fmt: skip

# name -> module that defines it; imported on first access (PEP 562 module __getattr__).
_LAZY = {
    "bench": "detector.bench.measure",
    "device_class": "detector.bench.measure",
    "subset_annotations": "detector.data.coco",
    "evaluate_files": "detector.data.coco_eval",
    "COCO_CATEGORIES": "detector.data.synth",
    "make_synthetic_coco": "detector.data.synth",
    "DatasetReport": "detector.data.validate",
    "check_classes": "detector.data.validate",
    "validate_split": "detector.data.validate",
    "build_detector": "detector.model.faster_rcnn",
    "describe": "detector.model.faster_rcnn",
    "PRETRAINED": "detector.model.pretrained",
    "resolve_local": "detector.model.pretrained",
    "verify": "detector.verify",
    "parity_check": "detector.parity.check",  # needs the `parity` group (mmdet, mmengine, mmcv-lite)
    "parity_versions": "detector.parity.mmdet_side",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'detector.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def cannot_build(cfg: DetectorConfig) -> str | None:
    """Why the detector cannot build `cfg` (ConfigError / NotImplementedError), or None if it can.

    The model is built on the meta device: no memory, no init cost, same constructor code. Any
    other exception is not decided here: the cell runs and its own process reports the error.
    """
    try:
        import torch

        from detector.model.faster_rcnn import build_detector
    except ImportError:
        return None
    try:
        with torch.device("meta"):
            build_detector(cfg)
    except (ConfigError, NotImplementedError) as exc:
        return f"the detector cannot build this cell: {type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - see docstring
        return None
    return None
