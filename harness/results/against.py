"""`harness compare MATRIX --against OTHER_RUNS`: two sets of runs of one profile, cell by cell.

The question after a library upgrade, a new driver, another GPU or a code change is not "does the
published table hold" but "did my numbers move": the earlier runs (`--against`) take the place of the
published table and the same rules judge the difference, with the matrix's tolerances:

- box AP: the difference of the means, with a 95% Welch interval where a side has several seeds, in
  the AP bands around 0 (`harness.metrics.ap_verdict`); only between runs scored on the same split,
  the same number of images and the same categories.
- Mem: one-sided, as against the published Mem: more than `mem_rel` above the earlier runs fails; only
  between the same kind of memory (CUDA `max_memory_allocated` or CPU peak RSS).
- fps: within `FPS_REL` passes, beyond warns (speed is indicative); only on the same device class.
- training images/s: shown beside them, not judged (data loading and the host weigh in).
- per category: where both sides recorded each category's AP (metrics.json `category_ap`) and the box
  AP is compared, the change of each category's AP in points (`category_deltas`, largest first; the
  terminal shows the five largest a cell). Shown, not judged: one category's AP over a few hundred
  instances moves more from seed to seed than the mean does; it says where a moved AP moved.

A cell run on one side only is "not run"; a failed run on the compared side fails the cell.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness import text
from harness.matrix.spec import MatrixSpec
from harness.metrics import FPS_REL, Verdict, ap_verdict, finite, fps_change_verdict, mem_change_verdict
from harness.results.collect import collect
from harness.results.verdicts import VERDICTS, combine, t_critical
from harness.text import clip, num

AGAINST_COLUMNS: tuple[str, ...] = (
    "name", "status", "n_seeds", "n_seeds_against", "box_ap", "against_box_ap", "delta_box_ap", "delta_low",
    "delta_high", "ap_verdict", "mem_gb", "against_mem_gb", "delta_mem_rel", "mem_verdict", "fps", "against_fps",
    "delta_fps_rel", "fps_verdict", "train_images_per_s", "against_train_images_per_s", "category_deltas", "verdict",
    "reason",
)  # fmt: skip
CATEGORIES_SHOWN = 5  # per cell, in the terminal
# What is said of each side in the header: what changed between them is usually why the user compares.
PROVENANCE = (("torch_version", "torch"), ("torchvision_version", "torchvision"), ("device", "device"),
              ("git_commit", "commit"))  # fmt: skip


def compare_against(matrix: MatrixSpec, profile: str, runs_dir: Path, against: Path) -> pd.DataFrame:
    """One row per matrix cell (matrix order) with `AGAINST_COLUMNS`: `runs_dir`'s runs judged against `against`'s."""
    now, then = collect(matrix, profile, runs_dir), collect(matrix, profile, against)
    tol = matrix.tolerances
    rows = [_cell(now[now["name"] == c.name], then[then["name"] == c.name], c.name, tol.box_ap_pass,
                  tol.box_ap_warn, tol.mem_rel) for c in matrix.cells]  # fmt: skip
    return pd.DataFrame(rows, columns=list(AGAINST_COLUMNS))


def _cell(now: pd.DataFrame, then: pd.DataFrame, name: str, ap_pass: float, ap_warn: float, mem_rel: float) -> dict[str, Any]:
    ok, ref = now[now["status"] == "ok"], then[then["status"] == "ok"]
    failed = now[~now["status"].isin(["ok", "skipped", "not run"])]
    out: dict[str, Any] = {"name": name, "n_seeds": len(ok), "n_seeds_against": len(ref)}
    for column in ("box_ap", "mem_gb", "fps", "train_images_per_s"):
        out[column], out[f"against_{column}"] = _mean(ok[column]), _mean(ref[column])
    if len(failed):
        out.update(status="failed", verdict="fail", reason=f"{len(failed)} run(s) failed: {_last_line(failed['error'].iloc[-1])}")
        return out
    if not len(ok) or not len(ref):
        where = "here" if not len(ok) else "in --against"
        out.update(status="not run" if not len(ok) else "ok", verdict="not run", reason=f"no finished run {where}")
        return out
    out["status"] = "ok"
    verdicts: dict[str, Verdict] = {}
    reasons: list[str] = []
    verdicts["box_ap"] = _ap(ok, ref, out, ap_pass, ap_warn, reasons)
    verdicts["mem"] = _mem(ok, ref, out, mem_rel, reasons)
    verdicts["fps"] = _fps(ok, ref, out, reasons)
    out.update(ap_verdict=verdicts["box_ap"], mem_verdict=verdicts["mem"], fps_verdict=verdicts["fps"])
    out.update(verdict=combine(verdicts.values()), reason="; ".join(reasons))
    return out


def _ap(ok: pd.DataFrame, ref: pd.DataFrame, out: dict[str, Any], ap_pass: float, ap_warn: float, reasons: list[str]) -> Verdict:
    a, b = _values(ok["box_ap"]), _values(ref["box_ap"])
    if not a or not b:
        reasons.append("no box AP on " + ("this side" if not a else "the --against side"))
        return "not comparable"
    for column, what in (("eval_split", "split"), ("eval_images", "number of images"), ("other_categories", "categories")):
        mine, theirs = _kinds(ok, column), _kinds(ref, column)
        if mine != theirs:
            reasons.append(f"box AP scored on another {what} ({_show(mine)} here, {_show(theirs)} in --against)")
            return "not comparable"
    delta, half = _welch(a, b)
    out.update(delta_box_ap=round(delta, 3), delta_low=delta - half, delta_high=delta + half,
               category_deltas=_category_deltas(ok, ref))
    verdict = ap_verdict(delta - half, delta + half, 0.0, pass_band=ap_pass, warn_band=ap_warn)
    if verdict != "pass":
        interval = f" (95% interval [{delta - half:+.2f}, {delta + half:+.2f}])" if half else ""
        reasons.append(f"box AP moved by {delta:+.2f}{interval}, more than {ap_pass}")
    return verdict


def _category_deltas(ok: pd.DataFrame, ref: pd.DataFrame) -> dict[str, float] | None:
    """Each category's AP change in points (the mean over each side's seeds), largest change first;
    only categories scored on every run of both sides; None when a side's runs did not record them."""
    a, b = _category_means(ok), _category_means(ref)
    if a is None or b is None:
        return None
    deltas = {name: round(100 * (a[name] - b[name]), 3) for name in a.keys() & b.keys()}
    return dict(sorted(deltas.items(), key=lambda item: (-abs(item[1]), item[0])))


