"""Cells forked from one warm process: the harness's end of `python -m detector.forkserver`.

A local single-process cell is `python -m detector.run CELL_DIR`; started as a new interpreter it
spends 4-6 s importing torch, torchvision and the detector. `ForkServer` starts one
`detector.forkserver` per run, which imports them once and forks a child per cell (the protocol and
why forking there is safe: that module's docstring). The harness itself never imports torch: it
talks to the server over a socket pair and passes each cell's output file and lock as descriptors.

The child is the same process a plain start gives, with the same environment: `LocalExecutor`
forks only a cell whose interpreter and whole environment equal the server's and starts any other
cell as before (`HARNESS_FORK_SERVER=0` turns forking off). A server that cannot start leaves every
cell to the plain start, with one line saying why.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MODULE = "detector.forkserver"
# The server's imports take 4-6 s on a 2-core machine; a slow shared disk can take much longer.
START_TIMEOUT_S = 300.0
MAX_MESSAGE = 1 << 16


class ForkServerError(RuntimeError):
    """The fork server could not start or stopped answering."""


class ForkServer:
    """One running `detector.forkserver`, started with `python` and `env`; `start` forks a cell."""

    def __init__(self, *, python: str, env: Mapping[str, str], preexec_fn: Any = None,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:  # fmt: skip
        self.python, self.env = python, dict(env)
        self.exits: dict[int, int] = {}
        self.pids: dict[int, int] = {}
        self.errors: dict[int, str] = {}  # request id -> why it has no child or no exit code
        self.failure: str | None = None  # why the server stopped answering, once it has
        self._next_id = 0
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The server's own output (warnings, a failed import) only matters when it fails to start.
        self._log = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                [python, "-m", MODULE, str(theirs.fileno())], pass_fds=(theirs.fileno(),), env=self.env,
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=preexec_fn,
            )  # fmt: skip
        finally:
            theirs.close()
        try:
            ready = self._receive(timeout=start_timeout_s)
        except ForkServerError:
            self.close()
            raise
        if not ready.get("ready"):
            self.close()
            raise ForkServerError(f"unexpected first message {ready!r}")

    def start(self, *, module: str, args: Sequence[str], stdout: Path, keep_fds: Sequence[int] = ()) -> int:
        """Fork a child running `python -m module *args` with `stdout` (appended) as stdout and
        stderr and `keep_fds` held open; returns the request id once the child exists."""
        ident = self._next_id
        self._next_id += 1
        message = json.dumps({"id": ident, "module": module, "args": list(args)}).encode()
        with open(stdout, "ab") as out:
            try:
                socket.send_fds(self.sock, [message], [out.fileno(), *keep_fds])
            except OSError as exc:
                raise ForkServerError(f"cannot reach the fork server: {exc}") from exc
        while ident not in self.pids:
            if ident in self.errors:
                raise ForkServerError(self.errors.pop(ident))
            self._dispatch(self._receive(timeout=START_TIMEOUT_S))
        return ident

    def exit_code(self, ident: int, *, timeout: float = 0.0) -> int | None:
        """The child's exit code (negative: killed by that signal), or None while it runs."""
        deadline = time.monotonic() + timeout
        while ident not in self.exits:
            if self.failure is not None:
                # The server is gone, and with it the child's status (its PR_SET_PDEATHSIG stopped it).
                self.errors[ident] = self.failure
                self.exits[ident] = 1
                break
            try:
                message = self._receive(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return None
            except ForkServerError as exc:
                self.failure = str(exc)
                continue
            self._dispatch(message)
        return self.exits[ident]

    def _dispatch(self, message: dict[str, Any]) -> None:
        ident = int(message["id"])
        if "pid" in message:
            self.pids[ident] = int(message["pid"])
        elif "exit" in message:
            self.exits[ident] = int(message["exit"])
        else:
            self.errors[ident] = str(message.get("error"))

    def _receive(self, *, timeout: float) -> dict[str, Any]:
        """The next message; TimeoutError after `timeout` s; ForkServerError if the server is gone."""
        self.sock.settimeout(timeout if timeout > 0 else 0.0)
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except (BlockingIOError, TimeoutError):
            if self.proc.poll() is None:
                raise TimeoutError from None
            data = b""
        except OSError as exc:
            raise ForkServerError(f"fork server connection: {exc}") from exc
        if not data:
            self.proc.wait()
            raise ForkServerError(f"the fork server exited with code {self.proc.returncode}: {self._log_tail()}")
        message: dict[str, Any] = json.loads(data)
        return message

    def _log_tail(self, lines: int = 3) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "no output"

    def close(self) -> None:
        """Let the server exit (it does when its socket closes) and wait for it."""
        self.failure = self.failure or "the fork server was closed"
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class ForkedHandle:
    """A cell forked by the server: `poll` as `Popen.poll`; `cancel` stops its process group
    (SIGTERM, then SIGKILL after `grace_s`) as `executors.stop_tree` does for a plain start."""

    start = "fork server"  # result.json provenance "start"

    def __init__(self, server: ForkServer, ident: int, grace_s: float) -> None:
        self.server, self.ident, self.grace_s = server, ident, grace_s
        self.pid = server.pids[ident]

    @property
    def error(self) -> str | None:
        """Why the cell has no exit code of its own (the runner adds it to the cell's error)."""
        return self.server.errors.get(self.ident)

    def poll(self) -> int | None:
        return self.server.exit_code(self.ident)

    def cancel(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 5.0)):
            if self.poll() is not None:
                return
            try:
                os.killpg(self.pid, sig)  # the child called setsid: its pid is its group
            except (ProcessLookupError, PermissionError):
                return
            if self.server.exit_code(self.ident, timeout=wait_s) is not None:
                return


__all__ = ["ForkServer", "ForkServerError", "ForkedHandle", "MODULE"]
