"""Measured vs published, cell by cell: deltas, seed statistics, a verdict and why.

`compare()` reduces `harness.results.collect.collect()` (one row per cell x seed) to one row per cell:
the mean over the cell's successful seeds, their std and 95% Student-t interval, the deltas against
the published Mem / fps / box AP and a verdict in `harness.results.verdicts.VERDICTS`, with a `reason`
whenever the verdict is not a plain pass. The tolerance rules themselves live in `harness.results.verdicts`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness.matrix.spec import MatrixSpec
from harness.metrics import BY_KEY, COMPARABLE_MEM_KIND, METRICS, PUBLISHED_DEVICE_CLASS, Measured, finite
from harness.results.collect import collect
from harness.results.verdicts import VERDICTS, Scope, interval95, judge, precedence, scope_of
from harness.text import clip, num, table

COMPARE_COLUMNS: tuple[str, ...] = (
    "name", "section", "profile", "status", "n_seeds", "n_failed",
    "box_ap", "box_ap_std", "ci95_low", "ci95_high", "published_box_ap", "delta_box_ap",
    "mem_gb", "mem_kind", "published_mem_gb", "delta_mem", "delta_mem_rel",
    "fps", "device_class", "published_fps", "fps_comparable",
    "ap_verdict", "mem_verdict", "fps_verdict", "verdict", "reason", "eval_split", "eval_images", "other_categories", "notes", "quirks",
)


def compare(matrix: MatrixSpec, profile: str, runs_dir: Path) -> pd.DataFrame:
    """One row per matrix cell (matrix order) with `COMPARE_COLUMNS`; see `compare_frame`."""
    return compare_frame(collect(matrix, profile, runs_dir), matrix, profile)


def compare_frame(runs: pd.DataFrame, matrix: MatrixSpec, profile: str) -> pd.DataFrame:
    """Reduce a `collect()` frame to one row per cell and judge it.

    Verdicts, in order of precedence:
    - "not run": no seed finished (nothing ran, or every seed was skipped);
    - "fail": a seed crashed or diverged, whatever the profile (the cell does not work);
    - "not comparable": the profile is toy scale / baselines-only, evaluation ran on the train split,
      the model trained a dataset's own categories, or no metric of the cell has a published value to compare with;
    - otherwise the worst of AP (interval rule), Mem and fps (`harness.results.verdicts.judge`).
    """
    scope = scope_of(matrix.profile(profile))
    out = [_cell_row(runs[runs["name"] == cell.name], cell, profile, scope, matrix) for cell in matrix.cells]
    return pd.DataFrame(out, columns=list(COMPARE_COLUMNS))


def comparison_exit_code(df: pd.DataFrame) -> int:
    """1 if any compared cell failed (out of tolerance, or its run failed), else 0."""
    return int(bool((df["verdict"] == "fail").any()))


def summary_counts(df: pd.DataFrame) -> dict[str, int]:
    """How many cells got each verdict, in `VERDICTS` order (zeros included)."""
    return {v: int((df["verdict"] == v).sum()) for v in VERDICTS}


def format_comparison(df: pd.DataFrame) -> str:
    """A fixed-width terminal table of `compare()` plus a one-line summary."""
    others = [m for m in METRICS if m.key != "box_ap"]  # AP gets three columns of its own, first
    header = ("cell", "seeds", "box AP", "published", "delta", *(m.label for m in others), "verdict", "reason")
    lines: list[tuple[str, ...]] = [header]
    for rec in df.to_dict(orient="records"):
        lines.append((
            rec["name"] + (f" [{rec['quirks']}]" if rec["quirks"] else ""),
            str(rec["n_seeds"]),
            _ap_text(rec["box_ap"], rec["box_ap_std"], rec["n_seeds"]),
            num(rec["published_box_ap"]),
            num(rec["delta_box_ap"], signed=True),
            *(f"{num(rec[m.column])}{m.mark_for(rec[m.column], rec[m.context] if m.context else None)}/"
              f"{num(rec[m.published_column])}" for m in others),
            rec["verdict"],
            clip(rec["reason"], 70),
        ))
    text = table(lines)
    counts = summary_counts(df)
    text.append("")
    text.append(f"measured/published; {BY_KEY['mem'].mark} CPU peak RSS and {BY_KEY['fps'].mark} fps off {PUBLISHED_DEVICE_CLASS}: not comparable")
    text.append(f"{len(df)} cells: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return "\n".join(text)


def comparison_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """`df` as JSON-ready dicts: NaN -> None, tuples -> lists, numpy scalars -> Python ones."""
    records: list[dict[str, Any]] = []
    for rec in df.to_dict(orient="records"):
        records.append({str(k): _jsonable(v) for k, v in rec.items()})
    return records


def _cell_row(rows: pd.DataFrame, cell: Any, profile: str, scope: Scope, matrix: MatrixSpec) -> dict[str, Any]:
    pub = cell.published
    ok = rows[rows["status"] == "ok"]
    failed = rows[~rows["status"].isin(["ok", "skipped", "not run"])]
    notes = rows["notes"].iloc[0] if len(rows) else ()
    out: dict[str, Any] = {
        "name": cell.name, "section": cell.section, "profile": profile,
        "n_seeds": len(ok), "n_failed": len(failed),
        **{m.published_column: getattr(pub, m.column) for m in METRICS},
        **{m.verdict_column: "not run" for m in METRICS},
        "notes": tuple(notes), "quirks": rows["quirks"].iloc[0] if len(rows) else "", "fps_comparable": False,
    }
    # A column that must be one value over the seeds (the kind of memory, the device class).
    for column in (m.context for m in METRICS if m.context):
        seen = set(ok[column].dropna())
        out[column] = seen.pop() if len(seen) == 1 else ("mixed" if seen else None)
    measured: dict[str, Measured] = {}
    for m in METRICS:
        values = [float(x) for x in ok[m.column] if finite(x)]
        if not values:
            continue
        context = out[m.context] if m.context else None
        if m.seeds == "interval":
            mean, std, low, high = interval95(values)
            out.update({m.column: round(mean, 3), f"{m.column}_std": std, "ci95_low": low, "ci95_high": high})
            measured[m.key] = Measured(mean=mean, low=low, high=high, context=context)
        else:
            out[m.column] = sum(values) / len(values)
            measured[m.key] = Measured(mean=out[m.column], context=context)
    out["status"] = "failed" if len(failed) else ("ok" if len(ok) else "not run")
    if "mem" in measured and pub.mem_gb is not None and out["mem_kind"] == COMPARABLE_MEM_KIND:
        out["delta_mem"] = out["mem_gb"] - pub.mem_gb
        out["delta_mem_rel"] = out["delta_mem"] / pub.mem_gb
    out["fps_comparable"] = "fps" in measured and pub.fps is not None and out["device_class"] == PUBLISHED_DEVICE_CLASS
    splits = set(ok["eval_split"].dropna())
    out["eval_split"] = ", ".join(sorted(splits)) or None
    counts = [int(n) for n in ok["eval_images"] if finite(n)] if "eval_images" in ok else []
    out["eval_images"] = min(counts) if counts else None  # a seed over fewer images makes the cell's AP partial
    others = sorted(set(ok["other_categories"].dropna())) if "other_categories" in ok else []
    out["other_categories"] = "; ".join(others) or None

    first = precedence(n_ok=len(ok), n_failed=len(failed))
    if first == "fail":
        why = failed["verdict_reason"].iloc[-1]
        out.update(verdict="fail", reason=f"{len(failed)} of {len(failed) + len(ok)} seed(s) failed; {why}")
    elif first == "not run":
        out.update(verdict="not run", reason=rows["verdict_reason"].iloc[0] if len(rows) else "no result.json yet")
    if len(ok):  # per-metric verdicts of the finished seeds, also beside a failed one
        verdict, per_metric, reasons = judge(scope=scope, measured=measured, eval_split=out["eval_split"], published=pub,
                                             tolerances=matrix.tolerances, other_categories=out["other_categories"],
                                             eval_images=out["eval_images"])  # fmt: skip
        out.update({m.verdict_column: per_metric[m.key] for m in METRICS})
        # A delta only where AP is compared: -35.6 beside a 12-iteration smoke run reads like a result.
        if "box_ap" in measured and pub.box_ap is not None and per_metric["box_ap"] != "not comparable":
            out["delta_box_ap"] = round(measured["box_ap"].mean - pub.box_ap, 3)  # type: ignore[operator]
        if first is None:
            ap = measured.get("box_ap")
            n_aps = sum(1 for x in ok["box_ap"] if finite(x))
            if ap is not None and n_aps > 1 and per_metric["box_ap"] != "not comparable":
                reasons.insert(0, f"AP 95% interval [{ap.low:.2f}, {ap.high:.2f}] over {n_aps} seeds")
            out.update(verdict=verdict, reason="; ".join(reasons))
    return out



def _ap_text(mean: Any, std: Any, n: int) -> str:
    if not finite(mean):
        return "-"
    return f"{mean:.1f} ± {std:.2f}" if n > 1 and finite(std) else f"{mean:.1f}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if v is None or v is pd.NA:
        return None
    if hasattr(v, "item"):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


__all__ = [
    "COMPARE_COLUMNS",
    "compare",
    "compare_frame",
    "comparison_exit_code",
    "comparison_records",
    "format_comparison",
    "summary_counts",
]
