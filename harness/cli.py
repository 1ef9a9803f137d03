"""`harness` / `python -m harness`: the commands of DESIGN.md ("Commands"), one function each.

`COMMANDS` maps a subcommand name to the function that runs it (no registry, no plugin magic);
every function takes the parsed arguments and returns the exit code. Exit codes: 0 ok; 1 a cell
failed or a comparison is out of tolerance; 2 bad input (one line `harness: error: ...`, no
traceback); 130 interrupted.

Each function parses nothing itself and decides nothing: planning is `harness.execute.plan`,
tables `harness.results`, the page `harness.publish`, the CI checks `harness.regression`.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from detector.api import USER_ERRORS
from harness.errors import UserError
from harness.metrics import METRICS
from harness.parser import USAGE, build_parser
from harness.text import num, table

OK, FAILED, INTERRUPTED = 0, 1, 130
# --------------------------------------------------------------------------------------------------
# commands


def cmd_list(args: argparse.Namespace) -> int:
    from harness.matrix.parse import load_matrix

    matrix = load_matrix(args.matrix)
    cells = matrix.cells_for(args.profile) if args.profile else list(matrix.cells)
    records: list[dict[str, Any]] = [
        {
            "name": c.name,
            "section": c.section,
            "axes": dict(c.axes),
            "published": {m.column: getattr(c.published, m.column) for m in METRICS},
            "aliases": list(c.aliases),
        }
        for c in cells
    ]
    if args.format == "json":
        print(json.dumps(records, indent=2))
        return OK
    rows = [("cell", "section", *(m.label for m in METRICS), "alias")]
    for c in cells:
        numbers = (num(getattr(c.published, m.column)) for m in METRICS)
        rows.append((c.name, c.section, *numbers, (c.aliases or ("",))[0]))
    print("\n".join(table(rows)))
    print(f"\n{len(records)} cells in {matrix.name}" + (f", profile {args.profile}" if args.profile else ""))
    return OK


def _resolved(matrix_name: str, cell_name: str) -> tuple[Any, Any]:
    from harness.matrix.parse import load_matrix

    cell = load_matrix(matrix_name).cell(cell_name)
    return cell, cell.config


def cmd_describe(args: argparse.Namespace) -> int:
    from detector.api import describe

    cell, cfg = _resolved(args.matrix, args.cell)
    info = _jsonable(describe(cfg))
    info.setdefault("name", cell.name)
    info.setdefault("config", _jsonable(cfg.to_dict()))
    info["axes"] = dict(cell.axes)
    info["aliases"] = list(cell.aliases)
    if args.format == "json":
        print(json.dumps(info, indent=2))
        return OK
    import yaml

    for key, value in info.items():
        if key == "config":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        print(f"{key}: {value}")
    print("config:")
    print("  " + yaml.safe_dump(info["config"], sort_keys=False).rstrip().replace("\n", "\n  "))
    return OK


def cmd_run(args: argparse.Namespace) -> int:
    from harness.execute.plan import execute_run

    summary, _matrix = execute_run(args, log=_log)
    return FAILED if summary.count("failed") else OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    from harness.execute.plan import execute_run, runs_dir_of
    from harness.publish.page import write_report
    from harness.results.compare import comparison_exit_code, summary_counts
    from harness.results.tables import gather

    summary, matrix = execute_run(args, log=_log)
    runs_dir = runs_dir_of(args)
    results = gather(matrix, args.profile, runs_dir)  # read once: the page and this summary share it
    page = write_report(results, _out_dir(args))
    df, trends = results.compared, results.trends
    counts = ", ".join(f"{n} {s}" for s in ("ok", "failed", "skipped") if (n := summary.count(s)) or s != "skipped")
    verdicts = ", ".join(f"{n} {v}" for v, n in summary_counts(df).items() if n)
    before = f" ({len(summary.cached)} finished before)" if summary.cached else ""
    print(f"{matrix.name} / {args.profile}: {len(summary.statuses)} runs: {counts}{before}")
    print(f"verdicts: {verdicts or 'none'}")
    if not trends.empty:
        rose = ", ".join(sorted(set(trends.loc[~trends["fell"], "name"])))
        print(f"training loss fell in {int(trends['fell'].sum())}/{len(trends)} runs" + (f"; not in: {rose}" if rose else ""))
    print(f"page: {page}")
    print("next:")
    print(f"  the page and its plots   {page}  (plots/ beside it)")
    print(f"  every number, per seed   {page.parent / 'results.csv'}")
    print(f"  verdicts with reasons    harness compare {args.matrix} --profile {args.profile}"
          + (f" --runs-dir {runs_dir}" if getattr(args, 'runs_dir', None) else ""))
    print(f"  one cell's log           {runs_dir / matrix.name / args.profile}/<cell>/stdout.txt")
    return max(FAILED if summary.count("failed") else OK, comparison_exit_code(df))


def cmd_regression(args: argparse.Namespace) -> int:
    """`nox -s regression`: the checks of matrices/baselines/MATRIX.yaml; exit 1 on a regression."""
    from harness.regression.check import run_regression

    return run_regression(**_regression_kwargs(args), log=_log)


def cmd_baseline(args: argparse.Namespace) -> int:
    """`harness baseline update`: refresh the baselines on purpose, with their provenance."""
    from harness.regression.update import update_baselines

    flags = " ".join(f"{k} {v}" for k, v in (("--data", args.data), ("--device", args.device)) if v)
    command = " ".join(["harness baseline update", args.matrix, flags, *(["--only", *args.only] if args.only else [])])
    return update_baselines(**_regression_kwargs(args), command=command.replace("  ", " ").strip(), log=_log)


def _regression_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "matrix": args.matrix, "data": args.data, "only": list(args.only), "device": args.device,
        "runs_dir": Path(args.runs_dir).resolve() if args.runs_dir else None,
        "baselines": Path(args.baselines) if args.baselines else None,
    }  # fmt: skip


def cmd_report(args: argparse.Namespace) -> int:
    from harness.execute.plan import runs_dir_of
    from harness.matrix.parse import load_matrix
    from harness.publish.page import write_report
    from harness.results.collect import require_runs
    from harness.results.tables import gather

    matrix = load_matrix(args.matrix)
    require_runs(matrix, args.profile, runs_dir_of(args))
    print(write_report(gather(matrix, args.profile, runs_dir_of(args)), _out_dir(args)))
    return OK


def cmd_parity(args: argparse.Namespace) -> int:
    from harness.matrix.spec import repo_root
    from harness.parity import run_parity

    out = _out_dir(args) or repo_root() / "runs" / "parity"
    return run_parity(matrix=args.matrix, only=list(args.only), data=Path(args.data).resolve() if args.data else None,
                      images=args.images, seed=args.seed, out_dir=out, log=_log)


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.execute.plan import runs_dir_of
    from harness.matrix.parse import load_matrix
    from harness.results.against import compare_against, format_against, sides_text
    from harness.results.collect import require_runs
    from harness.results.compare import compare, comparison_exit_code, comparison_records, format_comparison

    matrix, runs = load_matrix(args.matrix), runs_dir_of(args)
    require_runs(matrix, args.profile, runs)
    if args.against:  # the user's earlier runs in the published table's place
        against = Path(args.against).expanduser().resolve()
        require_runs(matrix, args.profile, against, flag="--against")
        df = compare_against(matrix, args.profile, runs, against)
        text = format_against(df, sides_text(matrix, args.profile, runs, against))
    else:
        df = compare(matrix, args.profile, runs)
        text = format_comparison(df)
    print(json.dumps(comparison_records(df), indent=2) if args.format == "json" else text)
    return comparison_exit_code(df)


def cmd_estimate(args: argparse.Namespace) -> int:
    from harness.execute.plan import runs_dir_of
    from harness.matrix.parse import load_matrix
    from harness.results.collect import require_runs
    from harness.results.estimate import estimate, format_estimate, require_estimate

    matrix = load_matrix(args.matrix)
    require_runs(matrix, args.profile, runs_dir_of(args))
    df = estimate(matrix, args.profile, runs_dir_of(args), gpus=args.gpus)
    require_estimate(df, args.profile)
    if args.format == "json":
        print(json.dumps(_jsonable(df.astype(object).where(df.notna(), None).to_dict(orient="records")), indent=2))
    else:
        print(format_estimate(df, gpus=args.gpus))
    return OK


def cmd_eval(args: argparse.Namespace) -> int:
    from detector.api import evaluate_files

    scores = evaluate_files(_existing(args.ann, "--ann"), _existing(args.dets, "--dets"), categories=_names(args.categories))
    if args.format == "json":
        print(json.dumps(_jsonable({**scores.stats, **({"per_category": scores.per_category} if args.classwise else {})}), indent=2))
        return OK
    print("\n".join(table([("metric", "value"), *((k, f"{float(v):.3f}") for k, v in scores.stats.items())])))
    if args.classwise:
        print("\n" + "\n".join(_category_table(scores.per_category)))
    return OK


def _names(text: str | None) -> list[str] | None:
    """A comma-separated list of category names (`--categories a,b`); None when not given."""
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def _category_table(per_category: dict[str, dict[str, float | None]]) -> list[str]:
    """mmdet's classwise table: one row per category, its AP columns as fractions ("-": no ground truth)."""
    keys = next(iter(per_category.values()), {}).keys()
    return table([("category", *keys), *((name, *(num(v, 3) for v in row.values())) for name, row in per_category.items())])


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        from detector.api import verify
    except ImportError as exc:
        raise UserError(f"verify: the checkpoint verifier (detector.verify) is not available: {exc}") from None
    from harness.execute.data_root import check_coco_root
    from harness.execute.plan import default_device
    from harness.matrix.parse import load_matrix
    from harness.results.verdicts import checkpoint_verdict

    matrix = load_matrix(args.matrix)
    cell = matrix.cell(args.cell)
    root = check_coco_root(Path(args.data), "--data", need="eval")
    checkpoint = _existing(args.checkpoint, "--checkpoint")
    device = args.device or default_device()
    result = verify(cell.config, checkpoint=checkpoint, data_root=root, device=device, max_images=args.max_images)
    published = cell.published.box_ap
    verdict, reasons = checkpoint_verdict(box_ap=result["box_ap"], images=result["images"], eval_split=result["eval_split"],
                                          published=cell.published, tolerances=matrix.tolerances)
    result.update(published_box_ap=published, delta_box_ap=None if published is None else round(result["box_ap"] - published, 1),
                  verdict=verdict, verdict_reason="; ".join(reasons) or None)
    per_category = result.pop("per_category", None)
    if args.classwise and args.format == "json":
        result["per_category"] = per_category
    _print_mapping(_jsonable(result), args.format)
    if args.classwise and args.format != "json" and per_category:
        print("\n" + "\n".join(_category_table(per_category)))
    return 1 if verdict == "fail" else OK


