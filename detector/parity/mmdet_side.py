"""MMDetection 3.3.0's side of the parity check: its model built from the config it ships.

mmcv-lite (the only mmcv 2.x that installs from the registry without compiling) has no compiled
ops, so `install_ops()` puts a stand-in `mmcv._ext` in `sys.modules` before mmcv.ops is imported.
It provides the two ops a Faster R-CNN calls, `nms` and `roi_align_forward`, from torchvision; every
other op raises when called, so a model that needs one fails loudly instead of computing anything
else. Consequence, stated in reports/parity.md: the check proves the model and its recipe, not
mmcv's C++ kernels (those are the same algorithms; mmcv's CPU NMS breaks exact score ties
differently, which the tie rules of `stages` allow for).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import nms as tv_nms
from torchvision.ops import roi_align as tv_roi_align

from detector.config import DetectorConfig

VERSION = "3.3.0"
CALIBRATION_PROPOSALS = 100  # proposals an image in `calibrate_norms`' pass


class _OpsStandIn(types.ModuleType):
    """`mmcv._ext`: real `nms` / `roi_align_forward`, and a loud failure for any other op."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError(f"mmcv op {name!r} is not provided by the parity stand-in (only nms and roi_align are)")

        return missing

    @staticmethod
    def nms(bboxes: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float, offset: int) -> torch.Tensor:
        if offset != 0:
            raise RuntimeError(f"mmcv nms offset={offset}: the stand-in supports 0 (mmdet 3.x's only value)")
        return tv_nms(bboxes, scores, iou_threshold)

    @staticmethod
    def roi_align_forward(inp: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, _argmax_y: torch.Tensor,
                          _argmax_x: torch.Tensor, *, aligned_height: int, aligned_width: int, spatial_scale: float,
                          sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
        if pool_mode != 1:
            raise RuntimeError("mmcv roi_align pool_mode 'max': the stand-in supports 'avg' (mmdet's RoIAlign default)")
        output.copy_(tv_roi_align(inp, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned))


def install_ops() -> None:
    """Make `import mmcv.ops` work on mmcv-lite (idempotent; refuses a real compiled mmcv)."""
    if "mmcv._ext" in sys.modules:
        return
    spec = importlib.util.find_spec("mmcv")
    if spec is None:
        raise ImportError("mmcv is not installed: the parity check needs the `parity` group (nox -s parity)")
    sys.modules["mmcv._ext"] = _OpsStandIn("mmcv._ext")


def parity_versions() -> dict[str, str]:
    import mmcv
    import mmdet
    import mmengine

    return {"mmdet": mmdet.__version__, "mmengine": mmengine.__version__, "mmcv": mmcv.__version__}


def config_dir() -> Path:
    """The configs shipped inside the mmdet wheel (`mmdet/.mim/configs`)."""
    import mmdet

    return Path(mmdet.__file__).parent / ".mim" / "configs"


def config_path(name: str) -> Path | None:
    """MMDetection's own config file called `name` (any folder), or None if 3.3.0 ships none."""
    hits = sorted(config_dir().glob(f"*/{name}.py"))
    return hits[0] if hits else None


def load_config(path: Path) -> Any:
    from mmengine.config import Config

    return Config.fromfile(str(path))


def _strip_init_cfg(node: Any) -> None:
    """Drop every `init_cfg` of type Pretrained (no download; weights come from the shared checkpoint)."""
    if isinstance(node, dict):
        init = node.get("init_cfg")
        if isinstance(init, dict) and init.get("type") == "Pretrained":
            node["init_cfg"] = None
        for value in node.values():
            _strip_init_cfg(value)
    elif isinstance(node, list):
        for value in node:
            _strip_init_cfg(value)


def build_model(cfg: Any, *, seed: int) -> Any:
    """The model of an mmengine `Config`, initialised by mmdet's own `init_weights` from `seed`,
    then every norm layer's affine parameters randomised (so a frozen BN is not the identity and a
    mis-wired norm shows); `calibrate_norms` sets the running statistics."""
    install_ops()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.logging import MMLogger

    if not MMLogger.check_instance_created("mmengine"):
        MMLogger.get_instance("mmengine", log_level="WARNING")  # init_weights logs every tensor at INFO
    register_all_modules()
    model_cfg = copy.deepcopy(cfg.model)
    _strip_init_cfg(model_cfg)
    torch.manual_seed(seed)
    model = MODELS.build(model_cfg)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in _norms(model):
            module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model


def _norms(model: Any) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate_norms(model: Any, packed: dict[str, Any]) -> None:
    """Running statistics of every BN from one test pass over `packed` (cumulative batch statistics).

    Why: with random weights and unit statistics, activations grow layer by layer until the box
    head's softmax saturates at exactly 1.0 for many boxes (seen on DC5), and such exact ties make
    both models' detections a tie-break lottery. Calibrated statistics keep every layer near unit
    scale, as a trained network's are, so scores stay distinct and the check compares the model.

    The pass keeps `CALIBRATION_PROPOSALS` proposals an image instead of the config's 1000: the
    statistics of a box head need a few hundred boxes, not thousands, and C4's box head (ResNet's
    res5 on every proposal) made the full pass 53 of the cell's 193 s. Both models then share these
    statistics (the checkpoint carries them), so the comparison itself is unchanged.
    """
    norms = _norms(model)
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
        m.training = True  # not model.train(): mmdet's norm_eval would put them back in eval
    data = model.data_preprocessor(packed, training=False)
    rpn_cfg = model.rpn_head.test_cfg if getattr(model, "with_rpn", False) else None
    kept = rpn_cfg.max_per_img if rpn_cfg is not None else 0
    if rpn_cfg is not None:
        rpn_cfg.max_per_img = min(kept, CALIBRATION_PROPOSALS)
    try:
        model.predict(data["inputs"], data["data_samples"])
    finally:
        if rpn_cfg is not None:
            rpn_cfg.max_per_img = kept
    for m in norms:
        m.training = False
        m.momentum = 0.1


def save_checkpoint(model: nn.Module, path: Path, classes: tuple[str, ...]) -> None:
    """An MMDetection 3.x checkpoint file as its `CheckpointHook` writes one (`meta` + `state_dict`)."""
    meta = {"mmdet_version": VERSION, "dataset_meta": {"classes": list(classes)}}
    torch.save({"meta": meta, "state_dict": model.state_dict()}, path)


@dataclass(frozen=True, kw_only=True)
class Deviation:
    """A recorded deviation of a cell from MMDetection's config of its name, as an edit of that config:
    `apply(mcfg, cfg)` makes MMDetection's model do what the cell does there, so that the parity
    check can prove the rest of the cell equal. `what` says the edit in words (for the page)."""

    what: str
    apply: Callable[[Any, DetectorConfig], None]


def _normalise_as_ours(mcfg: Any, cfg: DetectorConfig) -> None:
    # mmdet's DetDataPreprocessor gets BGR images (cv2) and flips them to RGB when `bgr_to_rgb`;
    # ours gets RGB and flips to BGR when `to_bgr`: the same normalisation with the flag negated.
    mcfg.model.data_preprocessor.update(mean=list(cfg.normalize.mean), std=list(cfg.normalize.std),
                                        bgr_to_rgb=not cfg.normalize.to_bgr)


# Quirk id (the prefix of a recipe note, "Q2: ...") -> its edit of MMDetection's config.
DEVIATIONS: dict[str, Deviation] = {
    "Q2": Deviation(what="MMDetection's data_preprocessor set to the cell's caffe normalisation (BGR, std 1)",
                    apply=_normalise_as_ours),
}


def recorded_deviations(notes: Iterable[str]) -> list[str]:
    """The quirk ids among a cell's recipe notes that `DEVIATIONS` can apply, in note order."""
    return [q for q in (note.split(":", 1)[0].strip() for note in notes) if q in DEVIATIONS]


def deterministic_sampling() -> Any:
    """A context manager making mmdet's `RandomSampler` take the first `num` candidates in index
    order (the bundled detector is patched to do the same, `stages.first_n_sampling`)."""
    from unittest import mock

    from mmdet.models.task_modules.samplers.random_sampler import RandomSampler

    return mock.patch.object(RandomSampler, "random_choice", lambda _self, gallery, num: gallery[:num])
