"""Check `nox -s slurm`: the cells run through Slurm match the same cells run locally.

    python scripts/slurm_check.py SLURM_RUNS LOCAL_RUNS

Every cell of SLURM_RUNS/faster_rcnn/smoke must be ok, must have been a real Slurm job (submitit
wrote an sbatch script and a job log for it), and must end with exactly the metrics of the local
run (same seed, same threads: the training is deterministic on CPU). Exit 0 when all hold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COMPARED = ("coco", "box_ap", "first_loss", "final_loss", "iters", "epochs")


def main(slurm_runs: Path, local_runs: Path) -> int:
    cells = sorted(p.parent for p in (slurm_runs / "faster_rcnn" / "smoke").glob("*/result.json"))
    sbatch = list((slurm_runs / "_submitit").rglob("*_submission.sh"))
    problems = [] if cells else [f"no cell ran under {slurm_runs}"]
    if not any("#SBATCH" in p.read_text() for p in sbatch):
        problems.append(f"no sbatch script under {slurm_runs / '_submitit'}: the cells did not go through Slurm")
    for cell in cells:
        result = json.loads((cell / "result.json").read_text())
        local = local_runs / "faster_rcnn" / "smoke" / cell.name / "result.json"
        if result["status"] != "ok":
            problems.append(f"{cell.name}: {result['status']}: {result.get('error')}")
            continue
        if not local.is_file():
            problems.append(f"{cell.name}: no local run to compare with ({local})")
            continue
        mine, theirs = result["metrics"], json.loads(local.read_text())["metrics"]
        differ = [k for k in COMPARED if mine.get(k) != theirs.get(k)]
        if differ:
            problems.append(f"{cell.name}: differs from the local run in {', '.join(differ)}")
        else:
            print(f"slurm: {cell.name}: ok, identical to the local run (final loss {mine['final_loss']:.6f})")
    for line in problems:
        print(f"slurm: FAIL: {line}", file=sys.stderr)
    print(f"slurm: {len(cells)} cells through sbatch ({len(sbatch)} submissions), {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1].strip())
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
