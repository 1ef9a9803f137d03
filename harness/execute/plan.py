"""From `harness run MATRIX --profile P [flags]` to the list of cell jobs, and running them.

The profile (matrices/*.yaml) and the flags decide the data, the budget and the device of every
cell: they become one `detector.config.RunConfig` per (cell, seed). The cell's axes become its
`DetectorConfig` through `detector.recipes.resolve`. Both are written to `spec.json`, the one door
to the detector (ARCHITECTURE.md). A cell the detector cannot build (an axis value it does not
implement) is recorded `skipped` with the reason; it is never given made-up numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from detector.api import (
    DetectorConfig,
    RunConfig,
    WeightsError,
    cannot_build,
)
from harness.errors import UserError
from harness.execute.cells import cell_dir, check_name, profile_dir
from harness.execute.data_root import TRAIN_ANN, TRAIN_IMAGES, VAL_ANN, VAL_IMAGES, DataCheck, check_data, dataset_root
from harness.execute.executors import Executor, LocalExecutor
from harness.execute.provenance import base_provenance
from harness.execute.resources import resolve_jobs, thread_env
from harness.execute.runner import CellJob, RunSummary, run_jobs
from harness.execute.slurm import SubmititExecutor
from harness.matrix.spec import Cell, MatrixSpec, Profile


def runs_dir_of(args: argparse.Namespace) -> Path:
    """`--runs-dir`, else `<repo>/runs` (git-ignored)."""
    if getattr(args, "runs_dir", None):
        return Path(args.runs_dir).resolve()
    from harness.matrix.spec import repo_root

    return repo_root() / "runs"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_pretrained(items: Sequence[str]) -> dict[str, Path]:
    """`NAME=FILE` pairs -> {name: absolute path}; UserError on a malformed pair or a missing path.

    FILE may also be a folder holding the expected file name (`detector.model.weights.resolve_local`).
    """
    out: dict[str, Path] = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            example = "torchvision://resnet50=/weights/resnet50-0676ba61.pth"
            raise UserError(f"--pretrained {item!r}: expected NAME=FILE, e.g. {example}")
        path = Path(file).expanduser().resolve()
        if not path.exists():
            raise UserError(f"--pretrained {name}: no such file or folder: {path}")
        out[name] = path
    return out


def run_config(
    profile: Profile,
    *,
    data_root: Path,
    device: str,
    seed: int,
    pretrained_path: Path | None = None,
    load_from_path: Path | None = None,
    progress: bool = True,
    neck: str | None = None,
) -> RunConfig:
    """The `RunConfig` of one (cell, seed) from the profile and its budget (`neck`: the cell's neck
    axis value, which may choose its proposal cap); val files only where they exist."""
    has_val = (data_root / VAL_ANN).is_file() and (data_root / VAL_IMAGES).is_dir()
    budget = profile.budget
    return RunConfig(
        data_root=str(data_root),
        train_ann=TRAIN_ANN,
        train_images=TRAIN_IMAGES,
        val_ann=VAL_ANN if has_val else None,
        val_images=VAL_IMAGES if has_val else None,
        device=device,
        seed=seed,
        images_per_gpu=profile.images_per_gpu,
        workers=profile.workers,
        max_iters=budget.max_iters,
        warmup_iters=budget.warmup_iters,
        image_scale=budget.image_scale,
        proposal_cap=budget.proposal_cap_for(neck),
        eval_max_images=budget.eval_max_images,
        checkpoint_interval=budget.checkpoint_interval,
        log_interval=budget.log_interval,
        bench_images=budget.bench_images,
        bench_detections=profile.bench_detections,
        framework_memory=profile.framework_memory,
        pretrained_path=str(pretrained_path) if pretrained_path else None,
        load_from_path=str(load_from_path) if load_from_path else None,
        progress=progress,
    )


def check_pretrained_files(pretrained: dict[str, Path]) -> None:
    """Each `--pretrained NAME=PATH` resolves to a file now (a folder must hold the expected file)."""
    from detector.api import PRETRAINED, resolve_local

    for name, path in pretrained.items():
        if name not in PRETRAINED:
            continue  # a `load_from` checkpoint name: the file itself, checked when it is read
        try:
            resolve_local(name, path)
        except WeightsError as exc:
            raise UserError(f"--pretrained {name}={path}: {exc}") from None


def missing_initialisation(cells: Sequence[tuple[str, DetectorConfig]], pretrained: dict[str, Path]) -> None:
    """UserError naming every published initialisation of `cells` that has no local file.

    A cell needs its `load_from` checkpoint if it has one (it overwrites the backbone), else its
    ImageNet `pretrained` backbone.
    """
    from detector.api import PRETRAINED

    need: dict[str, list[str]] = {}
    for name, cfg in cells:
        wanted = cfg.load_from or cfg.pretrained
        if wanted and wanted not in pretrained:
            need.setdefault(wanted, []).append(name)
    if not need:
        return
    parts = []
    for weight, names in need.items():
        file = f" (file {PRETRAINED[weight].file})" if weight in PRETRAINED else ""
        parts.append(f"{weight}{file} for {len(names)} cell(s), e.g. {names[0]}")
    raise UserError(
        "these cells would train from random weights, which cannot reproduce the published numbers: "
        + "; ".join(parts) + ". Give --pretrained NAME=FILE (a file, or a folder holding it) for each, "
        "or --allow-random-init to train from random weights on purpose (recorded as a deviation)"
    )


def plan_run(
    matrix: MatrixSpec,
    profile: Profile,
    *,
    cells: Sequence[Cell],
    seeds: Sequence[int],
    runs_dir: Path,
    data_root: Path,
    device: str,
    pretrained: dict[str, Path],
    require_pretrained: bool = False,
    data: DataCheck | None = None,
    classes: str | None = None,
    configure: Callable[[DetectorConfig], DetectorConfig] | None = None,
    progress: bool = True,
) -> list[CellJob]:
    """One `CellJob` per (cell, seed), in matrix order then seed order.

    With `require_pretrained` (a profile compared with the published numbers) a cell whose published
    initialisation has no local file is refused here, before anything runs: days of GPU time from a
    random-initialised backbone cannot reproduce a number trained from ImageNet weights.

    `data` (the validated splits, `check_data`): each cell's categories are checked against them;
    `classes="dataset"` (or a cell's axis `classes: dataset`) trains the file's own categories.
    `configure` changes each cell's recipe on purpose (the regression's overfit check does);
    `progress` False keeps the cells' live progress lines out of the terminal.
    """

    check_name("matrix", matrix.name)
    resolved: list[tuple[Cell, DetectorConfig, str | None]] = []
    for cell in cells:
        cfg = cell.config
        if data is not None:
            cfg = data.fit(cell.name, cfg, from_dataset=classes == "dataset" or cell.axes.get("classes") == "dataset")
        if configure is not None:
            cfg = configure(cfg)
        resolved.append((cell, cfg, cannot_build(cfg)))
    used = {name for _c, cfg, _p in resolved for name in (cfg.pretrained, cfg.load_from) if name}
    unknown = sorted(set(pretrained) - used)
    if unknown:
        names = ", ".join(sorted(used)) or "none"
        raise UserError(f"--pretrained {unknown[0]}: no selected cell uses it; used: {names}")
    check_pretrained_files(pretrained)
    if require_pretrained:  # execute_run checks this before the data; direct callers get it here
        missing_initialisation([(cell.name, cfg) for cell, cfg, _p in resolved], pretrained)
    jobs: list[CellJob] = []
    for cell, cfg, problem in resolved:
        for seed in seeds:
            run = run_config(
                profile, data_root=data_root, device=device, seed=seed,
                pretrained_path=pretrained.get(cfg.pretrained) if cfg.pretrained else None,
                load_from_path=pretrained.get(cfg.load_from) if cfg.load_from else None, progress=progress,
                neck=cell.axes.get("neck"),
            )  # fmt: skip
            jobs.append(CellJob(
                name=cell.name, matrix=matrix.name, profile=profile.name, seed=seed,
                folder=cell_dir(runs_dir, matrix.name, profile.name, cell.name, seed),
                spec={"config": cfg.to_dict(), "run": run.to_dict()},
                axes=dict(cell.axes), skip_reason=problem,
                notes=tuple(cfg.notes) + (data.notes_for(cfg) if data else ()),
                categories=data.trained(cfg) if data else (),
            ))  # fmt: skip
    return jobs


def execute_run(args: argparse.Namespace, *, log: Callable[[str], None]) -> tuple[RunSummary, MatrixSpec]:
    """`harness run` (and the first half of `reproduce`): plan the cells, run them, log a summary."""
    from harness.matrix.parse import load_matrix

    matrix = load_matrix(args.matrix)
    profile = matrix.profile(args.profile)
    if getattr(args, "images_per_gpu", None):  # recorded: RunConfig, metrics.json, the page's provenance
        profile = dataclasses.replace(profile, images_per_gpu=args.images_per_gpu)
    cells = matrix.cells_for(profile, args.only)
    if not cells:
        only, runs = " ".join(args.only), ", ".join(profile.cells)
        raise UserError(f"--only {only}: none of these cells is in profile {profile.name!r}, which runs {runs}")
    device = args.device or default_device()
    if device == "cuda" and args.executor == "local" and default_device() != "cuda":
        raise UserError("--device cuda: no CUDA device is visible here; allowed: cpu")
    runs_dir = runs_dir_of(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    pretrained = parse_pretrained(args.pretrained)
    # The executor first: a missing submitit is refused before any data is made or any cell starts.
    executor = make_executor(
        args.executor, folder=runs_dir / "_submitit" / matrix.name / profile.name, nproc_per_cell=args.nproc_per_cell,
        nnodes=args.nnodes, device=device, timeout_min=args.timeout_min, slurm_partition=args.slurm_partition, log=log,
    )  # fmt: skip
    data_root = dataset_root(matrix, profile, data=args.data, runs_dir=runs_dir, seed=args.seed, log=log)
    # Compared with the published numbers: the published initialisation, unless refused on purpose.
    require = profile.compare == "published" and not getattr(args, "allow_random_init", False)
    if require:  # before the data check, which reads every image header
        check_pretrained_files(pretrained)
        missing_initialisation([(c.name, c.config) for c in cells], pretrained)
    data = check_data(data_root, log=log)
    jobs = plan_run(
        matrix, profile, cells=cells, seeds=seeds, runs_dir=runs_dir, data_root=data_root, device=device,
        pretrained=pretrained, require_pretrained=require, data=data, classes=getattr(args, "classes", None),
    )  # fmt: skip
    where = profile_dir(runs_dir, matrix.name, profile.name)
    asked = args.jobs if args.jobs is not None else profile.jobs
    in_flight = resolve_jobs(asked, device=device, executor=args.executor, nproc_per_cell=args.nproc_per_cell * args.nnodes,
                             cells=len(jobs))
    log(f"{matrix.name} / {profile.name}: {len(cells)} cells x {len(seeds)} seed(s) on {device} "
        f"({args.executor}, {in_flight} at a time{' (auto)' if asked == 'auto' else ''}), data {data_root}, runs in {where}")  # fmt: skip
    t0 = time.monotonic()
    try:
        summary = run_jobs(
            jobs, executor=executor, base_provenance=base_provenance(cells_at_once=in_flight), nproc_per_cell=args.nproc_per_cell,
            nnodes=args.nnodes, max_in_flight=in_flight, force=args.force, log=log,
            env=thread_env(jobs=in_flight, nproc_per_cell=args.nproc_per_cell,
                           nodes_here=args.nnodes if args.executor == "local" else 1),
        )  # fmt: skip
    finally:
        executor.close()
    counts = ", ".join(f"{summary.count(s)} {s}" for s in ("ok", "failed", "skipped"))
    before = f" ({len(summary.cached)} finished before)" if summary.cached else ""
    log(f"done in {time.monotonic() - t0:.1f} s: {counts}{before}")
    return summary, matrix


def make_executor(
    kind: str,
    *,
    folder: Path,
    nproc_per_cell: int = 1,
    nnodes: int = 1,
    device: str = "cpu",
    timeout_min: int | None = None,
    slurm_partition: str | None = None,
    cluster: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Executor:
    """`local` or `submitit` by name (the `--executor` flag); `log` gets the local executor's notes."""
    if kind == "local":
        return LocalExecutor(note=log) if log is not None else LocalExecutor()
    if kind == "submitit":
        import importlib.util

        if importlib.util.find_spec("submitit") is None:
            raise UserError(
                "--executor submitit: submitit is not installed here; pip install 'frcnn-harness[cluster]' "
                "(nox -s reproduce installs it)"
            )
        return SubmititExecutor(
            folder=folder,
            cluster=cluster or os.environ.get("HARNESS_SUBMITIT_CLUSTER") or None,
            timeout_min=timeout_min or 3 * 24 * 60,
            gpus_per_node=nproc_per_cell if device.startswith("cuda") else 0,
            nodes=nnodes,
            cpus_per_task=None,
            slurm_partition=slurm_partition,
        )
    raise UserError(f"--executor: {kind!r} is not allowed; allowed: {', '.join(EXECUTORS)}")


EXECUTORS = ("local", "submitit")


__all__ = [
    "EXECUTORS",
    "check_pretrained_files",
    "dataset_root",
    "default_device",
    "execute_run",
    "make_executor",
    "missing_initialisation",
    "parse_pretrained",
    "plan_run",
    "run_config",
    "runs_dir_of",
]
