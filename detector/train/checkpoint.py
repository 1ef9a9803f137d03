"""Training checkpoints: atomic save, keep-last-N, and an exact resume.

Layout (ARCHITECTURE.md "Cell folder")::

    CELL_DIR/checkpoints/iter_<n>.pt   # the last `keep` (2) checkpoints
    CELL_DIR/checkpoints/latest.pt     # the newest one (a hard link to iter_<n>.pt, or a copy)

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
`torch.load(..., weights_only=True)`: no pickled Python objects. That is why the RNG states are
converted here (numpy's Mersenne-Twister key becomes an int64 tensor, Python's a list of ints).

Exact resume needs everything that decides the rest of the run: model and optimizer tensors, the
AMP loss scaler, the iteration / epoch / position inside the epoch (the sampler position), and the
RNG states of torch (CPU and CUDA), numpy, Python and the data generator. Published-weight import
(ImageNet backbones, MMDetection `.pth`) is `detector.model.weights`, not this module.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest.pt"
_ITER_RE = re.compile(r"^iter_(\d+)\.pt$")


# --------------------------------------------------------------------------------------------------
# RNG states as weights_only-loadable values
# --------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The process's torch (CPU + current CUDA device), numpy and Python RNG states.

    Only the current CUDA device's state is kept: under torchrun each rank owns one device, and
    asking every device would create a CUDA context on each of them from every rank.
    """
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": [int(x) for x in py_state], "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (the CUDA state onto the current device)."""
    torch.set_rng_state(state["torch"])
    if isinstance(state.get("cuda"), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------
def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write `obj` to a temporary file in the same folder, fsync it, then rename over `path`.

    A process killed mid-write (SIGKILL, preemption) leaves at most a stale `*.tmp.<pid>` file,
    never a truncated checkpoint under the real name.
    """
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Point `dst` at `src` atomically: a hard link when the file system allows it, else a copy."""
    tmp = dst.with_name(f".{dst.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def checkpoint_iters(ckpt_dir: Path) -> list[int]:
    """Iterations of the `iter_<n>.pt` files in `ckpt_dir`, ascending."""
    if not ckpt_dir.is_dir():
        return []
    found = (_ITER_RE.match(p.name) for p in ckpt_dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any], *, iteration: int, keep: int = 2) -> Path:
    """Save `state` as `iter_<iteration>.pt` and `latest.pt`; delete all but the newest `keep`.

    Args:
        ckpt_dir: the `CELL_DIR/checkpoints` folder (created if missing).
        state: a weights_only-compatible dict (see `training_state`).
        iteration: completed iterations, used in the file name.
        keep: how many `iter_<n>.pt` files to keep (>= 1).

    Returns:
        The path of `iter_<iteration>.pt`.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"iter_{iteration}.pt"
    _atomic_torch_save(state, path)
    _link_or_copy(path, ckpt_dir / LATEST)
    for old in checkpoint_iters(ckpt_dir)[: -max(keep, 1)]:
        (ckpt_dir / f"iter_{old}.pt").unlink(missing_ok=True)
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """`latest.pt` if it exists; stale temporary files from a killed writer are removed."""
    if not ckpt_dir.is_dir():
        return None
    for stale in ckpt_dir.glob(".*.tmp.*"):
        stale.unlink(missing_ok=True)
    path = ckpt_dir / LATEST
    return path if path.is_file() else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint on the CPU with `weights_only=True` (no arbitrary unpickling)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
        raise ValueError(f"{path}: not a training checkpoint written by detector.train.checkpoint")
    return state


def resume_checkpoint(ckpt_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The newest training checkpoint of `ckpt_dir` that can be read, and a note when it is not `latest.pt`.

    Writes are atomic, but a file can still be damaged after the fact (a copy cut short, a bad disk):
    then the run resumes from the newest `iter_<n>.pt` that reads, records why, and never deletes the
    damaged file. None when there is no checkpoint (a fresh start); `ValueError` naming every file
    when there are checkpoints and none reads (silently starting over would discard the training done).
    """
    latest = latest_checkpoint(ckpt_dir)
    candidates = ([latest] if latest is not None else []) + [ckpt_dir / f"iter_{n}.pt" for n in reversed(checkpoint_iters(ckpt_dir))]
    failures: list[str] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except Exception as exc:  # any damage: a truncated zip, a bad pickle, a foreign dict
            failures.append(f"{path.name}: {_first_line(exc)}")
            continue
        note = f"resumed from {path.name} (iteration {state['iteration']}): {'; '.join(failures)}" if failures else None
        return state, note
    if failures:
        raise ValueError(f"{ckpt_dir}: no training checkpoint can be read ({'; '.join(failures)}); move the folder "
                         "away to train this cell from the start")
    return None, None


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}"[:200]


def training_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any | None,
    iteration: int,
    epoch: int,
    iter_in_epoch: int,
    rng: list[dict[str, Any]],
    data: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict `save_checkpoint` writes.

    Args:
        model: the bare model (not the DDP wrapper, so keys carry no `module.` prefix).
        optimizer, scaler: their `state_dict()`s are stored (`scaler` may be None).
        iteration: completed iterations; `epoch` / `iter_in_epoch`: the position of the next batch
            (the sampler position) in real passes over the data.
        rng: one `rng_state()` per rank, rank order, so each rank resumes its own stream.
        data: the batch source's state (e.g. its generator).
        extra: loop bookkeeping (first loss, log window, elapsed time).
    """
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": int(iteration),
        "epoch": int(epoch),
        "iter_in_epoch": int(iter_in_epoch),
        "rng": rng,
        "data": data or {},
        "extra": extra or {},
    }


__all__ = [
    "LATEST",
    "checkpoint_iters",
    "latest_checkpoint",
    "load_checkpoint",
    "resume_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "training_state",
]