def _category_means(rows: pd.DataFrame) -> dict[str, float] | None:
    recorded = [r for r in rows["category_ap"] if isinstance(r, dict)] if "category_ap" in rows else []
    if not recorded or len(recorded) != len(rows):  # a seed without them would make the means unlike
        return None
    names = set.intersection(*({name for name, ap in r.items() if finite(ap)} for r in recorded))
    return {name: sum(float(r[name]) for r in recorded) / len(recorded) for name in names}


def _relative(ok: pd.DataFrame, ref: pd.DataFrame, out: dict[str, Any], column: str, context: str, delta: str,
              reasons: list[str]) -> float | None:
    """The relative change of `column` from --against, stored as `out[delta]`; None (with a reason when
    the kinds differ) where it is not comparable: a side without it, or measured on another kind
    (`context`: the memory kind, the device class)."""
    a, b = out[column], out[f"against_{column}"]
    if a is None or b is None or b <= 0:
        return None
    kinds = _kinds(ok, context) | _kinds(ref, context)
    if len(kinds) != 1:
        reasons.append(f"{column} of different {context.replace('_', ' ')}s ({_show(kinds)})")
        return None
    out[delta] = d = (a - b) / b
    return d


def _mem(ok: pd.DataFrame, ref: pd.DataFrame, out: dict[str, Any], mem_rel: float, reasons: list[str]) -> Verdict:
    d = _relative(ok, ref, out, "mem_gb", "mem_kind", "delta_mem_rel", reasons)
    if d is None:
        return "not comparable"
    verdict = mem_change_verdict(d, rel=mem_rel)
    if verdict != "pass":
        reasons.append(f"Mem {d:+.0%} (more than {mem_rel:.0%} above --against)")
    return verdict


def _fps(ok: pd.DataFrame, ref: pd.DataFrame, out: dict[str, Any], reasons: list[str]) -> Verdict:
    d = _relative(ok, ref, out, "fps", "device_class", "delta_fps_rel", reasons)
    if d is None:
        return "not comparable"
    verdict = fps_change_verdict(d)
    if verdict != "pass":
        reasons.append(f"fps {d:+.0%} (indicative, tolerance {FPS_REL:.0%})")
    return verdict


