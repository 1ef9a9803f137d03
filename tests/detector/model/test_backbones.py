from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torchvision

from detector.config import BackboneConfig
from detector.errors import ConfigError
from detector.model.backbones import ResLayerHead, ResNet
from detector.recipes import resolve


def _first_block_strides(net: ResNet, layer: str = "layer2") -> tuple[int, int]:
    block = getattr(net, layer)[0]
    return block.conv1.stride[0], block.conv2.stride[0]


def test_stride_on_3x3_for_pytorch_and_on_1x1_for_caffe() -> None:
    pytorch = ResNet(BackboneConfig(style="pytorch"))
    caffe = ResNet(BackboneConfig(style="caffe"))
    for layer in ("layer2", "layer3", "layer4"):
        assert _first_block_strides(pytorch, layer) == (1, 2)
        assert _first_block_strides(caffe, layer) == (2, 1)
        assert getattr(pytorch, layer)[0].downsample[0].stride == (2, 2)
    assert _first_block_strides(pytorch, "layer1") == (1, 1)


def test_output_shapes_r50() -> None:
    net = ResNet(BackboneConfig()).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]
    assert net.out_channels == [256, 512, 1024, 2048]


def test_c4_and_dc5_trunks() -> None:
    c4 = ResNet(resolve({"style": "caffe", "neck": "c4"}).backbone).eval()
    dc5 = ResNet(resolve({"style": "caffe", "neck": "dc5"}).backbone).eval()
    assert not hasattr(c4, "layer4")
    with torch.no_grad():
        (c4_out,) = c4(torch.randn(1, 3, 64, 96))
        (dc5_out,) = dc5(torch.randn(1, 3, 64, 96))
    assert tuple(c4_out.shape) == (1, 1024, 4, 6)
    assert tuple(dc5_out.shape) == (1, 2048, 4, 6)  # dilated C5 stays at stride 16
    for block in dc5.layer4:
        assert block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2)
        assert block.conv1.stride == (1, 1) and block.conv2.stride == (1, 1)


def test_res5_shared_head_shape_and_keys() -> None:
    head = ResLayerHead(resolve({"style": "caffe", "neck": "c4"}).backbone).eval()
    with torch.no_grad():
        out = head(torch.randn(2, 1024, 14, 14))
    assert tuple(out.shape) == (2, 2048, 7, 7)
    assert "layer4.0.downsample.0.weight" in head.state_dict()
    assert head.layer4[0].conv1.stride == (2, 2)  # caffe: stride on the first 1x1
    assert not any(p.requires_grad for n, p in head.named_parameters() if ".bn" in n or "downsample.1" in n)


@pytest.mark.parametrize(
    ("groups", "base_width", "width"),
    [(1, 64, 64), (32, 4, 128), (64, 4, 256), (32, 8, 256)],
)
def test_resnext_width(groups: int, base_width: int, width: int) -> None:
    net = ResNet(BackboneConfig(depth=50, groups=groups, base_width=base_width))
    conv2 = net.layer1[0].conv2
    assert conv2.out_channels == width and conv2.groups == groups
    # mmdet: width = floor(planes * base_width / 64) * groups, doubling per stage.
    assert net.layer4[0].conv2.out_channels == width * 8


def test_frozen_stages_and_norm_eval_in_train_mode() -> None:
    net = ResNet(BackboneConfig(frozen_stages=1, norm="bn_eval")).train()
    for name, p in net.named_parameters():
        frozen = name.startswith(("conv1", "bn1", "layer1."))
        assert p.requires_grad is (not frozen), name
    assert not net.layer1.training and not net.conv1.training
    assert net.layer2.training  # convs of unfrozen stages train...
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))  # ...BN never does
    before = net.layer3[0].bn1.running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, net.layer3[0].bn1.running_mean)


def test_frozen_norm_freezes_affine() -> None:
    net = ResNet(BackboneConfig(norm="frozen"))
    assert not net.layer4[0].bn1.weight.requires_grad
    assert net.layer4[0].conv1.weight.requires_grad


def test_keys_and_outputs_match_torchvision_resnet50() -> None:
    ours = ResNet(BackboneConfig()).eval()
    tv = torchvision.models.resnet50().eval()
    tv_state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert set(ours.state_dict()) == set(tv_state)  # incl. running stats and num_batches_tracked
    ours.load_state_dict(tv_state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c5 = ours(x)[-1]
        ref = torch.nn.Sequential(*list(tv.children())[:-2])(x)
    torch.testing.assert_close(c5, ref)


def test_resnext_matches_torchvision_layout() -> None:
    ours = ResNet(BackboneConfig(depth=50, groups=32, base_width=4))
    tv = torchvision.models.resnext50_32x4d()
    shapes = {k: v.shape for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes


def test_bad_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="depth"):
        ResNet(replace(BackboneConfig(), depth=34))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="out_indices"):
        ResNet(BackboneConfig(num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(3,)))
