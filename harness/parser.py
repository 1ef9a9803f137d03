"""The command line of `harness`: every command, flag and its help text (argparse).

`harness.cli` runs the commands; this module only says what they accept. A bad flag is one line
`harness: error: ...` and exit 2, like every other user error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

USAGE = 2  # the exit code of bad input (harness.cli)
DEFAULT_MATRIX = "faster_rcnn"
REPORTS_HELP = "where the page goes (default: <runs>/<matrix>/<profile>/_report, outside tracked files)"
MATRIX_HELP = "a name under matrices/ (faster_rcnn) or a YAML path"
CELL_HELP = "a cell name (faster-rcnn_r50_fpn_1x_coco) or one of its aliases"
FORMAT_HELP = "table (default) or json"
CLASSWISE_HELP = ("also score each category (mmdet's classwise table: AP, AP50, AP75, small, medium, large; "
                  "none where the category has no ground truth)")


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


def _jobs(text: str) -> int | str:
    return "auto" if text == "auto" else _int_at_least(1, "a positive integer or 'auto'")(text)
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
    p.add_argument("--jobs", type=_jobs, metavar="N|auto",
                   help="cells in flight at once (default: the profile's; auto: one per CPU core on CPU, 1 on CUDA)")
    p.add_argument("--nproc-per-cell", type=_positive, default=1, metavar="N", help="torchrun processes per cell")
    p.add_argument("--nnodes", type=_positive, default=1, metavar="N",
                   help="nodes per cell, each running --nproc-per-cell processes (torchrun c10d rendezvous; on Slurm "
                        "one task per node; with the local executor, N agents on this host)")  # fmt: skip
    p.add_argument("--images-per-gpu", type=_int_at_least(1, "an integer from 1 to 64", high=64), metavar="K",
                   help="images per process and iteration (default: the profile's); 16 on one GPU or 4 on 4 GPUs keeps the "
                        "recipe's total batch of 16 and its lr")  # fmt: skip
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
            p.add_argument("--against", metavar="DIR", help="another runs root of the same profile (earlier runs: "
                           "another torch, GPU or commit) judged in place of the published table")

    p = sub.add_parser("parity", help="each cell against MMDetection 3.3.0's own model (needs the parity group: nox -s parity)")
    p.add_argument("matrix", metavar="MATRIX", help=MATRIX_HELP)
    p.add_argument("--only", nargs="+", action="extend", default=[], metavar="GLOB", help="cell names, aliases or globs")
    p.add_argument("--data", metavar="ROOT", help="a COCO root whose first images are used (default: the synthetic set)")
    p.add_argument("--images", type=_positive, default=2, help="images per cell (default 2)")
    p.add_argument("--seed", type=_non_negative, default=0, help="seed of the shared random weights (default 0)")
    p.add_argument("--reports-dir", metavar="DIR", help="where parity.md / parity.json go (default: <repo>/runs/parity)")

    p = sub.add_parser("estimate", help="GPU-hours of each cell's full recipe from measured training throughput")
    p.add_argument("matrix", metavar="MATRIX", help=MATRIX_HELP)
    p.add_argument("--profile", default="hardware", help="whose measured throughput (default hardware)")
    p.add_argument("--runs-dir", metavar="DIR", help="where the runs are (default: <repo>/runs)")
    p.add_argument("--gpus", type=_positive, default=8, help="GPUs for the wall-clock time (default 8, the recipe's)")
    p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)

    p = sub.add_parser("eval", help="COCO bbox evaluation of a detections file")
    p.add_argument("--ann", required=True, metavar="GT.json", help="COCO-format ground truth (instances JSON)")
    p.add_argument("--dets", required=True, metavar="DETS.json", help="detections in COCO results format")
    p.add_argument("--categories", metavar="a,b", help="score only these categories (comma-separated names), as "
                   "MMDetection scores a model trained on a subset of them (the COCO-subset finetunes)")  # fmt: skip
    p.add_argument("--classwise", action="store_true", help=CLASSWISE_HELP)
    p.add_argument("--format", choices=("table", "json"), default="table", help=FORMAT_HELP)

    p = sub.add_parser("verify", help="evaluate a published checkpoint, no training")
    p.add_argument("cell", metavar="CELL", help=CELL_HELP)
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="an MMDetection v2/v3 checkpoint (.pth)")
    p.add_argument("--data", required=True, metavar="ROOT",
                   help="a COCO-2017 root with val2017 (or, without it, train2017)")  # fmt: skip
    p.add_argument("--matrix", default=DEFAULT_MATRIX, help=f"where to look the cell up (default {DEFAULT_MATRIX})")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max-images", type=_positive, metavar="N", help="evaluate the first N images only")
    p.add_argument("--classwise", action="store_true", help=CLASSWISE_HELP)
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("frcnn-harness")
    except PackageNotFoundError:  # run from a checkout through PYTHONPATH, not installed
        return "unknown (not installed)"


__all__ = ["DEFAULT_MATRIX", "USAGE", "build_parser"]
