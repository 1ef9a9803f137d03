"""Where a number came from: code commit, library versions, machine, time.

Every `result.json` carries a `provenance` block (schema in ARCHITECTURE.md) so a measured box AP can
be traced back to the code and the hardware that produced it (pytest-benchmark `commit_info` /
`machine_info` model). Nothing here imports torch unless it is asked about a device: listing a matrix
or writing a report must stay fast.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"

# Distribution names whose versions decide the numbers (torch kernels, torchvision ops, pycocotools
# matching, pandas aggregation) plus our own package.
_LIBRARIES: dict[str, str] = {
    "torch": "torch",
    "torchvision": "torchvision",
    "pycocotools": "pycocotools",
    "pandas": "pandas",
    "harness": "frcnn-harness",
}


def now_iso() -> str:
    """The current time in UTC as ISO 8601 with seconds, e.g. "2026-05-09T07:35:25+00:00"."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_info(repo: Path | None = None) -> dict[str, Any]:
    """Commit id and dirty flag of the working tree holding the code.

    Args:
        repo: any folder inside the work tree; default: the folder of this package.

    Returns:
        {"git_commit": 40-hex sha or "unknown", "git_dirty": bool, or None when unknown}.
        No git, no repository (an installed wheel) or a git error all give "unknown".
    """
    given = os.environ.get("HARNESS_GIT_COMMIT", "")
    if re.fullmatch(r"[0-9a-f]{40}", given):
        # A copy of a checkout sent elsewhere (the GPU machine) may carry a stale .git of its own:
        # the commit the caller names wins; whether the copy was dirty is not known there.
        return {"git_commit": given, "git_dirty": None}
    where = repo if repo is not None else Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], where)
    if commit is None or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return {"git_commit": UNKNOWN, "git_dirty": None}
    # Only tracked files count: run folders and reports are git-ignored, and an untracked scratch
    # file is not part of the code a result came from.
    status = _git(["status", "--porcelain", "--untracked-files=no"], where)
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def library_versions() -> dict[str, str]:
    """Versions of python and the libraries that decide the numbers; "absent" if not installed."""
    versions = {"python": platform.python_version()}
    for key, dist in _LIBRARIES.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = _module_version(key)
    return versions


def _module_version(module: str) -> str:
    # An uninstalled source checkout (PYTHONPATH) still has `__version__` on our own packages.
    mod = sys.modules.get(module)
    if mod is None and module == "harness":
        import harness as mod
    version = getattr(mod, "__version__", None)
    return str(version) if version else "absent"


def device_class(name: str) -> str:
    """The hardware class fps is comparable within: "NVIDIA H200" -> "H200", "cpu" -> "cpu".

    `detector.bench.measure.device_class` is the authority (it labels metrics.json); this uses it when the
    detector is importable so both sides agree, else the same rule in short form below.
    """
    try:
        from detector.api import device_class as detector_device_class
    except Exception:  # noqa: BLE001 - no torch / detector: fall back
        return _device_class(name)
    return str(detector_device_class(name))


def _device_class(name: str) -> str:
    """Fallback of `device_class` without the detector.

    Published fps were measured on V100 (reference section 2); an H200 or a CPU number is shown next
    to it but never compared (DESIGN.md, "What the numbers mean").

    Examples: "Tesla V100-SXM2-32GB" -> "V100", "NVIDIA A100-SXM4-80GB" -> "A100",
    "NVIDIA GeForce RTX 4090" -> "RTX 4090", "cpu" -> "cpu", "" -> "unknown".
    """
    text = name.strip()
    if not text:
        return UNKNOWN
    if text.lower().startswith("cpu"):
        return "cpu"
    text = re.sub(r"^(NVIDIA|Tesla|AMD|Quadro)\s+", "", text, flags=re.IGNORECASE)
    text = re.sub(r"^GeForce\s+", "", text, flags=re.IGNORECASE)
    # Drop form factor and memory size suffixes: "-SXM2-32GB", " PCIe", " 80GB HBM3".
    text = re.split(r"[-_]|\s+(?:PCIe|SXM\d*|NVL|\d+\s*GB)\b", text, maxsplit=1)[0]
    return text.strip() or UNKNOWN


