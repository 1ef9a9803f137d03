"""Judging the checks of a regression run and saying what moved, by how much, against which baseline.

`judge_checks()` turns the cells' outcomes into one `CheckVerdict` per check:
- compare / overfit checks: every metric against the stored baseline of this device class, within
  the per-metric tolerances of the baseline file; the data must be the baseline's data (fingerprint);
- overfit: also the stated floor (e.g. coco/bbox_mAP_50 >= 0.5) on the images it trained on;
- determinism (a check run twice): every metric identical, compared exactly.
Nothing here runs a cell or imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.regression.baselines import Finding, RegressionSpec, compare_metrics
from harness.text import table


@dataclass(kw_only=True)
class CheckVerdict:
    id: str
    kind: str
    findings: list[Finding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each one fails the check
    notes: list[str] = field(default_factory=list)  # said, but not a failure
    wall_s: float | None = None  # the cell's wall time (result.json provenance)

    @property
    def moved(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    @property
    def passed(self) -> bool:
        return not self.problems and not self.moved


@dataclass(kw_only=True)
class Judgement:
    checks: list[CheckVerdict]
    baseline: dict[str, Any] | None  # provenance of the baseline entry compared with
    problems: list[str] = field(default_factory=list)  # failures not tied to one check
    notes: list[str] = field(default_factory=list)
    data_missing: bool = False

    @property
    def passed(self) -> bool:
        return not self.problems and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "data_missing": self.data_missing, "problems": self.problems,
            "notes": self.notes, "baseline": self.baseline,
            "checks": [{"id": c.id, "kind": c.kind, "passed": c.passed, "problems": c.problems, "notes": c.notes,
                        "moved": [f.__dict__ for f in c.moved], "compared": len(c.findings)} for c in self.checks],
        }  # fmt: skip


def fingerprint(root: Path, ann: str) -> dict[str, Any]:
    """sha256 of the annotation file, with the number and total size of the image files it names."""
    path = Path(root) / ann
    raw = path.read_bytes()
    images = json.loads(raw).get("images", [])
    image_dir = Path(root) / ann.replace("annotations/instances_", "").removesuffix(".json")
    files = [image_dir / im["file_name"] for im in images]
    size = sum(f.stat().st_size for f in files if f.is_file())
    return {"annotations": ann, "sha256": hashlib.sha256(raw).hexdigest(), "images": len(images), "image_bytes": size}


def portable_spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of a cell's spec.json without its machine-specific data path."""
    from harness.execute.cells import config_hash

    return config_hash({**spec, "run": {**spec["run"], "data_root": "<data>"}})


def judge_checks(spec: RegressionSpec, checks: list[Any], outcome: dict[str, dict[str, Any]], *, device_class: str,
          data_missing: bool, need_baseline: bool = True, cross_machine: bool = False) -> Judgement:  # fmt: skip
    """One verdict per check (see the module docstring); `checks` are `harness.regression.check.Check`s."""
    entry = spec.baselines.get(device_class)
    verdict = Judgement(checks=[], baseline=(entry or {}).get("provenance"))
    if need_baseline and entry is None:
        have = ", ".join(sorted(spec.baselines)) or "none"
        verdict.problems.append(f"{spec.path} has no baseline for device class {device_class!r} (it has: {have}); "
                                f"make one on such a machine with `harness baseline update`")  # fmt: skip
    if data_missing:
        verdict.data_missing = True
        verdict.notes.append("the real-data checks (coco128, overfit) were NOT run: no --data")
    for check in checks:
        got = outcome[check.id]
        wall = ((got.get("result") or {}).get("provenance") or {}).get("wall_time_s")
        v = CheckVerdict(id=check.id, kind=check.kind, wall_s=float(wall) if wall is not None else None)
        verdict.checks.append(v)
        if got["status"] != "ok":
            error = (got.get("error") or "").strip().splitlines()
            v.problems.append(f"the cell {got['status']}: {error[-1] if error else 'no error recorded'} "
                              f"(see {check.job.folder}/stdout.txt)")  # fmt: skip
            continue
        metrics = got["metrics"]
        deviations = ((got.get("result") or {}).get("metrics") or {}).get("deviations") or []
        v.notes += [f"runs {d}" for d in deviations if "autocast" in d]  # AMP as this device can run it
        if check.kind in ("compare", "overfit") and need_baseline and entry is not None:
            _against_baseline(v, spec, check, metrics, (entry.get("checks") or {}).get(check.id), cross_machine)
        if check.kind == "overfit" and spec.overfit is not None:
            for metric, minimum in spec.overfit.require.items():
                value = metrics.get(metric)
                if value is None or not value >= minimum:
                    v.problems.append(f"the detector did not learn: {metric} {value} < {minimum} required on the "
                                      f"{spec.overfit.images} images it trained on")  # fmt: skip
                else:
                    images = spec.overfit.images
                    v.notes.append(f"learned: {metric} {value:.3f} >= {minimum} on the {images} training images")
        if check.kind == "rerun":
            twin = outcome.get(check.twin, {}).get("metrics") or {}
            diff = sorted(m for m in set(twin) | set(metrics) if twin.get(m) != metrics.get(m))
            if not twin:
                v.problems.append(f"its twin {check.twin} produced no metrics to compare with")
            elif diff:
                shown = "; ".join(f"{m}: {twin.get(m)!r} vs {metrics.get(m)!r}" for m in diff[:5])
                v.problems.append(f"two CPU runs with the same seed differ in {len(diff)} of {len(twin)} metrics "
                                  f"({check.twin} vs this rerun): {shown}")  # fmt: skip
            else:
                v.notes.append(f"identical to {check.twin}: all {len(twin)} metrics equal exactly")
    return verdict


