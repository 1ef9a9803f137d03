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
from typing import Any, NoReturn

from detector.api import USER_ERRORS
from harness.errors import UserError
from harness.metrics import METRICS

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
DEFAULT_MATRIX = "faster_rcnn"
REPORTS_HELP = "where the page goes (default: <runs>/<matrix>/<profile>/_report, outside tracked files)"
MATRIX_HELP = "a name under matrices/ (faster_rcnn) or a YAML path"
CELL_HELP = "a cell name (faster-rcnn_r50_fpn_1x_coco) or one of its aliases"
FORMAT_HELP = "table (default) or json"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line `harness: error: ...` (exit 2), like every user error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"harness: error: {self.prog.removeprefix('harness').strip() or 'harness'}: {message}\n")
        raise SystemExit(USAGE)


def _int_at_least(low: int, what: str, *, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for integers >= `low` (and <= `high`); `what` names them in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def _add_run_flags(p: argparse.ArgumentParser, *, profile: str = "smoke", matrix_optional: bool = False) -> None:
    where = "a name under matrices/ (faster_rcnn) or a YAML path"
    if matrix_optional:
        p.add_argument("matrix", metavar="MATRIX", nargs="?", default=DEFAULT_MATRIX, help=f"{where}")
    else:
        p.add_argument("matrix", metavar="MATRIX", help=where)
    p.add_argument("--profile", default=profile, help=f"smoke, ci, full or the matrix's own (default {profile})")
    p.add_argument("--only", nargs="+", action="extend", default=[], metavar="GLOB",
                   help="cell names, aliases or globs")  # fmt: skip
    p.add_argument("--data", metavar="ROOT", help="a COCO-2017 root replacing the profile's dataset")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--executor", choices=("local", "submitit"), default="local",
                   help="local subprocesses (default) or submitit (Slurm when sbatch is there; needs the cluster extra)")  # fmt: skip
    p.add_argument("--jobs", type=_positive, default=1, metavar="N", help="cells in flight at once (default 1)")
    p.add_argument("--nproc-per-cell", type=_positive, default=1, metavar="N", help="torchrun processes per cell")
    p.add_argument("--seed", type=_int_at_least(0, "an integer from 0 to 2**31 - 1", high=2**31 - 1), default=0,
                   metavar="S", help="first seed (default 0)")  # fmt: skip
    p.add_argument("--seeds", type=_int_at_least(1, "an integer from 1 to 100", high=100), default=1, metavar="K",
                   help="run seeds S .. S+K-1 (default 1, at most 100)")  # fmt: skip
    p.add_argument("--runs-dir", metavar="DIR", help="default: <repo>/runs")
    p.add_argument("--force", action="store_true", help="run finished cells again (old outputs go to _previous/)")
    p.add_argument("--pretrained", nargs="+", action="extend", default=[], metavar="NAME=FILE",
                   help="local file for a pretrained name, e.g. torchvision://resnet50=/w/resnet50.pth")  # fmt: skip
    p.add_argument("--timeout-min", type=_positive, metavar="MIN", help="submitit job time limit (default 3 days)")
    p.add_argument("--slurm-partition", metavar="NAME", help="submitit on Slurm: the partition")
    p.add_argument("--classes", choices=("dataset",),
                   help="dataset: train the annotation file's own categories (id order), the head sized to them")
    p.add_argument("--allow-random-init", action="store_true",
                   help="let a profile compared with the published numbers (full) start without its pretrained "
                        "weights; the random initialisation is recorded as a deviation")  # fmt: skip


