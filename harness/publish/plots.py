"""Figures for the results page: pure functions, a DataFrame in, one PNG out.

Each function builds its own `matplotlib.figure.Figure` on the Agg canvas (no pyplot, no global
state, safe in threads and on machines without a display), writes `path`, and returns it. An empty
input still gives a figure that says so, so the page never links a missing file.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.metrics import finite

# One colour per verdict (colour-blind-safe Okabe-Ito hues).
VERDICT_COLORS: dict[str, str] = {
    "pass": "#009E73",
    "warn": "#E69F00",
    "fail": "#D55E00",
    "not comparable": "#0072B2",
    "not run": "#999999",
}
DPI = 110


def plot_ap_vs_published(compared: pd.DataFrame, path: Path) -> Path:
    """Measured vs published box AP per cell (a dot plot, one line per cell).

    Args:
        compared: a `harness.results.compare.compare()` frame (name, box_ap, ci95_low, ci95_high,
            published_box_ap, verdict).
        path: the PNG to write.
    """
    df = compared[compared["published_box_ap"].notna()].reset_index(drop=True)
    fig = Figure(figsize=(8.0, 0.28 * max(len(df), 4) + 1.2))
    ax = fig.add_subplot()
    if df.empty:
        return _empty(fig, ax, "no cell with a published box AP", path)
    y = list(range(len(df)))[::-1]
    ax.scatter(df["published_box_ap"], y, marker="|", s=140, color="black", label="published", zorder=3)
    for yi, row in zip(y, df.itertuples(index=False)):
        if not finite(row.box_ap):
            continue
        color = VERDICT_COLORS.get(row.verdict, "#999999")
        low, high = row.ci95_low, row.ci95_high
        if finite(low) and finite(high) and high > low:
            ax.plot([low, high], [yi, yi], color=color, linewidth=2, alpha=0.6)
        ax.scatter([row.box_ap], [yi], color=color, s=28, zorder=4)
    for verdict, color in VERDICT_COLORS.items():
        if (df["verdict"] == verdict).any() and df.loc[df["verdict"] == verdict, "box_ap"].notna().any():
            ax.scatter([], [], color=color, s=28, label=f"measured ({verdict})")
    ax.set_yticks(y)
    ax.set_yticklabels(df["name"], fontsize=7)
    ax.set_xlabel("box AP (COCO AP@[.5:.95], %)")
    ax.set_title("Measured vs published box AP (bars: 95% interval over seeds)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_ap_vs_fps(compared: pd.DataFrame, path: Path) -> Path:
    """box AP against inference speed, measured (filled) and published (hollow), one point per cell."""
    fig = Figure(figsize=(7.0, 5.0))
    ax = fig.add_subplot()
    pub = compared[compared["published_fps"].notna() & compared["published_box_ap"].notna()]
    mes = compared[compared["fps"].notna() & compared["box_ap"].notna()]
    if pub.empty and mes.empty:
        return _empty(fig, ax, "no cell with both fps and box AP", path)
    if not pub.empty:
        # Published points unlabelled (a grey line joins each to its measured point): two labels per
        # cell overlapped into a smear.
        ax.scatter(pub["published_fps"], pub["published_box_ap"], facecolors="none", edgecolors="black", s=40,
                   label="published (V100)")
        both = pub[pub["fps"].notna() & pub["box_ap"].notna()]
        for row in both.itertuples(index=False):
            ax.plot([row.published_fps, row.fps], [row.published_box_ap, row.box_ap], color="#999999", linewidth=0.6)
    if not mes.empty:
        devices = ", ".join(sorted({str(d) for d in mes["device_class"].dropna()})) or "unknown device"
        ax.scatter(mes["fps"], mes["box_ap"], color="#0072B2", s=30, label=f"measured ({devices})")
        for row in mes.itertuples(index=False):
            ax.annotate(_short(row.name), (row.fps, row.box_ap), fontsize=6, color="#0072B2",
                        xytext=(3, -8), textcoords="offset points")
    ax.set_xlabel("inference speed (images / s, batch 1)")
    ax.set_ylabel("box AP (%)")
    ax.set_title("box AP against inference speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_curves(curves: pd.DataFrame, path: Path) -> Path:
    """Training loss against iteration: one small panel per cell (its seeds as lines, labelled),
    sharing both axes, so that 30 cells stay readable without a 30-entry legend.

    Args:
        curves: a `harness.results.collect.load_loss_curves()` frame (name, seed, iter, loss).
    """
    if curves.empty:
        fig = Figure(figsize=(8.0, 5.0))
        return _empty(fig, fig.add_subplot(), "no training log (log.jsonl) found", path)
    names = list(dict.fromkeys(curves.sort_values(["name"])["name"]))
    cols = min(5, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(2.6 * cols, 1.9 * rows + 0.6))
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        g_all = curves[curves["name"] == name].sort_values(["seed", "iter"])
        for seed, g in g_all.groupby("seed", sort=True):
            # Markers when a run logged few points (a smoke run may log one), else a line alone is invisible.
            ax.plot(g["iter"], g["loss"], linewidth=1, marker="o" if len(g) < 20 else None, markersize=2,
                    label=f"seed {seed}")  # fmt: skip
        ax.set_title(_short(str(name)), fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if g_all["seed"].nunique() > 1:
            ax.legend(fontsize=5)
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].set_axis_off()
    fig.suptitle(f"Training loss (sum of the four terms) against iteration, {len(names)} cell(s)", fontsize=9)
    return _save(fig, path)


def _empty(fig: Figure, ax: Axes, message: str, path: Path) -> Path:
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="#666666")
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _short(name: str) -> str:
    """`faster-rcnn_r50_fpn_1x_coco` -> `r50_fpn_1x` for point labels."""
    return name.removeprefix("faster-rcnn_").removesuffix("_coco").replace("_coco-", " ")



__all__ = ["VERDICT_COLORS", "plot_ap_vs_fps", "plot_ap_vs_published", "plot_loss_curves"]