def cmd_bench(args: argparse.Namespace) -> int:
    from detector.api import bench

    _cell, cfg = _resolved(args.matrix, args.cell)
    try:
        result = bench(cfg, device=args.device, images=args.images)
    except ValueError as exc:  # e.g. CUDA asked for where there is none
        raise UserError(f"bench --device {args.device}: {exc}") from None
    _print_mapping(_jsonable(result), args.format)
    return OK


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from detector.api import make_synthetic_coco

        root = Path(args.out)
        taken = [p for p in ("annotations/instances_train2017.json", "annotations/instances_val2017.json", "train2017", "val2017")
                 if (root / p).exists()]  # fmt: skip
        if taken:
            raise UserError(f"--out {root}: already holds {taken[0]}; `data synth` never overwrites a file "
                            "(give a new folder, or delete that one first)")
        out = make_synthetic_coco(root, images=args.images, seed=args.seed)
        print(f"wrote a synthetic COCO root with {args.images} train images (seed {args.seed}) to {out}")
        return OK
    from detector.api import subset_annotations

    categories = _names(args.categories)
    ann = _existing(args.ann, "--ann")
    if args.out.endswith(("/", os.sep)):
        raise UserError(f"--out {args.out}: is a folder; give the file to write, e.g. {args.out.rstrip('/')}/instances_train2017.json")
    summary = subset_annotations(ann, Path(args.out), categories=categories, max_images=args.max_images)
    print(f"wrote {summary['out']}: {summary['images']} images, {summary['annotations']} annotations")
    return OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": cmd_list,
    "describe": cmd_describe,
    "run": cmd_run,
    "reproduce": cmd_reproduce,
    "regression": cmd_regression,
    "baseline": cmd_baseline,
    "report": cmd_report,
    "compare": cmd_compare,
    "parity": cmd_parity,
    "estimate": cmd_estimate,
    "eval": cmd_eval,
    "verify": cmd_verify,
    "bench": cmd_bench,
    "data": cmd_data,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the command, return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, already printed as one line)
        return int(exc.code or 0)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `harness list ... | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
    except KeyboardInterrupt:
        sys.stderr.write("harness: interrupted; finished cells keep their result.json, the others resume next time\n")
        return INTERRUPTED
    except OSError as exc:
        # A read-only, permission-denied or full runs / reports folder: the user's machine, not a bug.
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = exc.filename or "a file"
        hint = " (choose another with --runs-dir / --reports-dir)" if exc.errno != errno.ENOSPC else " (free some space)"
        sys.stderr.write(f"harness: error: {where}: {exc.strerror}{hint}; finished cells keep their results\n")
        return USAGE
    except Exception as exc:
        if isinstance(exc, (UserError, *USER_ERRORS)):
            sys.stderr.write(f"harness: error: {_one_line(str(exc))}\n")
            return USAGE
        raise


_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


# --------------------------------------------------------------------------------------------------
# small helpers


def _out_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.reports_dir).resolve() if getattr(args, "reports_dir", None) else None


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _existing(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {path}: file not found")
    return p


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists, numpy / torch scalars -> Python numbers, Paths -> str (for json.dumps)."""
    return json.loads(json.dumps(obj, default=_default))


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _print_mapping(info: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(info, indent=2))
    else:
        rows = [(str(k), json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in info.items()]
        print("\n".join(table([("key", "value"), *rows])))


__all__ = ["COMMANDS", "build_parser", "main"]
