"""JSON files on disk: read with the file named in every error, write atomically.

Both packages write JSON beside a running cell (`metrics.json` here, `result.json` in the harness)
that another process may read at any moment, so every write goes through `write_json_atomic`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from detector.errors import DataError


def read_json(path: Path, what: str) -> Any:
    """Load a JSON file; a missing, unreadable, truncated or invalid file is a `DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} {path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None


def write_json_atomic(path: Path, obj: Any, *, indent: int | None = None, allow_nan: bool = True) -> None:
    """Write JSON to a temporary file in the target folder, then rename it into place: a reader, a
    crash or a full disk never leaves a half-written file under the target's name.

    `indent`: indented with a final newline (files people read), else compact. `allow_nan`: a
    non-finite number is written as JSON's `NaN` (a diverged loss in metrics.json); False refuses it
    (strict JSON for the harness's own files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if indent is not None:
                json.dump(obj, fh, indent=indent, allow_nan=allow_nan)
                fh.write("\n")
            else:
                fh.write(json.dumps(obj, separators=(",", ":"), allow_nan=allow_nan))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
