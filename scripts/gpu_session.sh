#!/usr/bin/env bash
# One prepared GPU session on a lent machine (H200 or H100; README "Measuring on a lent GPU"): the
# `gpu`-marked tests, the GPU benchmark against torchvision (issue 12), the data pipeline's rate, and
# the hardware profile over the matrix (issue 13), resuming the cells earlier sessions measured.
# Everything lands under $OUT.
#
# Prepare here, once, with a package registry (the GPU machine has none; it has torch, torchvision,
# pandas, matplotlib, yaml, jinja2, PIL, pytest):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pycocotools==2.0.11 submitit==1.5.4 opencv-python-headless   # .whl/ is git-ignored
# and run on the device with carry [".whl"] (about 64 MB, opencv most of it), in two calls (each call
# of the device tool is killed at 600 s; CALL_BUDGET_S keeps every step inside it, cutting the matrix
# short rather than losing runs.tgz):
#   OUT=$OUT HARNESS_GIT_COMMIT=<commit> bash scripts/gpu_session.sh bench    # about 6-8 minutes
#   OUT=$OUT HARNESS_GIT_COMMIT=<commit> bash scripts/gpu_session.sh matrix   # the rest of the call
# The matrix part copies reports/faster_rcnn/hardware-<gpu>/runs (the cells measured before, in the
# same /tmp/runs path, so the ledger takes them as finished) and runs the rest for MATRIX_BUDGET_S
# seconds; runs.tgz comes back to be unpacked into that folder and the page regenerated:
#   harness report faster_rcnn --profile hardware --runs-dir R --reports-dir reports/faster_rcnn/hardware-<gpu>
set -u
OUT=${OUT:?set OUT to a folder for the results}
PART=${1:-all}
MATRIX_BUDGET_S=${MATRIX_BUDGET_S:-330}
CALL_BUDGET_S=${CALL_BUDGET_S:-560}  # the device tool ends a call at 600 s; packing runs.tgz needs a few
RUNS=/tmp/runs

# Seconds a step may take: what it asks for, at most what is left of this call's budget (0: skip it).
cap() {
  local left=$((CALL_BUDGET_S - SECONDS))
  if [ "$left" -lt 30 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
step() {  # step SECONDS LOG command...: run it under `timeout`, or say in LOG that no time was left
  local want=$1 log=$2; shift 2
  local t; t=$(cap "$want")
  if [ "$t" -eq 0 ]; then echo "skipped: no time left in this call" > "$log"; return; fi
  timeout "$t" "$@" > "$log" 2>&1
  echo "exit $? (limit $t s)" >> "$log"
}
S=$(mktemp -d)
wheels=(.whl/pycocotools*.whl .whl/submitit*.whl)
python3 -c "import cv2" 2>/dev/null || wheels+=(.whl/opencv*.whl)
python3 -m pip install -q --no-index --no-deps --target "$S" "${wheels[@]}" || exit 1
export PYTHONPATH="$S:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
GPU=$(python3 -c "import torch; from detector.bench.measure import device_class, device_name; print(device_class(device_name(torch.device('cuda'))).lower())")
echo "gpu class: $GPU" >> "$OUT/gpu.txt"
t0=$SECONDS

if [ "$PART" = all ] || [ "$PART" = bench ]; then
  step 150 "$OUT/pytest_gpu.txt" python3 -m pytest -q -m gpu -p no:cacheprovider
  step 240 "$OUT/bench.log" python3 -m detector.bench.gpu --ablation --out "$OUT/bench"
  step 90 "$OUT/loader.log" python3 -m detector.bench.loader --synthetic 64 --workers 0,2,4,8,12 --batches 60 \
    --device cuda --out "$OUT/loader.json"
  # The harness's own training loop (data loading included) at the recipe's whole batch on one GPU:
  # issue 12's >= 100 images/s goal for R-50-FPN AMP, and the same in fp32 beside it.
  step 150 "$OUT/run16.log" python3 -m harness run faster_rcnn --profile hardware --device cuda --images-per-gpu 16 \
    --only faster-rcnn_r50_fpn_amp-1x_coco faster-rcnn_r50_fpn_1x_coco --runs-dir /tmp/runs16
  mkdir -p "$OUT/run16" && for m in /tmp/runs16/faster_rcnn/hardware/*/metrics.json; do
    [ -f "$m" ] && cp "$m" "$OUT/run16/$(basename "$(dirname "$m")").json"; done
  echo "bench part: $((SECONDS - t0)) s" >> "$OUT/gpu.txt"
fi

if [ "$PART" = all ] || [ "$PART" = matrix ]; then
  earlier="reports/faster_rcnn/hardware-$GPU/runs"
  if [ -d "$earlier" ] && [ ! -d "$RUNS/faster_rcnn" ]; then
    mkdir -p "$RUNS" && cp -r "$earlier/." "$RUNS/"
  fi
  # First the cells the committed page shows "not run": a matrix cut short by the budget fills its
  # holes before re-measuring what the page already has; then the rest, on what is left.
  tm=$SECONDS
  missing=$(python3 -c "import csv, sys; print(' '.join(r['name'] for r in csv.DictReader(open(sys.argv[1])) if r['status'] == 'not run'))" \
    "reports/faster_rcnn/hardware-$GPU/results.csv" 2>/dev/null)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086  # one --only argument per cell name
    step "$MATRIX_BUDGET_S" "$OUT/run_missing.log" python3 -m harness run faster_rcnn --profile hardware --device cuda \
      --runs-dir "$RUNS" --only $missing
  fi
  left=$((MATRIX_BUDGET_S - (SECONDS - tm)))
  [ "$left" -gt 30 ] && step "$left" "$OUT/run.log" python3 -m harness run faster_rcnn --profile hardware --device cuda --runs-dir "$RUNS"
  # Where a hardware cell's wall time goes (metrics.json phase_s: start-up, build, data, train, eval, fps;
  # the 2026-11-28 cells took ~25 s of wall for ~2.5 s of training): what to cut to fit the table in one call.
  python3 - "$RUNS/faster_rcnn/hardware" > "$OUT/phases.txt" 2>&1 <<'PY'
import json, pathlib, sys
rows = [(p.parent.name, json.loads(p.read_text()).get("phase_s") or {}) for p in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json"))]
keys = sorted({k for _, ph in rows for k in ph})
print("cell".ljust(50), *(k.rjust(8) for k in keys))
for name, ph in rows:
    print(name[:50].ljust(50), *(f"{ph.get(k, 0):8.2f}" for k in keys))
print("total".ljust(50), *(f"{sum(ph.get(k, 0) for _, ph in rows):8.1f}" for k in keys))
PY
  tar czf "$OUT/runs.tgz" -C "$RUNS" --exclude='*.pt' --exclude='_data' --exclude='.lock' --exclude='_report' .
  tail -3 "$OUT/run_missing.log" "$OUT/run.log" 2>/dev/null
fi
cat "$OUT/gpu.txt"; tail -3 "$OUT/pytest_gpu.txt" 2>/dev/null; tail -12 "$OUT/bench.log" 2>/dev/null; tail -6 "$OUT/loader.log" 2>/dev/null
