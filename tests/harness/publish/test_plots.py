"""harness.publish.plots: each function writes a real PNG, also from empty input, without pyplot state."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from harness.publish.plots import plot_ap_vs_fps, plot_ap_vs_published, plot_loss_curves

PNG = b"\x89PNG\r\n\x1a\n"


def _compared() -> pd.DataFrame:
    return pd.DataFrame({
        "name": ["faster-rcnn_r50_fpn_1x_coco", "faster-rcnn_r101_fpn_1x_coco", "faster-rcnn_r50_fpn_iou_1x_coco"],
        "box_ap": [37.3, float("nan"), 37.8],
        "ci95_low": [37.1, float("nan"), 37.8],
        "ci95_high": [37.5, float("nan"), 37.8],
        "published_box_ap": [37.4, 39.4, 37.9],
        "fps": [30.0, float("nan"), 28.0],
        "published_fps": [21.4, 15.6, float("nan")],
        "device_class": ["H200", None, "H200"],
        "verdict": ["pass", "not run", "warn"],
    })


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("plot", [plot_ap_vs_published, plot_ap_vs_fps])
def test_compare_plots_write_png(plot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = plot(_compared(), tmp_path / "sub" / "fig.png")
    assert path == tmp_path / "sub" / "fig.png"
    assert path.read_bytes()[:8] == PNG and min(_size(path)) > 200


def test_loss_curves(tmp_path: Path) -> None:
    curves = pd.DataFrame({"name": ["a"] * 3 + ["a"] * 2 + ["b"] * 3, "seed": [0] * 3 + [1] * 2 + [0] * 3,
                           "iter": [1, 2, 3, 1, 2, 1, 2, 3], "loss": [3.0, 2.0, 1.0, 2.5, 2.0, 4.0, 3.0, 2.5]})
    path = plot_loss_curves(curves, tmp_path / "loss.png")
    assert path.read_bytes()[:8] == PNG


def test_empty_inputs_still_give_a_figure(tmp_path: Path) -> None:
    empty = _compared().iloc[0:0]
    for i, plot in enumerate((plot_ap_vs_published, plot_ap_vs_fps)):
        assert plot(empty, tmp_path / f"{i}.png").read_bytes()[:8] == PNG
    curves = pd.DataFrame(columns=["name", "seed", "iter", "loss"])
    assert plot_loss_curves(curves, tmp_path / "loss.png").read_bytes()[:8] == PNG


def test_no_global_pyplot_state(tmp_path: Path) -> None:
    plot_ap_vs_published(_compared(), tmp_path / "a.png")
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []
