"""`harness regression`: CI regression checks against stored baselines (`harness baseline update`: `update`).

What runs is declared in `matrices/baselines/<matrix>.yaml` (`harness.regression.baselines`): every cell of the
matrix's `ci` profile, on each suite (the real COCO subset given with `--data`, and the synthetic
set generated here), with one seed, a fixed iteration budget and a fixed number of intra-op threads;
one cell trained and evaluated on a handful of the real images (the overfit check: the detector
must reach a stated AP on them); and one check run twice (the determinism check: identical metrics).

Each check is a cell folder under `<runs>/regression/<matrix>/<suite>/<cell>/`, run through the
harness runner (`harness.execute.runner.run_jobs`), each cell in its own process, always afresh (a code change
does not change a cell's spec, so a finished cell must not be taken as it is). Checkpoints of the
regression cells are deleted once their metrics are read: they are 330 MB each and never resumed.

Without the real data, the synthetic checks still run and the output says loudly what was not
checked; with `CI=true` the run fails instead, so that CI cannot pass silently without its data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from detector.api import DetectorConfig, Metrics
from harness.errors import UserError
from harness.execute import machine
from harness.execute.runner import CellJob
from harness.regression.baselines import (
    Overfit,
    RegressionSpec,
    default_path,
    load_spec,
)
from harness.regression.judge import (
    judge_checks,
    print_judgement,
)

Log = Callable[[str], None]
CI_DATA = "../shared/data/coco128"  # what CI passes; named in the messages


@dataclasses.dataclass(frozen=True, kw_only=True)
class Check:
    """One cell run of the regression: `id` is `<suite>/<cell>` (`overfit/<cell>`, `determinism/<cell>`)."""

    id: str
    kind: str  # "compare" (vs baseline), "overfit" (vs baseline and a floor), "rerun" (vs its twin)
    job: CellJob
    twin: str | None = None  # rerun: the id of the check it must reproduce exactly


def ci_mode(environ: Mapping[str, str] | None = None) -> bool:
    """True when the `CI` environment variable is set to a true value (GitHub Actions sets CI=true)."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def resolve_data(data: str | None, *, ci: bool, log: Log) -> Path | None:
    """The real COCO root for the given-data suites, or None (after saying so) when it is missing.

    Raises:
        UserError: the data is missing and `ci` is set: CI must not pass on the synthetic checks alone.
    """
    from harness.execute.data_root import check_coco_root

    if data is None:
        problem = "no --data ROOT was given"
    else:
        try:
            return check_coco_root(Path(data), "--data")
        except UserError as exc:
            problem = str(exc)
    if ci:
        raise UserError(f"regression: {problem}; the real-data and overfit checks need it (CI passes --data "
                        f"{CI_DATA}). CI=true: failing instead of passing on the synthetic checks alone")  # fmt: skip
    log(f"WARNING: {problem}: the real-data checks (coco128, overfit) are NOT run; only the synthetic "
        f"checks run. Pass --data ROOT (CI uses {CI_DATA}) to run them all.")  # fmt: skip
    return None


def overfit_root(base: Path, data_root: Path, images: int) -> Path:
    """`<base>/_data/overfit-<n>/`: the first `images` images (by id) of the real train split.

    The harness's own derived file, so a later check (`harness regression` again, or `harness
    baseline update` after it) reuses it when it is the same and replaces it when the data changed.
    """
    import filecmp
    import os

    from detector.api import subset_annotations
    from harness.execute.data_root import TRAIN_ANN, TRAIN_IMAGES

    root = base / "_data" / f"overfit-{images}"
    ann = root / TRAIN_ANN
    fresh = ann.with_name(f".{ann.name}.{os.getpid()}.new")
    subset_annotations(data_root / TRAIN_ANN, fresh, categories=None, max_images=images)
    if ann.exists() and filecmp.cmp(ann, fresh, shallow=False):
        fresh.unlink()
    else:
        os.replace(fresh, ann)
    link = root / TRAIN_IMAGES
    if link.is_symlink() or link.exists():
        if link.resolve() == (data_root / TRAIN_IMAGES).resolve():
            return root
        link.unlink()
    link.symlink_to(data_root / TRAIN_IMAGES, target_is_directory=True)
    return root


def _select(ids: Sequence[str], only: Sequence[str]) -> set[str]:
    """The check ids matching any of `only` (a check id, a suite name, a cell name, or a glob of them)."""
    import fnmatch

    if not only:
        return set(ids)
    chosen: set[str] = set()
    for pattern in only:
        hits = {i for i in ids if any(fnmatch.fnmatchcase(part, pattern) for part in (i, *i.split("/", 1)))}
        if not hits:
            raise UserError(f"--only {pattern}: matches no regression check; checks: {', '.join(ids)}")
        chosen |= hits
    return chosen


def candidates(spec: RegressionSpec) -> list[tuple[str, str, Any]]:
    """(check id, suite, matrix cell) of every check the spec declares, the overfit check first."""
    from harness.matrix.parse import load_matrix

    matrix = load_matrix(spec.matrix)
    cells = matrix.cells_for(matrix.profile(spec.profile))
    out: list[tuple[str, str, Any]] = [(f"{s.name}/{c.name}", s.name, c) for s in spec.suites for c in cells]
    if spec.overfit is not None:
        out.insert(0, (f"overfit/{spec.overfit.cell}", "overfit", matrix.cell(spec.overfit.cell)))
    return out


def needs_data(spec: RegressionSpec, only: Sequence[str] = ()) -> bool:
    """Whether any selected check trains on the real data given with --data."""
    given = {s.name for s in spec.suites if s.data == "given"} | {"overfit"}
    ids = [c[0] for c in candidates(spec)]
    return any(i.split("/", 1)[0] in given for i in _select(ids, only))


def plan_checks(spec: RegressionSpec, *, data_root: Path | None, runs_dir: Path, device: str,
                only: Sequence[str] = (), log: Log = print) -> list[Check]:  # fmt: skip
    """The checks to run, the longest (overfit) first so that the short ones fill the other slots.

    Each check is planned by `execute.plan.plan_run`, the planner of `harness run`, with the profile
    overridden (named after the suite, the spec's budget) and, for the overfit check, its recipe
    changes; the regression adds only its own checks (overfit floor, determinism twin).
    """
    from harness.execute.cells import cell_dir
    from harness.execute.data_root import synthetic_root
    from harness.execute.plan import plan_run
    from harness.matrix.parse import load_matrix

    matrix = load_matrix(spec.matrix)
    profile = matrix.profile(spec.profile)
    base = runs_dir / "regression"
    wanted = candidates(spec)
    chosen = _select([w[0] for w in wanted], only)
    roots: dict[str, Path] = {}
    checks: list[Check] = []
    for check_id, suite_name, cell in wanted:
        if check_id not in chosen:
            continue
        configure: Callable[[DetectorConfig], DetectorConfig] | None = None
        if suite_name == "overfit":
            if data_root is None:
                continue
            over = spec.overfit
            assert over is not None
            root = roots.setdefault("overfit", overfit_root(base, data_root, over.images))
            budget, configure = over.budget, _overfit_recipe(over, images_per_gpu=profile.images_per_gpu)
        else:
            suite = next(s for s in spec.suites if s.name == suite_name)
            if suite.data == "given" and data_root is None:
                continue
            if suite_name not in roots:
                given = data_root if suite.data == "given" else None
                roots[suite_name] = given if given is not None else synthetic_root(base, images=suite.images, seed=spec.seed)
            root, budget = roots[suite_name], spec.budget
        suite_profile = dataclasses.replace(profile, name=suite_name, budget=budget)
        [job] = plan_run(matrix, suite_profile, cells=[cell], seeds=[spec.seed], runs_dir=base, data_root=root,
                         device=device, pretrained={}, configure=configure, progress=False)  # fmt: skip
        checks.append(Check(id=check_id, kind="overfit" if suite_name == "overfit" else "compare", job=job))
    twin = next((c for c in checks if c.id == spec.determinism), None)
    if spec.determinism and twin is not None:
        if device != "cpu":
            log(f"note: the determinism check ({spec.determinism} twice) runs on CPU only; skipped on {device}")
        else:
            folder = cell_dir(base, matrix.name, "determinism", twin.job.name, spec.seed)
            job = dataclasses.replace(twin.job, profile="determinism", folder=folder)
            checks.append(Check(id=f"determinism/{twin.job.name}", kind="rerun", job=job, twin=twin.id))
    return checks


def _overfit_recipe(over: Overfit, *, images_per_gpu: int) -> Callable[[DetectorConfig], DetectorConfig]:
    """The overfit check's recipe changes (its `deviations`): its lr without linear rescaling (the
    base batch is the real one), its gradient clip, and no flips."""

    def configure(cfg: DetectorConfig) -> DetectorConfig:
        clip = over.grad_clip if over.grad_clip is not None else cfg.schedule.grad_clip
        sched = dataclasses.replace(cfg.schedule, lr=over.lr, base_batch_size=images_per_gpu, grad_clip=clip)
        return dataclasses.replace(cfg, schedule=sched, data=dataclasses.replace(cfg.data, flip_prob=over.flip_prob))

    return configure


