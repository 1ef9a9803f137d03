"""ResNet / ResNeXt backbones laid out exactly like MMDetection's `ResNet` / `ResNeXt`.

Shorthand used in docstrings:
    N: images in the batch, C: channels, H, W: feature height and width.
    res2..res5 (`layer1`..`layer4`): the four bottleneck stages, strides 4, 8, 16, 32 (DC5: res5 at 16).

Parameter names match MMDetection checkpoint keys (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.bn1`,
`layer1.0.downsample.0` / `.1`, ...), so torchvision / open-mmlab ImageNet weights and published
detector checkpoints load without renaming. BatchNorm stays a real `nn.BatchNorm2d` (weight, bias,
running_mean, running_var, num_batches_tracked) because the checkpoints carry all five keys; its
statistics are always frozen (mmdet `norm_eval=True`), its affine is trainable ("bn_eval") or not
("frozen", mmdet `norm_cfg.requires_grad=False`, used by caffe and Detectron2 weights).
"""

from __future__ import annotations

import math
from typing import cast

from torch import Tensor, nn

from detector.config import BackboneConfig
from detector.errors import ConfigError
from detector.model.fold import FOLD_MODES, FoldMode, clear_fold_cache_, conv_bn

# Bottleneck blocks per stage (reference 1.5: depth 50 / 101).
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4


class Bottleneck(nn.Module):
    """MMDetection `Bottleneck` (ResNet) / ResNeXt `Bottleneck`.

    `style="pytorch"` puts the stride on the 3x3 conv (torchvision weights); `style="caffe"` puts it
    on the first 1x1 conv (MSRA / Detectron weights). The only difference between the two is where
    the stride sits (reference Q9). ResNeXt width follows mmdet: `floor(planes * base_width / 64) *
    groups` when `groups > 1`, else `planes`.
    """

    def __init__(
        self,
        *,
        inplanes: int,
        planes: int,
        stride: int,
        dilation: int,
        style: str,
        groups: int,
        base_width: int,
        downsample: nn.Sequential | None,
    ) -> None:
        super().__init__()
        width = planes if groups == 1 else math.floor(planes * base_width / 64) * groups
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = nn.Conv2d(inplanes, width, 1, stride=conv1_stride, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride=conv2_stride, padding=dilation, dilation=dilation, groups=groups, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        # `conv_bn` folding: off for a bare module (plain BN, bit-for-bit torchvision's ResNet math);
        # the detector sets its mode with `set_fold_bn_`.
        self.fold_bn: FoldMode = "off"

    def forward(self, x: Tensor) -> Tensor:
        fold = self.fold_bn
        if self.downsample is None:
            identity = x
        else:
            conv, bn = cast(nn.Conv2d, self.downsample[0]), cast(nn.BatchNorm2d, self.downsample[1])
            identity = conv_bn(conv, bn, x, fold=fold)
        out = self.relu(conv_bn(self.conv1, self.bn1, x, fold=fold))
        out = self.relu(conv_bn(self.conv2, self.bn2, out, fold=fold))
        out = conv_bn(self.conv3, self.bn3, out, fold=fold)
        out += identity  # in place: neither the conv nor the BN backward needs this tensor
        return self.relu(out)


def make_res_layer(
    *,
    inplanes: int,
    planes: int,
    blocks: int,
    stride: int,
    dilation: int,
    style: str,
    groups: int,
    base_width: int,
) -> nn.Sequential:
    """One ResNet stage as mmdet `ResLayer`: the first block strides and projects, all blocks share
    the stage's dilation (DC5 dilates every block of res5)."""
    downsample: nn.Sequential | None = None
    if stride != 1 or inplanes != planes * EXPANSION:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * EXPANSION),
        )
    layers = []
    for i in range(blocks):
        layers.append(
            Bottleneck(
                inplanes=inplanes if i == 0 else planes * EXPANSION,
                planes=planes,
                stride=stride if i == 0 else 1,
                dilation=dilation,
                style=style,
                groups=groups,
                base_width=base_width,
                downsample=downsample if i == 0 else None,
            )
        )
    return nn.Sequential(*layers)


def init_resnet_(module: nn.Module) -> None:
    """mmdet ResNet random init: Kaiming-normal (fan_out, relu) convs, BN = (1, 0), and the last BN of
    every bottleneck zeroed (`zero_init_residual=True`, mmdet's default). Pretrained weights, when
    loaded, replace all of it."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)


def freeze_norm_affine_(module: nn.Module) -> None:
    """mmdet `norm_cfg=dict(type='BN', requires_grad=False)`: BN weight and bias are not trained."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            for p in m.parameters():
                p.requires_grad_(False)


def set_fold_bn_(module: nn.Module, mode: FoldMode) -> None:
    """Where frozen-statistics BN is folded into the preceding conv (`fold.conv_bn`, `fold.FoldMode`)
    everywhere in `module`; "off" keeps the plain path, to check that the folded one computes the
    same thing. Either way the folded constants cached so far are forgotten (`fold.clear_fold_cache_`)."""
    if mode not in FOLD_MODES:
        raise ValueError(f"set_fold_bn_: mode {mode!r}; allowed: {', '.join(FOLD_MODES)}")
    clear_fold_cache_(module)
    for m in module.modules():
        if isinstance(m, (Bottleneck, ResNet)):  # the modules with a conv_bn
            m.fold_bn = mode


