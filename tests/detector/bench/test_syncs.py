"""The CPU count of host syncs a CUDA run would make."""

from __future__ import annotations

import pytest
import torch

from detector.bench.pair import BenchSettings, build_pair, make_inputs
from detector.bench.syncs import count_operators, count_syncs


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


def test_operators_and_the_kernels_among_them_are_counted() -> None:
    x = torch.randn(4, 4, requires_grad=True)

    def fn() -> None:
        y = x.t() @ x  # a view (no kernel), a matmul
        y.reshape(-1)[:3].sum().backward()  # views; sum; backward: ones, slice_backward, two mm, add

    counted = count_operators(fn)
    assert counted["kernels"] == 7 and counted["operators"] > counted["kernels"], counted


def test_a_frozen_backbone_launches_one_kernel_per_conv_once_folded() -> None:
    """Batch-1 inference is launch-bound on a GPU: once folded, a conv + frozen BN is one kernel."""
    from detector.config import DetectorConfig
    from detector.model.backbones import build_backbone, set_fold_bn_

    backbone = build_backbone(DetectorConfig().backbone).eval()
    set_fold_bn_(backbone, "all")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        backbone(x)
        folded = count_operators(lambda: backbone(x))
        set_fold_bn_(backbone, "off")
        plain = count_operators(lambda: backbone(x))
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in backbone.modules())
    assert plain["kernels"] - folded["kernels"] == convs, (plain, folded, convs)  # one BN kernel per conv less


def _training_step_syncs(num_images: int, *, nms_per_level: bool) -> tuple[int, dict[str, int]]:
    settings = BenchSettings(size=(128, 160), gt_per_image=4)
    ours, _ = build_pair(settings)
    # The CPU-only RoIAlign paths (threads, the sparse gradient) never run on CUDA.
    ours.roi_head.bbox_roi_extractor.cpu_threads = ours.roi_head.bbox_roi_extractor.cpu_sparse_grad = False
    ours.rpn_head.nms_per_level = nms_per_level
    images, targets = make_inputs(settings, num_images)
    ours.train()
    return count_syncs(lambda: sum(ours(images, targets).values()).backward())


def test_our_training_step_syncs_do_not_grow_with_the_batch() -> None:
    """The syncs a CUDA training step would make, counted by operator: assignment and sampling
    make none (fixed-size slots), the RPN's NMS one per level, the pooler one (its counts per
    level), the proposals' top-k one. The same for 2 and 4 images: a new per-image or per-box sync fails here."""
    two = _training_step_syncs(2, nms_per_level=True)
    four = _training_step_syncs(4, nms_per_level=True)
    assert two == four, (two, four)
    total, by_op = two
    assert by_op == {"torchvision::nms": 5, "Tensor.tolist": 1, "aten::index.Tensor (boolean mask)": 1}, by_op


def test_one_batched_nms_path_adds_only_its_own_syncs() -> None:
    """Without the per-level NMS (what CUDA runs up to torchvision's one-call size), the rest is
    the same: CPU's batched_nms loops over the (image, level) groups (a unique, a nonzero and an
    NMS per group, a final nonzero), on CUDA it is one NMS. Small boxes are scored out, not
    selected out: no nonzero of its own."""
    total, by_op = _training_step_syncs(2, nms_per_level=False)
    nms = by_op["torchvision::nms"]
    assert nms == 2 * 5 and by_op.get("aten::_unique2") == 1
    on_cuda = total - (1 + 2 * nms + 1) + 1
    assert on_cuda == 1 + 1 + 1, by_op  # pooler counts, top-k, one NMS


def test_inference_is_counted_under_no_grad_as_the_bench_does() -> None:
    """inference_mode hides syncs inside composite operators from the counter; no_grad does not
    (which is why the benchmark counts inference under no_grad)."""
    x = torch.arange(10.0)
    with torch.no_grad():
        seen = count_syncs(lambda: torch.where(x > 3))[0]
    assert seen == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("nms_per_level", [False, True])
def test_cuda_training_step_syncs_do_not_grow_with_the_batch(nms_per_level: bool) -> None:
    """The real count on CUDA (`torch.cuda.set_sync_debug_mode`, as `detector.bench.gpu` counts):
    the same for 2 and 4 images, and about what the CPU count says (3 or 7)."""
    from detector.bench.gpu import count_syncs as cuda_syncs

    settings = BenchSettings(size=(256, 320), gt_per_image=4)
    ours, _ = build_pair(settings)
    ours = ours.cuda().train()
    ours.rpn_head.nms_per_level = nms_per_level
    images, targets = make_inputs(settings, 4)
    images = [im.cuda() for im in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    counts = []
    for n in (2, 4):

        def step(n: int = n) -> None:
            sum(ours(images[:n], targets[:n]).values()).backward()

        step()  # warm-up: cuDNN and the allocator settle first
        counts.append(cuda_syncs(step, torch.device("cuda")))
    assert counts[0] == counts[1] and counts[0] is not None and counts[0] <= 9, counts