def _add_regression_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("matrix", metavar="MATRIX", nargs="?", default=DEFAULT_MATRIX,
                   help=f"whose checks: matrices/baselines/MATRIX.yaml (default {DEFAULT_MATRIX})")  # fmt: skip
    p.add_argument("--data", metavar="ROOT", help="the real COCO subset (CI: ../shared/data/coco128)")
    p.add_argument("--only", nargs="+", action="extend", default=[], metavar="GLOB",
                   help="check ids, suites or cells, e.g. 'synthetic/*' or overfit")  # fmt: skip
    p.add_argument("--runs-dir", metavar="DIR", help="default: <repo>/runs (checks run in DIR/regression/)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--baselines", metavar="FILE", help="default: matrices/baselines/MATRIX.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description="Run the Faster R-CNN matrix, compare it with the published table.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("list", help="the cells of a matrix")
    p.add_argument("matrix", metavar="MATRIX", help=MATRIX_HELP)
    p.add_argument("--profile", help="only the cells this profile runs")
    p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)

    p = sub.add_parser("describe", help="a cell's resolved config and parameter counts")
    p.add_argument("cell", metavar="CELL", help="a cell name or alias")
    p.add_argument("--matrix", default=DEFAULT_MATRIX, help=f"where to look the cell up (default {DEFAULT_MATRIX})")
    p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)

    p = sub.add_parser("run", help="run the cells of a matrix profile")
    _add_run_flags(p)
    p = sub.add_parser("reproduce", help="run, then report, then print the comparison summary")
    _add_run_flags(p)
    p.add_argument("--reports-dir", metavar="DIR", help=REPORTS_HELP)
    p = sub.add_parser("regression", help="CI: train the regression checks, compare with matrices/baselines/")
    _add_regression_flags(p)
    p = sub.add_parser("baseline", help="CI baselines under matrices/baselines/")
    baseline = p.add_subparsers(dest="baseline_command", metavar="ACTION", parser_class=_Parser)
    baseline.required = True
    _add_regression_flags(baseline.add_parser("update", help="run the regression checks, store them as the baselines"))

    for name, what in (("report", "write the results page"), ("compare", "measured vs published, with verdicts")):
        p = sub.add_parser(name, help=what)
        p.add_argument("matrix", metavar="MATRIX", help=MATRIX_HELP)
        p.add_argument("--profile", default="smoke", help="whose runs (default smoke)")
        p.add_argument("--runs-dir", metavar="DIR", help="where the runs are (default: <repo>/runs)")
        if name == "report":
            p.add_argument("--reports-dir", metavar="DIR", help=REPORTS_HELP)
        if name == "compare":
            p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)

    p = sub.add_parser("estimate", help="GPU-hours of each cell's full recipe from measured training throughput")
    p.add_argument("matrix", metavar="MATRIX", help=MATRIX_HELP)
    p.add_argument("--profile", default="hardware", help="whose measured throughput (default hardware)")
    p.add_argument("--runs-dir", metavar="DIR", help="where the runs are (default: <repo>/runs)")
    p.add_argument("--gpus", type=_positive, default=8, help="GPUs for the wall-clock time (default 8, the recipe's)")
    p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)

    p = sub.add_parser("eval", help="COCO bbox evaluation of a detections file")
    p.add_argument("--ann", required=True, metavar="GT.json", help="COCO-format ground truth (instances JSON)")
    p.add_argument("--dets", required=True, metavar="DETS.json", help="detections in COCO results format")
    p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)

    p = sub.add_parser("verify", help="evaluate a published checkpoint, no training")
    p.add_argument("cell", metavar="CELL", help=CELL_HELP)
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="an MMDetection v2/v3 checkpoint (.pth)")
    p.add_argument("--data", required=True, metavar="ROOT",
                   help="a COCO-2017 root with val2017 (or, without it, train2017)")  # fmt: skip
    p.add_argument("--matrix", default=DEFAULT_MATRIX, help=f"where to look the cell up (default {DEFAULT_MATRIX})")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max-images", type=_positive, metavar="N", help="evaluate the first N images only")
    p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)

    p = sub.add_parser("bench", help="inference speed and memory of a cell (random weights)")
    p.add_argument("cell", metavar="CELL", help=CELL_HELP)
    p.add_argument("--matrix", default=DEFAULT_MATRIX, help=f"where to look the cell up (default {DEFAULT_MATRIX})")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--images", type=_positive, default=20, help="images timed after 5 warm-up images (default 20)")
    p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)

    p = sub.add_parser("data", help="make or cut datasets")
    data = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    data.required = True
    d = data.add_parser("synth", help="write the synthetic COCO-style set")
    d.add_argument("--out", required=True, metavar="DIR", help="the COCO root to write")
    d.add_argument("--images", type=_positive, default=64, help="train images (default 64)")
    d.add_argument("--seed", type=_non_negative, default=0, help="the same seed gives the same bytes (default 0)")
    d = data.add_parser("subset", help="a subset of a COCO annotation file")
    d.add_argument("--ann", required=True, metavar="IN.json", help="the annotation file to cut")
    d.add_argument("--out", required=True, metavar="OUT.json", help="the new annotation file (never --ann itself)")
    d.add_argument("--categories", metavar="a,b", help="comma-separated category names")
    d.add_argument("--max-images", type=_positive, metavar="N", help="keep the first N images (after --categories)")
    return parser


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
        numbers = (_num(getattr(c.published, m.column)) for m in METRICS)
        rows.append((c.name, c.section, *numbers, (c.aliases or ("",))[0]))
    print(_table(rows))
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
    from harness.regression.check import update_baselines

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
    from harness.results.tables import gather

    matrix = load_matrix(args.matrix)
    matrix.profile(args.profile)
    print(write_report(gather(matrix, args.profile, runs_dir_of(args)), _out_dir(args)))
    return OK


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.execute.plan import runs_dir_of
    from harness.matrix.parse import load_matrix
    from harness.results.compare import (
        compare,
        comparison_exit_code,
        comparison_records,
        format_comparison,
    )

    matrix = load_matrix(args.matrix)
    matrix.profile(args.profile)
    df = compare(matrix, args.profile, runs_dir_of(args))
    if args.format == "json":
        print(json.dumps(comparison_records(df), indent=2))
    else:
        print(format_comparison(df))
    return comparison_exit_code(df)