def device_info(device: str) -> dict[str, str]:
    """Name and class of the device a run was asked to use, e.g. {"device": "NVIDIA H200", ...}.

    `detector.run` reports the device it really ran on in metrics.json; this is the fallback for a
    cell that never got that far (skipped, crashed at start-up).
    """
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                index = int(device.split(":", 1)[1]) if ":" in device else 0
                name = torch.cuda.get_device_name(index)
                return {"device": name, "device_class": device_class(name)}
        except Exception:  # noqa: BLE001 - provenance must never fail a run
            pass
        return {"device": device, "device_class": UNKNOWN}
    # "cpu", as detector.bench.measure names it, so results from both sources group together.
    return {"device": "cpu", "device_class": "cpu"}


def hostname() -> str:
    return platform.node() or UNKNOWN


def machine_info() -> dict[str, Any]:
    """What explains speed on this host: CPU model, logical cores, 1-minute load when the run began."""
    model = UNKNOWN
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        model = platform.processor() or UNKNOWN
    try:
        load: float | None = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"cpu": model, "cores": os.cpu_count(), "load_1m": load}


def base_provenance(*, include_host: bool = True, cells_at_once: int | None = None) -> dict[str, Any]:
    """What is the same for every cell of one `harness run`: git, versions, host and machine (with how
    many cells ran at once, which a cell's timings depend on)."""
    out: dict[str, Any] = dict(git_info())
    out["versions"] = library_versions()
    if include_host:
        out["hostname"] = hostname()
        out["machine"] = {**machine_info(), **({"cells_at_once": cells_at_once} if cells_at_once else {})}
    return out


def cell_provenance(
    base: dict[str, Any],
    *,
    metrics: dict[str, Any],
    run: dict[str, Any],
    nproc: int,
    started_at: str,
    finished_at: str,
    wall_time_s: float,
    start: str = "new process",
) -> dict[str, Any]:
    """The `provenance` block of one result.json (ARCHITECTURE.md).

    Args:
        base: `base_provenance()` of this runner.
        metrics: the cell's metrics.json (may be empty when the cell never produced one); its own
            device, world size and learning-rate facts win over what the runner asked for.
        run: the cell's `RunConfig.to_dict()` (device, seed, images_per_gpu).
        nproc: processes per cell the runner launched (the world size it asked for).
        start: how the cell's process began: "new process" or "fork server" (forked from a warm
            `detector.forkserver`: no start-up time, and on CPU a peak RSS without the ~0.3 GB of
            pages that only the imports touched).
    """
    device = metrics.get("device")
    if device:
        dev = {"device": str(device), "device_class": str(metrics.get("device_class") or device_class(str(device)))}
    else:
        dev = device_info(str(run.get("device", "cpu")))
    return {
        "git_commit": base.get("git_commit", UNKNOWN),
        "git_dirty": base.get("git_dirty"),
        "versions": dict(base.get("versions", {})),
        **({"hostname": base["hostname"]} if "hostname" in base else {}),
        **({"machine": {**base["machine"], "threads": metrics.get("threads")}} if "machine" in base else {}),
        "device": dev["device"],
        "device_class": dev["device_class"],
        "seed": run.get("seed"),
        "world_size": metrics.get("world_size", nproc),
        "images_per_gpu": metrics.get("images_per_gpu", run.get("images_per_gpu")),
        "lr_rescaled": metrics.get("lr_rescaled"),
        "resumed_from_iter": metrics.get("resumed_from_iter", 0),
        "started_at": started_at,
        "finished_at": finished_at,
        "wall_time_s": round(wall_time_s, 3),
        "start": start,
    }


__all__ = [
    "base_provenance",
    "machine_info",
    "cell_provenance",
    "device_class",
    "device_info",
    "git_info",
    "hostname",
    "library_versions",
    "now_iso",
]