def set_norm_eval_(module: nn.Module) -> None:
    """mmdet `norm_eval=True`: BN uses (and never updates) its running statistics, even in training."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class ResNet(nn.Module):
    """ResNet-50/101 and ResNeXt-101 (mmdet `ResNet` / `ResNeXt`, `deep_stem=False`, `avg_down=False`).

    `forward(x: Tensor[N, 3, H, W]) -> list[Tensor]`: the stages in `cfg.out_indices`, e.g. for R-50
    `[N,256,H/4,W/4], [N,512,H/8,W/8], [N,1024,H/16,W/16], [N,2048,H/32,W/32]`.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.depth not in STAGE_BLOCKS:
            raise ConfigError(f"backbone.depth: {cfg.depth!r} is not allowed; allowed: {', '.join(map(str, STAGE_BLOCKS))}")
        if not 1 <= cfg.num_stages <= 4 or len(cfg.strides) != cfg.num_stages or len(cfg.dilations) != cfg.num_stages:
            raise ConfigError("backbone: num_stages must be 1..4 with one stride and one dilation per stage")
        if cfg.style not in ("pytorch", "caffe"):
            raise ConfigError(f"backbone.style: {cfg.style!r} is not allowed; allowed: 'pytorch', 'caffe'")
        if cfg.norm not in ("bn_eval", "frozen"):
            raise ConfigError(f"backbone.norm: {cfg.norm!r} is not allowed; allowed: 'bn_eval', 'frozen'")
        if any(not 0 <= i < cfg.num_stages for i in cfg.out_indices):
            raise ConfigError(f"backbone.out_indices: {cfg.out_indices!r} must lie in 0..{cfg.num_stages - 1}")
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        self.res_layers: list[str] = []
        for i, blocks in enumerate(STAGE_BLOCKS[cfg.depth][: cfg.num_stages]):
            planes = 64 * 2**i
            layer = make_res_layer(
                inplanes=inplanes,
                planes=planes,
                blocks=blocks,
                stride=cfg.strides[i],
                dilation=cfg.dilations[i],
                style=cfg.style,
                groups=cfg.groups,
                base_width=cfg.base_width,
            )
            name = f"layer{i + 1}"
            self.add_module(name, layer)
            self.res_layers.append(name)
            inplanes = planes * EXPANSION
        self.out_channels = [64 * 2**i * EXPANSION for i in cfg.out_indices]
        self.fold_bn: FoldMode = "off"  # the stem's conv_bn; see Bottleneck
        init_resnet_(self)
        if cfg.norm == "frozen":
            freeze_norm_affine_(self)
        self._freeze_stages()

    def _frozen_modules(self) -> list[nn.Module]:
        """Stem plus the first `frozen_stages` stages (mmdet `_freeze_stages`)."""
        if self.cfg.frozen_stages < 0:
            return []
        mods: list[nn.Module] = [self.conv1, self.bn1]
        mods += [getattr(self, f"layer{i}") for i in range(1, min(self.cfg.frozen_stages, self.cfg.num_stages) + 1)]
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        # Frozen stages stay in eval and every BN keeps its running statistics (norm_eval=True).
        super().train(mode)
        self._freeze_stages()
        if mode:
            set_norm_eval_(self)
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(conv_bn(self.conv1, self.bn1, x, fold=self.fold_bn)))
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.cfg.out_indices:
                outs.append(x)
        return outs


class ResLayerHead(nn.Module):
    """C4's shared RoI head (mmdet `shared_heads.ResLayer`, stage 3): res5 run on each 14x14 RoI.

    Named `layer4` inside, so checkpoint keys read `roi_head.shared_head.layer4.<block>...`. Same
    style, groups and width as the trunk, stride 2, dilation 1, BN statistics frozen
    (reference 1.6); `frozen` norm also freezes the affine.

    `forward(x: Tensor[R, 1024, 14, 14]) -> Tensor[R, 2048, 7, 7]`.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        blocks = STAGE_BLOCKS[cfg.depth][3]
        self.layer4 = make_res_layer(
            inplanes=1024,
            planes=512,
            blocks=blocks,
            stride=2,
            dilation=1,
            style=cfg.style,
            groups=cfg.groups,
            base_width=cfg.base_width,
        )
        self.out_channels = 2048
        init_resnet_(self)
        if cfg.norm == "frozen":
            freeze_norm_affine_(self)

    def train(self, mode: bool = True) -> ResLayerHead:
        super().train(mode)
        if mode:
            set_norm_eval_(self)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(x)


def build_backbone(cfg: BackboneConfig) -> ResNet:
    """The ResNet / ResNeXt trunk described by `cfg` (ResNeXt when `cfg.groups > 1`)."""
    return ResNet(cfg)


__all__ = ["Bottleneck", "ResLayerHead", "ResNet", "build_backbone", "make_res_layer", "set_fold_bn_", "set_norm_eval_"]

