from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from detector.config import NeckConfig
from detector.model.necks import FPN, build_neck
from detector.recipes import resolve


def _feats(h: int, w: int) -> list[torch.Tensor]:
    # C2..C5 of an (h, w) image: ceil-divided sizes as a stride-2 conv stack produces them.
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in (4, 8, 16, 32)]
    return [torch.randn(1, c, *hw) for c, hw in zip((256, 512, 1024, 2048), sizes)]


def test_fpn_shapes_p2_to_p6_on_odd_sizes() -> None:
    fpn = FPN(NeckConfig()).eval()
    with torch.no_grad():
        outs = fpn(_feats(100, 148))
    assert [tuple(o.shape[-2:]) for o in outs] == [(25, 37), (13, 19), (7, 10), (4, 5), (2, 3)]
    assert all(o.shape[1] == 256 for o in outs)


def test_p6_is_strided_max_pool_of_p5() -> None:
    fpn = FPN(NeckConfig()).eval()
    with torch.no_grad():
        outs = fpn(_feats(128, 128))
    torch.testing.assert_close(outs[4], F.max_pool2d(outs[3], 1, stride=2))


def test_top_down_uses_nearest_upsampling() -> None:
    fpn = FPN(NeckConfig(in_channels=(4, 4), out_channels=4, num_outs=2)).eval()
    with torch.no_grad():
        # Identity laterals and identity 3x3 output convs expose the top-down merge itself.
        for m in (*fpn.lateral_convs, *fpn.fpn_convs):
            k = m.conv.weight.shape[-1]
            m.conv.weight.zero_()
            m.conv.weight[:, :, k // 2, k // 2] = torch.eye(4)
        # Quarters: every sum below is exact in float32, so the last check can ask for equality
        # (random normals made it fail whenever a sum rounded).
        fine = torch.randint(-40, 40, (1, 4, 5, 5), generator=torch.Generator().manual_seed(0)).float() / 4
        coarse = torch.arange(36.0).view(1, 4, 3, 3)
        p_fine, p_coarse = fpn([fine, coarse])
    torch.testing.assert_close(p_coarse, coarse)
    # Upsampled to the fine level's exact (odd) size, nearest neighbour.
    torch.testing.assert_close(p_fine, fine + F.interpolate(coarse, size=(5, 5), mode="nearest"))
    assert p_fine[0, 0, 4, 4] - fine[0, 0, 4, 4] == coarse[0, 0, 2, 2]


def test_fpn_init_and_keys() -> None:
    fpn = FPN(NeckConfig())
    keys = set(fpn.state_dict())
    assert {"lateral_convs.0.conv.weight", "lateral_convs.3.conv.bias", "fpn_convs.3.conv.weight"} <= keys
    assert "fpn_convs.4.conv.weight" not in keys  # P6 has no conv (add_extra_convs=False)
    w = fpn.fpn_convs[0].conv.weight
    bound = math.sqrt(6.0 / (256 * 9 + 256 * 9))  # Xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.count_nonzero(fpn.fpn_convs[0].conv.bias) == 0


def test_no_neck_for_c4_and_dc5() -> None:
    assert build_neck(resolve({"style": "caffe", "neck": "c4"}).neck) is None
    assert build_neck(resolve({"style": "caffe", "neck": "dc5"}).neck) is None
    assert isinstance(build_neck(resolve({}).neck), FPN)
