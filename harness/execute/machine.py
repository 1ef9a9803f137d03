"""What makes two CPUs give different float results: the fingerprint CI baselines are stored with.

Two machines of the same device class ("cpu") can still differ bit for bit: oneDNN picks its kernels
by the instruction sets it finds (AVX2, AVX-512, AVX512-BF16, AMX), capped by `ONEDNN_MAX_CPU_ISA`,
and the bf16 autocast path above all rounds differently with and without native bf16 instructions.
The torch / oneDNN build and the thread count change the order of sums too. `fingerprint()` records
all of them; `same_kind()` says whether a baseline's exact tolerances apply or the cross-machine ones.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# oneDNN's ISA levels (ONEDNN_MAX_CPU_ISA values) and the CPU flags each needs, lowest first.
ISA_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("AVX2", ("avx2",)),
    ("AVX512_CORE", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    ("AVX512_CORE_BF16", ("avx512_bf16",)),
    ("AVX512_CORE_AMX", ("amx_bf16", "amx_tile")),
)
# What a cap names -> the highest level it allows (oneDNN accepts these names; VNNI/FP16 variants
# sit between the levels above and cap at the lower one for our purpose).
_CAPS = {
    "SSE41": -1, "AVX": -1, "AVX2": 0, "AVX2_VNNI": 0, "AVX2_VNNI_2": 0, "AVX512_CORE": 1, "AVX512_CORE_VNNI": 1,
    "AVX512_CORE_BF16": 2, "AVX512_CORE_FP16": 2, "AVX10_1_512": 2, "AVX512_CORE_AMX": 3,
    "AVX512_CORE_AMX_FP16": 3, "AVX10_1_512_AMX": 3, "AVX10_1_512_AMX_FP16": 3, "ALL": 3, "DEFAULT": 3,
}  # fmt: skip


def cpu_flags() -> tuple[str, str, set[str]]:
    """(vendor, model name, flags) from /proc/cpuinfo; ("unknown", "unknown", set()) elsewhere."""
    vendor = model = "unknown"
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return vendor, model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and vendor == "unknown":
            vendor = value.strip()
        elif key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return vendor, model, flags


def effective_isa(flags: set[str], cap: str | None) -> str:
    """The highest oneDNN ISA level the CPU has, capped by `ONEDNN_MAX_CPU_ISA` (`cap`)."""
    have = -1
    for i, (_name, needs) in enumerate(ISA_LEVELS):
        if all(f in flags for f in needs):
            have = i
        else:
            break
    if cap:
        have = min(have, _CAPS.get(cap.strip().upper(), have))
    return ISA_LEVELS[have][0] if have >= 0 else "below AVX2"


def onednn_version() -> str:
    """oneDNN's version in this torch build (from `torch.__config__.show()`), or "unknown"."""
    try:
        import torch

        match = re.search(r"(?:oneDNN|MKL-DNN) v([\w.]+)", torch.__config__.show())
    except Exception:  # noqa: BLE001 - a build without the config string
        return "unknown"
    return match.group(1) if match else "unknown"


def fingerprint(*, threads: int) -> dict[str, Any]:
    """The facts that change float results on a CPU, for a baseline's provenance."""
    import torch

    vendor, model, flags = cpu_flags()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return {
        "vendor": vendor, "cpu": model, "isa": effective_isa(flags, cap), "isa_cap": cap,
        "torch": str(torch.__version__), "onednn": onednn_version(), "threads": threads,
    }  # fmt: skip


KIND_KEYS = ("vendor", "cpu", "isa", "torch", "onednn", "threads")


def same_kind(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two fingerprints promise bit-identical results (None, an old baseline without one: no)."""
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in KIND_KEYS)  # type: ignore[union-attr]


def describe(fp: dict[str, Any] | None) -> str:
    if not fp:
        return "an unrecorded machine"
    cap = f" (capped by ONEDNN_MAX_CPU_ISA={fp['isa_cap']})" if fp.get("isa_cap") else ""
    return (f"{fp.get('cpu', '?')}, {fp.get('isa', '?')}{cap}, torch {fp.get('torch', '?')}, oneDNN "
            f"{fp.get('onednn', '?')}, {fp.get('threads', '?')} thread(s)")  # fmt: skip


def cpu_model() -> str:
    """The CPU's model name (float results can differ between CPU families), or the platform's guess."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


__all__ = ["cpu_model", "ISA_LEVELS", "KIND_KEYS", "cpu_flags", "describe", "effective_isa", "fingerprint", "onednn_version", "same_kind"]