def execute(spec: RegressionSpec, checks: list[Check], *, device: str, log: Log) -> dict[str, dict[str, Any]]:
    """Run every check's cell (fresh, `spec.jobs` at a time, `spec.threads` threads each).

    Returns:
        check id -> {"status", "error", "metrics" (flat metric names), "result" (result.json)}.
    """
    from harness.execute.cells import read_json
    from harness.execute.plan import make_executor
    from harness.execute.provenance import base_provenance
    from harness.execute.runner import run_jobs

    jobs = [c.job for c in checks]
    threads = str(spec.threads)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    executor = make_executor("local", folder=Path("."), nproc_per_cell=1, device=device,
                             timeout_min=None, slurm_partition=None, log=log)  # fmt: skip
    try:
        run_jobs(jobs, executor=executor, base_provenance=base_provenance(cells_at_once=spec.jobs), max_in_flight=spec.jobs,
                 force=True, env=env, log=log)  # fmt: skip
    finally:
        executor.close()
    out: dict[str, dict[str, Any]] = {}
    for check in checks:
        folder = check.job.folder
        result = read_json(folder / "result.json") or {}
        status = str(result.get("status", "failed"))
        metrics = cell_metrics(folder) if status == "ok" else {}
        out[check.id] = {"status": status, "error": result.get("error"), "metrics": metrics, "result": result}
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return out


def cell_metrics(folder: Path) -> dict[str, float]:
    """The flat metrics of a finished cell: coco/*, box_ap, first/final loss, iters, log/<term>@<iter>."""
    rec = Metrics.from_dict(json.loads((folder / "metrics.json").read_text(encoding="utf-8")))
    out: dict[str, float] = {f"coco/{k}": float(v) for k, v in (rec.coco or {}).items()}
    for key in ("box_ap", "first_loss", "final_loss", "iters"):
        if getattr(rec, key) is not None:
            out[key] = float(getattr(rec, key))
    log = folder / "log.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for term, value in row.items():
                if term.startswith("loss"):
                    out[f"log/{term}@{row['iter']}"] = float(value)
    return out


def pick_device(device: str | None) -> str:
    from harness.execute.plan import default_device

    if device is None:
        return default_device()
    if device.startswith("cuda") and default_device() != "cuda":
        raise UserError(f"--device {device}: no CUDA device is visible here; allowed: cpu")
    return device


def device_class_of(device: str) -> str:
    from harness.execute.provenance import device_info

    return device_info(device)["device_class"]


def run_regression(*, matrix: str = "faster_rcnn", data: str | None = None, only: Sequence[str] = (),
                   runs_dir: Path | None = None, device: str | None = None, baselines: Path | None = None,
                   ci: bool | None = None, log: Log | None = None) -> int:  # fmt: skip
    """`harness regression`: run the checks, compare with the stored baselines; 0 pass, 1 a regression.

    Raises:
        UserError: bad input, or (with `ci`, default `CI` from the environment) the real data is missing.
    """
    say = log or log_stderr
    spec = load_spec(baselines or default_path(matrix))
    ci = ci_mode() if ci is None else ci
    from harness.matrix.spec import repo_root

    device = pick_device(device)
    wants_data = needs_data(spec, only)
    data_root = resolve_data(data, ci=ci, log=say) if wants_data else None
    cross = _announce_machine(spec, device, say)  # the first line of a run (bad input is refused before)
    runs = Path(runs_dir) if runs_dir else repo_root() / "runs"
    checks = plan_checks(spec, data_root=data_root, runs_dir=runs, device=device, only=only, log=say)
    if not checks:
        raise UserError("regression: nothing to run (every selected check needs the real data, see above)")
    outcome = execute(spec, checks, device=device, log=say)
    verdict = judge_checks(spec, checks, outcome, device_class=device_class_of(device),
                    data_missing=wants_data and data_root is None, cross_machine=cross)
    print_judgement(verdict, spec, checks, device_class=device_class_of(device))
    from harness.execute.cells import write_json_atomic

    write_json_atomic(runs / "regression" / spec.matrix / "report.json", verdict.to_dict())
    return 0 if verdict.passed else 1


def _announce_machine(spec: RegressionSpec, device: str, say: Log) -> bool:
    """Say, first, whether this machine is of the baseline's kind; True when it is not (cross-machine
    tolerances apply). GPUs are compared by device class alone."""
    if device != "cpu":
        return False
    entry = spec.baselines.get(device_class_of(device)) or {}
    theirs = (entry.get("provenance") or {}).get("machine")
    mine = machine.fingerprint(threads=spec.threads)
    if machine.same_kind(theirs, mine):
        say(f"regression: this machine is of the baseline's kind ({machine.describe(mine)}): exact tolerances")
        return False
    how = f"cross-machine tolerances ({len(spec.cross_machine)} entries of cross_machine_tolerances, then the rest)"
    say(f"regression: this machine ({machine.describe(mine)}) is not of the baseline's kind "
        f"({machine.describe(theirs)}): float results differ by design; comparing with {how}")  # fmt: skip
    return True


def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = [
    "device_class_of",
    "log_stderr",
    "pick_device",
    "Check",
    "cell_metrics",
    "candidates",
    "ci_mode",
    "execute",
    "overfit_root",
    "needs_data",
    "plan_checks",
    "resolve_data",
    "run_regression",
]