def _against_baseline(v: CheckVerdict, spec: RegressionSpec, check: Any, metrics: dict[str, float],
                      base: dict[str, Any] | None, cross_machine: bool = False) -> None:  # fmt: skip
    if base is None:
        v.problems.append(f"no baseline for this check in {spec.path}; add one on purpose: `harness baseline update`")
        return
    run = check.job.spec["run"]
    data = fingerprint(Path(run["data_root"]), run["train_ann"])
    want = base.get("data") or {}
    if data["sha256"] != want.get("sha256"):
        v.problems.append(f"trained on other data than the baseline: {data['annotations']} sha256 "
                          f"{data['sha256'][:12]} ({data['images']} images) vs {str(want.get('sha256'))[:12]} "
                          f"({want.get('images')} images): the comparison would mean nothing")  # fmt: skip
        return
    if portable_spec_hash(check.job.spec) != base.get("spec_sha256"):
        v.notes.append("the cell's resolved config / run settings differ from the baseline's (spec sha256 changed); "
                       "if that is on purpose, refresh with `harness baseline update`")  # fmt: skip
    v.findings = compare_metrics(check.id, metrics, dict(base.get("metrics") or {}), spec, cross_machine=cross_machine)


def baseline_label(spec: RegressionSpec, device_class: str) -> str:
    """`cpu baseline in matrices/baselines/faster_rcnn.yaml (commit 5eccfd5f, 2026-11-24, torch 2.14.0)`."""
    prov = (spec.baselines.get(device_class) or {}).get("provenance") or {}
    versions = prov.get("versions") or {}
    commit = str(prov.get("git_commit", "?"))[:8] + (" dirty" if prov.get("git_dirty") else "")
    return (f"{device_class} baseline in {_short(spec.path)} (commit {commit}, {prov.get('date', '?')}, "
            f"torch {versions.get('torch', '?')}, {prov.get('cpu') or prov.get('device', '?')})")  # fmt: skip


def print_judgement(verdict: Judgement, spec: RegressionSpec, checks: list[Any], *, device_class: str) -> None:
    """The per-check table, then one line per moved metric and per problem, then PASS / FAIL."""
    label = baseline_label(spec, device_class)
    rows = [("check", "result", "time", "compared", "moved", "largest move (relative to tolerance)")]
    for v in verdict.checks:
        worst = max(v.findings, key=lambda f: f.severity, default=None)
        largest = worst.describe() if worst is not None and worst.severity > 0 else "-"
        counts = (str(len(v.findings)), str(len(v.moved))) if v.findings else ("-", "-")
        wall = f"{v.wall_s:.0f} s" if v.wall_s is not None else "-"
        rows.append((v.id, "ok" if v.passed else "FAIL", wall, *counts, largest))
    print(f"\nregression of {spec.matrix} against the {label}")
    print("\n".join(table(rows)))
    for note in verdict.notes + [f"{v.id}: {n}" for v in verdict.checks for n in v.notes]:
        print(f"note: {note}")
    if spec.overfit is not None and any(v.kind == "overfit" for v in verdict.checks):
        print(f"note: overfit deviations from the recipe: {'; '.join(spec.overfit.deviations)}")
    for problem in verdict.problems:
        print(f"FAIL: {problem}")
    for v in verdict.checks:
        for problem in v.problems:
            print(f"FAIL {v.id}: {problem}")
        for f in v.moved:
            print(f"REGRESSION {v.id}: {f.describe()}; against the {label}")
    moved = sum(len(v.moved) for v in verdict.checks)
    failed = sum(not v.passed for v in verdict.checks)
    others = f", {len(verdict.problems)} other problems" if verdict.problems else ""
    missing = "; the real-data checks were NOT run (no --data)" if verdict.data_missing else ""
    print(f"\nregression: {'PASS' if verdict.passed else 'FAIL'}: {len(verdict.checks)} checks, {failed} failed, "
          f"{moved} metrics moved beyond tolerance{others}{missing}")


def _short(path: Path) -> str:
    from harness.matrix.spec import repo_root

    try:
        return str(Path(path).resolve().relative_to(repo_root()))
    except ValueError:
        return str(path)


__all__ = [
    "CheckVerdict",
    "Judgement",
    "baseline_label",
    "fingerprint",
    "judge_checks",
    "portable_spec_hash",
    "print_judgement",
]
