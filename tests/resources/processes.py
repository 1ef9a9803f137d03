"""Helpers for tests that start real processes through the executors."""

from __future__ import annotations

import time
from typing import Any


def wait_handle(handle: Any, timeout: float = 60.0) -> int:
    """Poll an executor handle until its cell exits; its exit code (fails the test after `timeout`)."""
    t0 = time.monotonic()
    while (code := handle.poll()) is None:
        assert time.monotonic() - t0 < timeout, "cell process did not finish"
        time.sleep(0.05)
    return int(code)
