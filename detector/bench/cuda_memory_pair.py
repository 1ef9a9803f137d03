"""Peak CUDA training memory of ours and of torchvision's `fasterrcnn_resnet50_fpn`, built alike, on
the same worst-case input: 2 images of 800 x 1333 (padded to 800 x 1344), 8 boxes each, 10 SGD steps.

What the framework alone does to the Mem column: the hardware page shows it beside the R-50-FPN cell.
Each model is measured alone (the other deleted, caches emptied, peak statistics reset), fp32 (TF32
convolutions as in the cells) and under fp16 autocast.

    python -m detector.bench.cuda_memory_pair [--steps N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any

import torch

from detector.bench.gpu import make_call
from detector.bench.pair import BenchSettings, build_pair, make_inputs, theirs_inputs


def peak_training_memory(which: str, *, steps: int, amp: bool, size: tuple[int, int] = (800, 1333)) -> float:
    """GiB of `torch.cuda.max_memory_allocated` over `steps` training steps of one model, counted
    from what was allocated before it was built: alone in a process this is its whole footprint,
    and inside a cell's process (the hardware profile's `framework_memory`) the cell's own model,
    still resident, is not counted."""
    settings = BenchSettings(size=size)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ours, theirs = build_pair(settings)
    model = ours if which == "ours" else theirs
    del ours, theirs
    images, targets = make_inputs(settings, 2)
    if which == "torchvision":
        images, targets = theirs_inputs(images, targets)
    dev = torch.device("cuda")
    model = model.to(dev).train()
    images = [im.to(dev) for im in images]
    targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
    step = make_call(model, "train", images, targets, precision="amp" if amp else "fp32", device=dev, seed=0)
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 1024**3
    del model, step, images, targets
    gc.collect()
    torch.cuda.empty_cache()
    return round(peak, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detector.bench.cuda_memory_pair", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per model (default 10)")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    torch.backends.cudnn.allow_tf32 = True
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": args.steps,
                              "input": "2 images 800x1333, 8 boxes each", "unit": "GiB (max_memory_allocated)"}
    for amp in (False, True):
        for which in ("ours", "torchvision"):
            result[f"{which}_{'amp' if amp else 'fp32'}_gb"] = peak_training_memory(which, steps=args.steps, amp=amp)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
