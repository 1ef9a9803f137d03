"""The CPU count of host syncs a CUDA run would make."""

from __future__ import annotations

import torch

from detector.bench.pair import BenchSettings, build_pair, make_inputs
from detector.bench.syncs import count_syncs


def test_each_kind_of_sync_is_counted_once() -> None:
    x = torch.arange(10.0)

    def fn() -> None:
        x[x > 3]  # boolean mask -> indices
        x.sum().item()  # value to Python
        torch.nonzero(x)  # size depends on the data
        x.tolist()  # no operator on CPU: counted through the wrapped method
        x[torch.tensor([1, 2])]  # integer indices: no sync
        x * 2  # no sync

    total, by_op = count_syncs(fn)
    assert total == 4
    assert by_op == {"aten::index.Tensor (boolean mask)": 1, "aten::_local_scalar_dense": 1, "aten::nonzero": 1, "Tensor.tolist": 1}
    assert torch.Tensor.tolist(x) == list(map(float, range(10)))  # the method is restored


def test_our_training_step_stays_within_its_sync_budget() -> None:
    """Ours, two images, CPU-only paths off (threaded RoIAlign): the syncs a CUDA step would make,
    counted by operator. A new per-box or per-parameter sync shows here as a failure."""
    settings = BenchSettings(size=(128, 160), gt_per_image=4)
    ours, _ = build_pair(settings)
    ours.roi_head.bbox_roi_extractor.cpu_threads = False
    images, targets = make_inputs(settings, 2)
    ours.train()
    total, by_op = count_syncs(lambda: sum(ours(images, targets).values()).backward())
    # 2 images: per image RPN inside-anchors + assign + 2 sampler draws, RoI assign + 2 draws; the
    # proposal filter, top-k, RoI positives, pooler levels; image sizes and RoI counts to Python.
    assert by_op.get("Tensor.tolist", 0) <= 2 and "aten::_local_scalar_dense" not in by_op, by_op
    # torchvision's batched_nms on CPU loops over groups (unique + a nonzero and an NMS per group);
    # on CUDA it is one NMS: that part is counted as one.
    nms = by_op.get("torchvision::nms", 0)
    assert total - 2 * nms - by_op.get("aten::_unique2", 0) + 1 <= 24, by_op


def test_inference_is_counted_under_no_grad_as_the_bench_does() -> None:
    """inference_mode hides syncs inside composite operators from the counter; no_grad does not
    (which is why the benchmark counts inference under no_grad)."""
    x = torch.arange(10.0)
    with torch.no_grad():
        seen = count_syncs(lambda: torch.where(x > 3))[0]
    assert seen == 1
