"""harness.execute.machine: the CPU fingerprint CI baselines carry, and when cross-machine tolerances apply."""

from __future__ import annotations

from harness.execute.machine import describe, effective_isa, fingerprint, same_kind

AMX = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_effective_isa_and_caps() -> None:
    assert effective_isa(AMX, None) == "AVX512_CORE_AMX"
    assert effective_isa(AMX, "AVX2") == "AVX2"
    assert effective_isa(AMX, "avx512_core") == "AVX512_CORE"
    assert effective_isa(AMX, "AVX512_CORE_BF16") == "AVX512_CORE_BF16"
    assert effective_isa({"avx2"}, None) == "AVX2"
    assert effective_isa({"avx2", "avx512_bf16"}, None) == "AVX2"  # bf16 without AVX-512 core: not a level
    assert effective_isa(set(), None) == "below AVX2"


def test_same_kind() -> None:
    here = fingerprint(threads=1)
    assert same_kind(here, dict(here))
    other_isa = "AVX512_CORE" if here["isa"] == "AVX2" else "AVX2"  # whichever this machine is not
    assert not same_kind(here, {**here, "isa": other_isa})
    assert not same_kind(here, {**here, "threads": 2})
    assert not same_kind(here, None)  # a baseline made before fingerprints were stored
    assert "thread" in describe(here) and describe(None) == "an unrecorded machine"


def test_cross_machine_tolerances_are_looked_up_first() -> None:
    from harness.regression.baselines import default_path, load_spec

    spec = load_spec(default_path())
    assert spec.cross_machine, "matrices/baselines/faster_rcnn.yaml declares cross_machine_tolerances"
    same = spec.tolerance("log/loss_bbox@2", "synthetic/faster-rcnn_r50_fpn_amp-1x_coco")
    cross = spec.tolerance("log/loss_bbox@2", "synthetic/faster-rcnn_r50_fpn_amp-1x_coco", cross_machine=True)
    assert cross.rel > same.rel
    # A metric no cross-machine entry names falls through to the exact-machine list.
    assert spec.tolerance("iters", "x", cross_machine=True).abs == 0
