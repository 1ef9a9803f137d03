"""How fast the training data pipeline delivers images: does it keep up with the accelerator?

`python -m detector.bench.loader --data ROOT [--workers 0,2,4,8] [--batches 40] [--device cuda]`
(or `--synthetic N`: N generated 640 x 480 JPEGs, COCO's typical size, where no COCO is at hand) runs the real training pipeline of a cell (`harness run`'s: COCO JSON, JPEG decode, the recipe's
resize and flip, the aspect-ratio batch sampler, collate, pinned memory and the non-blocking copy to
the device when it is CUDA) for each worker count and reports images/s after the first batches
(worker start-up is reported apart). No model runs: this is the rate the loader can feed.
Compare it with the training rate of the same cell (`harness run`'s "Train (img/s)" column): a loader
slower than the GPU is the bottleneck.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from detector.bench.timing import machine
from detector.config import DetectorConfig, RunConfig
from detector.jsonio import write_json_atomic


def measure(cfg: DetectorConfig, run: RunConfig, *, workers: int, batches: int, skip: int, device: torch.device) -> dict[str, Any]:
    """One worker count: seconds to the first batch, then images/s over the next `batches` batches
    (the first `skip` after it not counted: workers filling their prefetch queues)."""
    from detector.data import coco as D

    dataset = D.build_dataset(cfg, run, train=True)
    loader = D.build_train_loader(dataset, run.images_per_gpu, workers, run.seed, 0, 1, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    images_seen, timed_from, first_s = 0, 0.0, 0.0
    it = iter(_endless(loader))
    for i in range(1 + skip + batches):
        if i == 1 + skip:
            timed_from, images_seen = time.perf_counter(), 0
        images, targets, _ = next(it)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        images_seen += len(images)
        if i == 0:
            first_s = time.perf_counter() - start
    elapsed = time.perf_counter() - timed_from
    return {"workers": workers, "first_batch_s": round(first_s, 3), "images": images_seen,
            "images_per_s": round(images_seen / elapsed, 2), "s_per_batch": round(elapsed / batches, 4)}  # fmt: skip


def _endless(loader: Any) -> Any:
    """Batches across epochs (a small set such as coco128 ends an epoch in a few batches)."""
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch, 0)
        yield from loader
        epoch += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detector.bench.loader", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="COCO-layout root (e.g. coco128 or COCO 2017)")
    source.add_argument("--synthetic", type=int, metavar="N", help="generate N synthetic 640x480 JPEGs in a temporary folder instead")
    parser.add_argument("--ann", default="annotations/instances_train2017.json", help="annotation file under --data (default %(default)s)")
    parser.add_argument("--images", default="train2017", help="image folder under --data (default %(default)s)")
    parser.add_argument("--workers", default="0,2,4,8", help="comma-separated worker counts to measure (default %(default)s)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per worker count (default %(default)s)")
    parser.add_argument("--skip", type=int, default=4, help="batches after the first not timed (default %(default)s)")
    parser.add_argument("--images-per-gpu", type=int, default=2, help="images per batch (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="where batches are copied: cpu or cuda (pinned memory) (default %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        parser.error(f"--workers: {args.workers!r} is not a comma-separated list of integers")
    if not workers or min(workers) < 0 or args.batches < 1 or args.skip < 0 or args.images_per_gpu < 1:
        parser.error("--workers must be >= 0, --batches and --images-per-gpu >= 1, --skip >= 0")
    tmp = None
    if args.synthetic is not None:
        if args.synthetic < args.images_per_gpu:
            parser.error(f"--synthetic: {args.synthetic} images cannot fill a batch of {args.images_per_gpu}")
        from detector.data.synth import make_synthetic_coco

        tmp = tempfile.TemporaryDirectory(prefix="loader-bench-")
        args.data = make_synthetic_coco(Path(tmp.name) / "coco", images=args.synthetic, size=(640, 480), val_images=1)
    if not (args.data / args.ann).is_file():
        parser.error(f"--data/--ann: {args.data / args.ann} is not a file")
    device = torch.device(args.device)
    cfg = DetectorConfig()  # faster-rcnn_r50_fpn_1x_coco: 1333x800 resize, flip 0.5
    run = RunConfig(data_root=str(args.data), train_ann=args.ann, train_images=args.images, val_ann=None,
                    images_per_gpu=args.images_per_gpu, device=args.device)  # fmt: skip
    rows = []
    for w in workers:
        row = measure(cfg, run, workers=w, batches=args.batches, skip=args.skip, device=device)
        rows.append(row)
        print(f"loader: {w:2d} workers: {row['images_per_s']:7.1f} images/s ({row['s_per_batch'] * 1000:.1f} ms per "
              f"batch of {args.images_per_gpu}; first batch after {row['first_batch_s']:.2f} s)")  # fmt: skip
    doc = {"data": f"synthetic: {args.synthetic} JPEGs of 640x480" if tmp else str(args.data), "ann": args.ann, "images_per_gpu": args.images_per_gpu, "device": args.device,
           "pipeline": "decode (PIL) + resize 1333x800 keep-ratio (cv2 INTER_LINEAR) + flip 0.5 + aspect-ratio batches "
                       "+ collate" + (" + pinned non-blocking copy to the device" if device.type == "cuda" else ""),
           "rows": rows, "machine": machine()}  # fmt: skip
    if args.out:
        write_json_atomic(args.out, doc, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["main", "measure"]
