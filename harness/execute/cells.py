"""Cell folders, the ledger of finished cells, locks and atomic writes (running cells: `harness.execute.runner`).

Layout (ARCHITECTURE.md, "Cell folder"):

    <runs>/<matrix>/<profile>/<cell>/            seed 0
    <runs>/<matrix>/<profile>/<cell>/seed-<s>/   any other seed s
        spec.json log.jsonl metrics.json result.json checkpoints/ stdout.txt .lock

Ledger: a cell's `result.json` records `config_hash`, the sha256 of the canonical JSON of its
`spec.json`. A cell whose result is `ok` or `skipped` under the same hash is finished and is not run
again (a `skipped` one runs as soon as the detector can build it); a `failed` cell, an interrupted
one (no result.json) or a changed one (other hash) runs again; `--force` runs any of them again.
A failed or interrupted cell resumes from its checkpoints; a changed or `--force`d one first moves
its old outputs to `<cell>/_previous/` so that `detector.run` cannot resume a different config.

Locks: `fcntl.flock` on `<cell>/.lock`, held by the runner from preparing a cell until its
result.json is written (and inherited by the local cell process, so a cell that outlives a killed
runner still holds its folder). A second runner on the same runs folder skips cells held by the
first, and at the end waits for them and takes their results as they are: two runners never write
the same cell. All JSON is written to a temporary file and `os.replace`d, so a reader (or a Ctrl-C)
never sees half a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from detector.api import write_json_atomic as _write_json_atomic
from harness.errors import UserError
from harness.matrix import naming

SPEC, METRICS, RESULT, LOG = "spec.json", "metrics.json", "result.json", "log.jsonl"
STDOUT, LOCK = "stdout.txt", ".lock"
PREVIOUS = "_previous"
FINISHED = ("ok", "skipped")
# Outputs of one attempt; moved aside when the config changed or a re-run is forced.
_OUTPUTS = (SPEC, METRICS, RESULT, LOG, STDOUT, "checkpoints")
_TAIL_LINES = 15


def check_name(kind: str, name: str) -> str:
    """A matrix, profile or cell name that is safe as one path component; UserError otherwise."""
    if not naming.is_safe_name(name):  # the matrix's rule for cell and profile names, written once
        raise UserError(f"{kind} name {name!r} cannot be a folder name; allowed: letters, digits, '.', '_', '-'")
    return name


def profile_dir(runs_dir: Path, matrix: str, profile: str) -> Path:
    return Path(runs_dir) / check_name("matrix", matrix) / check_name("profile", profile)


def cell_dir(runs_dir: Path, matrix: str, profile: str, cell: str, seed: int) -> Path:
    """`<runs>/<matrix>/<profile>/<cell>/` for seed 0, `.../<cell>/seed-<s>/` for any other seed."""
    base = profile_dir(runs_dir, matrix, profile) / check_name("cell", cell)
    if seed < 0:
        raise UserError(f"--seed: must be >= 0, got {seed}")
    return base if seed == 0 else base / f"seed-{seed}"


def write_json_atomic(path: Path, obj: Any) -> None:
    """`result.json`, `spec.json` and the other files of a cell folder: strict, indented, atomic."""
    _write_json_atomic(path, obj, indent=2, allow_nan=False)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None if it is missing or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def iter_results(runs_dir: Path, matrix: str, profile: str) -> Iterator[dict[str, Any]]:
    """Every result.json of a (matrix, profile), parsed, in cell-name then seed order."""
    root = profile_dir(runs_dir, matrix, profile)
    if not root.is_dir():
        return
    for cell in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        seeds = sorted((p for p in cell.glob("seed-*") if p.is_dir()), key=lambda p: _seed_of(p.name))
        for folder in (cell, *seeds):
            path = folder / RESULT
            if not path.exists():
                continue
            result = read_json(path)
            if result is None:
                warnings.warn(f"{path}: not a JSON object; ignored", stacklevel=2)
                continue
            yield result


def _seed_of(name: str) -> int:
    try:
        return int(name.split("-", 1)[1])
    except (IndexError, ValueError):
        return 1 << 30


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def config_hash(spec: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a spec: key order and whitespace do not matter."""
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()


def tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The last `lines` lines of a text file ("" if missing), for a crashed cell's error."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class CellLock:
    """An exclusive `flock` on `<cell_dir>/.lock`; released on `release()` or process exit."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK
        self.fd: int | None = None

    def acquire(self, *, blocking: bool = False) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        # Who holds it, for the runner that finds it busy (the file's content is only a label; the
        # flock is the lock).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node() or 'unknown host'}\n".encode(), 0)
        return True

    def holder(self) -> str:
        """"pid N on HOST" of the runner holding the lock, or "" when unknown."""
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def finished_result(folder: Path, chash: str) -> dict[str, Any] | None:
    """The cell's result.json if it is finished (ok / skipped) under this config hash, else None."""
    result = read_json(folder / RESULT)
    if result and result.get("config_hash") == chash and result.get("status") in FINISHED:
        return result
    return None


def archive_outputs(folder: Path) -> None:
    """Move the previous attempt's outputs to `<cell>/_previous/` (replacing an older archive)."""
    present = [name for name in _OUTPUTS if (folder / name).exists()]
    if not present:
        return
    archive = folder / PREVIOUS
    shutil.rmtree(archive, ignore_errors=True)
    archive.mkdir()
    for name in present:
        os.replace(folder / name, archive / name)
