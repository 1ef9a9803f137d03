#!/usr/bin/env bash
# One prepared GPU run (the lent H200; ../shared/GPU.md): the hardware profile over every cell of
# matrices/faster_rcnn.yaml, its page and cost estimate, the torchvision memory counterpart, and the
# `gpu`-marked tests. Everything lands under $OUT. Run from the repository root with pycocotools as a
# wheel in .whl/ (the GPU machine has no package registry):
#   OUT=/tmp/out HARNESS_GIT_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_hardware.sh
set -u
OUT=${OUT:?set OUT to a folder for the results}
RUN_BUDGET_S=${RUN_BUDGET_S:-400}
S=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --target "$S" .whl/*.whl || exit 1
export PYTHONPATH="$S:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
{
  echo "== pytest -m gpu"; timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -3
  echo "== torchvision memory counterpart"; timeout 90 python3 -m detector.bench.cuda_memory_pair --out "$OUT/tv_memory.json" 2>&1 | tail -12
} > "$OUT/checks.txt" 2>&1
# The matrix: cells one after another (fps and memory must not share the GPU); whatever finishes
# within the budget is reported, the rest shows "not run" on the page.
timeout "$RUN_BUDGET_S" python3 -m harness run faster_rcnn --profile hardware --device cuda --runs-dir /tmp/runs > "$OUT/run.log" 2>&1
echo "run exit $?" >> "$OUT/run.log"
python3 -m harness report faster_rcnn --profile hardware --runs-dir /tmp/runs --reports-dir /tmp/page >> "$OUT/run.log" 2>&1
python3 -m harness estimate faster_rcnn --runs-dir /tmp/runs > /tmp/page/estimate.txt 2>&1
cp "$OUT/tv_memory.json" /tmp/page/ 2>/dev/null
tar czf "$OUT/page.tgz" -C /tmp/page .
tar czf "$OUT/results.tgz" -C /tmp/runs --exclude='*.pt' --exclude='_data' .
tail -40 "$OUT/run.log"; cat "$OUT/checks.txt"
