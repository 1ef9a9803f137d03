"""Preempt a cell on the real single-node Slurm of `nox -s slurm`, and check it resumes.

    python scripts/slurm_preempt.py WORK_DIR LOCAL_RUNS

Runs one smoke cell through sbatch (`harness run --executor submitit`), waits until it trains, then
sends the job the signal Slurm sends before preempting it (`scancel --signal=USR2`, the signal
submitit asks Slurm for). submitit's handler calls the cell's `checkpoint`: the cell saves a
checkpoint where it is and stops, submitit requeues the job, the requeued job resumes the cell from
that checkpoint. The cell must end ok, resumed from an iteration > 0, with exactly the metrics of
the same cell run locally (LOCAL_RUNS, from `nox -s slurm`). Exit 0 when all hold.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CELL = "faster-rcnn_r50_fpn_iou_1x_coco"
COMPARED = ("coco", "box_ap", "first_loss", "final_loss", "iters", "epochs")


def main(work: Path, local_runs: Path) -> int:
    runs = work / "preempt"
    harness = shutil.which("harness") or "harness"
    run = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        [harness, "run", "faster_rcnn", "--profile", "smoke", "--only", CELL, "--executor", "submitit",
         "--runs-dir", str(runs)],
        # One intra-op thread, as the local reference ran (`--jobs 3` on 2 cores gives each cell one):
        # float sums, and so the losses, depend on the thread count (seen: first loss 8th digit).
        env={**os.environ, "HARNESS_SUBMITIT_CLUSTER": "slurm", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )  # fmt: skip
    cell = runs / "faster_rcnn" / "smoke" / CELL
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and run.poll() is None:
        log = cell / "log.jsonl"
        if log.exists() and log.read_text().strip():
            break
        time.sleep(0.2)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()
    if run.poll() is not None or len(jobs) != 1:
        print(f"slurm-preempt: FAIL: the cell was not training in one job (jobs: {jobs}, harness exit {run.poll()})")
        run.kill()
        return 1
    print(f"slurm-preempt: job {jobs[0]} is training; scancel --signal=USR2 (Slurm's pre-preemption signal)")
    subprocess.run(["scancel", "--signal=USR2", jobs[0]], check=True)
    try:
        code = run.wait(timeout=900)
    except subprocess.TimeoutExpired:
        run.kill()
        print("slurm-preempt: FAIL: the preempted cell did not finish within 15 minutes")
        return 1
    result = json.loads((cell / "result.json").read_text())
    local = json.loads((local_runs / "faster_rcnn" / "smoke" / CELL / "result.json").read_text())
    problems = []
    if code != 0 or result["status"] != "ok":
        problems.append(f"harness exit {code}, cell {result['status']}: {result.get('error')}")
    resumed = result["metrics"].get("resumed_from_iter") or 0
    if not 0 < resumed < result["metrics"].get("iters", 0):
        problems.append(f"the cell did not resume mid-training (resumed_from_iter {resumed})")
    differ = [k for k in COMPARED if result["metrics"].get(k) != local["metrics"].get(k)]
    if differ:
        problems.append(f"differs from the uninterrupted local run in {', '.join(differ)}")
    for line in problems:
        print(f"slurm-preempt: FAIL: {line}")
    if not problems:
        print(f"slurm-preempt: ok: preempted, requeued, resumed from iteration {resumed} of {result['metrics']['iters']}, "
              f"identical to the uninterrupted run (final loss {result['metrics']['final_loss']:.6f})")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1].strip())
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