def cmd_estimate(args: argparse.Namespace) -> int:
    from harness.execute.plan import runs_dir_of
    from harness.matrix.parse import load_matrix
    from harness.results.estimate import estimate, format_estimate

    matrix = load_matrix(args.matrix)
    matrix.profile(args.profile)
    df = estimate(matrix, args.profile, runs_dir_of(args), gpus=args.gpus)
    if args.format == "json":
        print(json.dumps(_jsonable(df.astype(object).where(df.notna(), None).to_dict(orient="records")), indent=2))
    else:
        print(format_estimate(df, gpus=args.gpus))
    return OK


def cmd_eval(args: argparse.Namespace) -> int:
    from detector.api import evaluate_files

    stats = evaluate_files(_existing(args.ann, "--ann"), _existing(args.dets, "--dets"))
    if args.format == "json":
        print(json.dumps(_jsonable(stats), indent=2))
    else:
        print(_table([("metric", "value"), *((k, f"{float(v):.3f}") for k, v in stats.items())]))
    return OK


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        from detector.api import verify
    except ImportError as exc:
        raise UserError(f"verify: the checkpoint verifier (detector.model.weights.verify) is not available: {exc}") from None
    from harness.execute.plan import check_coco_root, default_device

    _cell, cfg = _resolved(args.matrix, args.cell)
    root = check_coco_root(Path(args.data), "--data", need="eval")
    checkpoint = _existing(args.checkpoint, "--checkpoint")
    device = args.device or default_device()
    result = verify(cfg, checkpoint=checkpoint, data_root=root, device=device, max_images=args.max_images)
    _print_mapping(_jsonable(result), args.format)
    return OK


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

        out = make_synthetic_coco(Path(args.out), images=args.images, seed=args.seed)
        print(f"wrote a synthetic COCO root with {args.images} train images (seed {args.seed}) to {out}")
        return OK
    from detector.api import subset_annotations

    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("frcnn-harness")
    except PackageNotFoundError:  # run from a checkout through PYTHONPATH, not installed
        return "unknown (not installed)"


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


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
        print(_table([("key", "value"), *rows]))


__all__ = ["COMMANDS", "build_parser", "main"]
