from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from detector.config import DataConfig
from detector.data.transforms import (
    DetTransform,
    build_transform,
    hflip,
    rescale_size,
    resize,
)
from detector.recipes import MS_CHOICE, MS_RANGE


@pytest.mark.parametrize(
    ("wh", "scale", "expected"),
    [
        ((640, 480), (1333, 800), (1067, 800)),
        ((480, 640), (1333, 800), (800, 1067)),
        ((1000, 200), (1333, 800), (1333, 267)),  # long side binds
        ((500, 375), (800, 1333), (1067, 800)),  # (short, long) order does not matter, as in mmcv
        ((640, 427), (320, 192), (288, 192)),
        ((333, 500), (1333, 800), (800, 1201)),  # 500 * 800 / 333 = 1201.2 -> int(x + 0.5)
    ],
)
def test_rescale_size_matches_mmcv_formula(wh: tuple[int, int], scale: tuple[int, int], expected: tuple[int, int]) -> None:
    assert rescale_size(*wh, scale) == expected


def test_resize_boxes_use_actual_ratios_and_clip() -> None:
    image = torch.zeros(3, 427, 640, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 110.0, 220.0], [600.0, 400.0, 700.0, 500.0]])
    out, new_boxes, (ws, hs) = resize(image, boxes, (1333, 800))
    assert out.shape == (3, 800, 1199) and out.dtype == torch.uint8
    assert ws == 1199 / 640 and hs == 800 / 427 and ws != hs
    assert torch.allclose(new_boxes[0], torch.tensor([10 * ws, 20 * hs, 110 * ws, 220 * hs]))
    assert new_boxes[1].tolist() == pytest.approx([600 * ws, 400 * hs, 1199.0, 800.0])  # clipped to W, H


def test_resize_is_half_pixel_bilinear() -> None:
    # Downscaling by exactly 2 with half-pixel centres and no antialiasing averages 2x2 blocks,
    # which is what cv2.INTER_LINEAR (mmcv's backend) does.
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 96), generator=gen, dtype=torch.uint8)
    out, _, _ = resize(image, torch.zeros(0, 4), (48, 32))
    expected = image.float().reshape(3, 32, 2, 48, 2).mean(dim=(2, 4)).round()
    assert out.shape == (3, 32, 48)
    assert (out.float() - expected).abs().max() <= 1  # rounding of .5 ties only
    const = torch.full((3, 30, 40), 77, dtype=torch.uint8)
    assert bool((resize(const, torch.zeros(0, 4), (1333, 800))[0] == 77).all())


def test_hflip_boxes_and_involution() -> None:
    image = torch.arange(2 * 3 * 5, dtype=torch.uint8).reshape(2, 3, 5)[:1].expand(3, 3, 5)
    boxes = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.5, 0.0, 5.0, 2.0]])
    flipped_img, flipped = hflip(image, boxes)
    assert flipped.tolist() == [[3.0, 1.0, 5.0, 3.0], [0.0, 0.0, 3.5, 2.0]]
    assert torch.equal(flipped_img[:, :, 0], image[:, :, -1])
    back_img, back = hflip(flipped_img, flipped)
    assert torch.equal(back_img, image) and torch.equal(back, boxes)


def test_flip_keeps_object_under_its_box() -> None:
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, 10:20, 5:15] = 255
    t = DetTransform(long_side=60, short_sides=(40,), flip_prob=1.0)
    out, boxes, meta = t(image, torch.tensor([[5.0, 10.0, 15.0, 20.0]]), np.random.default_rng(0))
    assert meta["flipped"] and boxes.tolist() == [[45.0, 10.0, 55.0, 20.0]]
    assert bool((out[:, 10:20, 45:55] == 255).all()) and int(out.sum()) == 255 * 3 * 100


def test_ms_range_draws_integers_in_range_and_is_seeded() -> None:
    t = build_transform(replace(DataConfig(), train_scale="ms_range", ms_short_sides=MS_RANGE), train=True)
    assert t.mode == "ms_range" and t.long_side == 1333 and t.flip_prob == 0.5
    draws = [t.sample_scale(np.random.default_rng([0, 0, i]))[1] for i in range(400)]
    assert min(draws) >= 640 and max(draws) <= 800 and len(set(draws)) > 100
    again = [t.sample_scale(np.random.default_rng([0, 0, i]))[1] for i in range(400)]
    assert draws == again


def test_ms_choice_and_flip_rate() -> None:
    t = build_transform(replace(DataConfig(), train_scale="ms_choice", ms_short_sides=MS_CHOICE), train=True)
    rng = np.random.default_rng(1)
    assert {t.sample_scale(rng)[1] for _ in range(200)} == set(MS_CHOICE)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    small = DetTransform(long_side=8, short_sides=(8,), flip_prob=0.5)
    flips = [small(image, torch.zeros(0, 4), np.random.default_rng([5, i]))[2]["flipped"] for i in range(400)]
    assert 150 < sum(flips) < 250


def test_test_pipeline_and_image_scale_override() -> None:
    data = replace(DataConfig(), train_scale="ms_range", ms_short_sides=MS_RANGE)
    test = build_transform(data, train=False)
    assert (test.mode, test.short_sides, test.flip_prob, test.random) == ("single", (800,), 0.0, False)
    small = build_transform(data, train=True, image_scale=(320, 192))
    assert small.long_side == 320 and small.short_sides == (154, 192)
    choice = build_transform(replace(data, train_scale="ms_choice", ms_short_sides=MS_CHOICE), train=True, image_scale=(320, 192))
    assert choice.short_sides == (154, 161, 169, 177, 184, 192)
    single = build_transform(DataConfig(), train=True, image_scale=(320, 192))
    image, _, meta = single(torch.zeros(3, 480, 640, dtype=torch.uint8), torch.zeros(0, 4), np.random.default_rng(0))
    assert image.shape == (3, 192, 256) and meta["scale_factor"] == (0.4, 0.4)


def test_bad_transform_settings() -> None:
    with pytest.raises(ValueError, match="allowed"):
        DetTransform(long_side=10, short_sides=(5,), mode="random")
    with pytest.raises(ValueError, match="short sides"):
        DetTransform(long_side=10, short_sides=(5,), mode="ms_range")
    with pytest.raises(ValueError, match="ms_short_sides"):
        build_transform(replace(DataConfig(), train_scale="ms_range"), train=True)
    with pytest.raises(ValueError, match="random generator"):
        DetTransform(long_side=10, short_sides=(5,), flip_prob=0.5)(torch.zeros(3, 5, 5, dtype=torch.uint8), torch.zeros(0, 4))


def test_resize_is_cv2_inter_linear_bit_for_bit() -> None:
    # Parity D3: MMDetection resizes with cv2.INTER_LINEAR on uint8, whose fixed-point weights round
    # differently from a float bilinear + round in ~10% of values; ours must be cv2's exactly.
    import cv2

    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 37, 53), generator=gen, dtype=torch.uint8)
    out, _, _ = resize(image, torch.zeros(0, 4), (1333, 800))
    new_w, new_h = rescale_size(53, 37, (1333, 800))
    ref = cv2.resize(image.permute(1, 2, 0).numpy().copy(), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    assert out.shape == (3, new_h, new_w) and out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(out, torch.from_numpy(ref).permute(2, 0, 1))
    floaty = torch.nn.functional.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    assert not torch.equal(out, floaty.round().to(torch.uint8))  # the rounding the old path had