def _welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of the means and the half-width of its 95% Welch interval (0 when no side has two
    seeds: a single run on each side is judged by its point difference, as against the published table)."""
    delta = sum(a) / len(a) - sum(b) / len(b)
    sides = [(_var(x) / len(x), len(x) - 1) for x in (a, b) if len(x) > 1]  # (variance of the mean, dof)
    se2 = sum(v for v, _ in sides)
    if se2 <= 0:
        return delta, 0.0
    dof = se2**2 / sum(v**2 / d for v, d in sides)  # Welch-Satterthwaite
    return delta, t_critical(max(1, math.floor(dof + 1e-9))) * math.sqrt(se2)  # floor: the conservative df


def _var(x: list[float]) -> float:
    m = sum(x) / len(x)
    return sum((v - m) ** 2 for v in x) / (len(x) - 1)


def _values(series: pd.Series) -> list[float]:
    return [float(v) for v in series if finite(v)]


def _mean(series: pd.Series) -> float | None:
    values = _values(series)
    return sum(values) / len(values) if values else None


def _kinds(rows: pd.DataFrame, column: str) -> set[str]:
    """The distinct values of `column` as text (an image count read back as 500.0 shows as 500)."""
    values = rows[column].dropna() if column in rows else ()
    return {str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values}


def _show(kinds: set[str]) -> str:
    return ", ".join(sorted(kinds)) or "none recorded"


def _last_line(text: Any) -> str:
    lines = [line for line in str(text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no error recorded"


def sides_text(matrix: MatrixSpec, profile: str, runs_dir: Path, against: Path) -> list[str]:
    """Two header lines: what each side ran with (torch, torchvision, device, commit)."""
    lines = []
    for label, root in (("now", runs_dir), ("against", against)):
        ran = collect(matrix, profile, root)
        ran = ran[ran["status"] == "ok"]
        facts = [f"{word} {_show({str(v)[:12] if key == 'git_commit' else str(v) for v in ran[key].dropna()})}"
                 for key, word in PROVENANCE]  # fmt: skip
        lines.append(f"{label:8s} {root}: " + ", ".join(facts))
    return lines


def format_against(df: pd.DataFrame, header: list[str]) -> str:
    """A fixed-width terminal table of `compare_against`, the two sides first and a count of verdicts last."""
    rows: list[tuple[str, ...]] = [("cell", "seeds", "box AP", "delta", "Mem (GB)", "fps", "train img/s", "verdict", "reason")]
    for rec in df.to_dict(orient="records"):
        rows.append((
            rec["name"], f"{rec['n_seeds']}/{rec['n_seeds_against']}",
            f"{num(rec['against_box_ap'])} -> {num(rec['box_ap'])}", num(rec["delta_box_ap"], 2, signed=True),
            f"{num(rec['against_mem_gb'], 2)} -> {num(rec['mem_gb'], 2)}{_pct(rec['delta_mem_rel'])}",
            f"{num(rec['against_fps'])} -> {num(rec['fps'])}{_pct(rec['delta_fps_rel'])}",
            f"{num(rec['against_train_images_per_s'])} -> {num(rec['train_images_per_s'])}",
            str(rec["verdict"]), clip(rec["reason"], 90),
        ))  # fmt: skip
    table = text.table(rows)
    counts = ", ".join(f"{int((df['verdict'] == v).sum())} {v}" for v in VERDICTS)
    moves = []
    for rec in df.to_dict(orient="records"):
        # Only changes that show at one decimal: a cell whose categories did not move is not listed.
        moved = [(name, d) for name, d in (rec["category_deltas"] or {}).items() if abs(d) >= 0.05] \
            if isinstance(rec["category_deltas"], dict) else []  # fmt: skip
        if moved:
            moves.append(f"  {rec['name']}: " + ", ".join(f"{name} {d:+.1f}" for name, d in moved[:CATEGORIES_SHOWN]))
    if moves:
        moves.insert(0, f"Per-category box AP, the {CATEGORIES_SHOWN} largest changes a cell (points, against -> now; shown, not judged):")
    return "\n".join([*header, "", *table, "", f"{len(df)} cells (seeds here/against; against -> now): {counts}",
                      *([""] + moves if moves else [])])


def _pct(x: Any) -> str:
    return f" ({float(x):+.0%})" if finite(x) else ""


__all__ = ["AGAINST_COLUMNS", "CATEGORIES_SHOWN", "compare_against", "format_against", "sides_text"]
