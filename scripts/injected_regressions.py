"""Does the CI regression check catch real regressions, under the tolerances a CI runner gets?

For each injected fault (a one-line change to a copy of the code) the synthetic fp32 checks run
against the stored baselines, and the script reports whether the check failed as it must. Healthy
variants (`--healthy`: oneDNN ISA caps, thread counts) must pass. Run from the repository root:

    python scripts/injected_regressions.py [--runs-dir /tmp/inject] [--only GLOB ...]

Exit 0 when every injected fault was caught; 1 otherwise. Nothing in the checkout is modified: each
fault is applied to a copy under the runs folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (file, exact old text, new text): the faults the regression check exists to catch.
FAULTS: dict[str, tuple[str, str, str]] = {
    "off-by-one loss normalisation": (
        "detector/model/roi_heads.py", "avg_factor = max(rois.shape[0], 1)", "avg_factor = max(rois.shape[0], 1) + 1"),
    "wrong lr (0.02 -> 0.01)": ("detector/config.py", "    lr: float = 0.02", "    lr: float = 0.01"),
    "swapped box coder stds": (
        "detector/config.py", "target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)",
        "target_stds: tuple[float, float, float, float] = (0.2, 0.2, 0.1, 0.1)"),
    "missing frozen stage": ("detector/config.py", "    frozen_stages: int = 1", "    frozen_stages: int = 0"),
}  # fmt: skip


def copy_with(fault: tuple[str, str, str] | None, dest: Path) -> Path:
    """The project's code (detector/, harness/, matrices/) copied to `dest`, with `fault` applied."""
    if dest.exists():
        shutil.rmtree(dest)
    for part in ("detector", "harness", "matrices"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    if fault is not None:
        path, old, new = fault
        text = (dest / path).read_text(encoding="utf-8")
        if text.count(old) != 1:
            raise SystemExit(f"{path}: the text to change is not there exactly once: {old!r}")
        (dest / path).write_text(text.replace(old, new), encoding="utf-8")
    return dest


def regression(code: Path, runs: Path, only: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`harness regression` of the copy in `code` against the checkout's baselines; (exit code, output)."""
    argv = [sys.executable, "-m", "harness", "regression", "--only", *only, "--runs-dir", str(runs),
            "--baselines", str(ROOT / "matrices/baselines/faster_rcnn.yaml")]  # fmt: skip
    proc = subprocess.run(argv, cwd=code, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code), **env})
    return proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/injected-regressions"), help="scratch folder")
    parser.add_argument("--only", nargs="+", default=["synthetic/faster-rcnn_r50_fpn_1x_coco"], help="checks to run")
    parser.add_argument("--healthy", nargs="*", default=[], metavar="ENV=VALUE",
                        help="also run the unmodified code under these settings, e.g. ONEDNN_MAX_CPU_ISA=AVX2")  # fmt: skip
    args = parser.parse_args()
    results = []
    for name, fault in [("healthy", None), *FAULTS.items()]:
        variants = [{}] if fault is not None else [{}] + [dict([kv.split("=", 1)]) for kv in args.healthy]
        for env in variants:
            label = name + (f" ({', '.join(f'{k}={v}' for k, v in env.items())})" if env else "")
            slug = "".join(c if c.isalnum() else "-" for c in label)[:60]
            code = copy_with(fault, args.runs_dir / slug / "code")
            rc, out = regression(code, args.runs_dir / slug / "runs", args.only, env)
            moved = [line for line in out.splitlines() if line.startswith(("REGRESSION", "FAIL"))]
            caught = rc == 1 and bool(moved)
            ok = (rc == 0) if fault is None else caught
            results.append({"variant": label, "exit": rc, "as_it_must": ok, "first_line": out.splitlines()[0] if out else "",
                            "moved": moved[:3]})  # fmt: skip
            print(f"{'ok  ' if ok else 'BAD '} {label}: exit {rc}" + (f"; {moved[0]}" if moved else ""), flush=True)
    (args.runs_dir / "results.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["as_it_must"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
