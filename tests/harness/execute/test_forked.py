"""Cells forked from `detector.forkserver` (harness.execute.forked, LocalExecutor's fork path).

The cells here are small modules on PYTHONPATH (`fork_modules` names them), so each test shows one
property of the child: exit codes as `Popen.returncode`, output, session, lock, cancel, the fallbacks.
The whole-cell equality of a forked and a plain `detector.run` is in tests/harness/test_cli.py.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.execute.executors import CellCommand, LocalExecutor, LocalHandle
from harness.execute.forked import ForkedHandle
from tests.resources.processes import wait_handle as _wait

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server: Linux only")

CELL = '''
import os, subprocess, sys, time
mode = sys.argv[1]
print("argv", sys.argv[1:], "file", os.path.basename(sys.argv[0]), "main", __name__, flush=True)
print("session", os.getsid(0) == os.getpid(), "stdin", sys.stdin.read() == "", flush=True)
print("to stderr", file=sys.stderr, flush=True)
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "message":
    sys.exit("a message")
if mode == "raise":
    raise ValueError("bad cell")
if mode == "sleep":  # with a grandchild, as torchrun or data workers would be
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[2], "w").write(f"{os.getpid()} {p.pid}")
    time.sleep(120)
if mode == "wait":  # until the file sys.argv[2] exists
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
'''


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("modules")
    (folder / "fake_cell.py").write_text(CELL)
    return folder


@pytest.fixture(scope="module")
def executor(cells: Path) -> Iterator[LocalExecutor]:
    notes: list[str] = []
    ex = LocalExecutor(grace_s=2.0, fork=True, fork_modules=("fake_cell",), note=notes.append)
    yield ex
    ex.close()
    assert notes == []


def _env(cells: Path) -> dict[str, str]:
    # pytest sets PYTEST_CURRENT_TEST anew for every test; one value keeps the module's server usable.
    return {"PYTHONPATH": str(cells), "PYTEST_CURRENT_TEST": "test_forked"}


def _command(cells: Path, folder: Path, *args: str) -> CellCommand:
    return CellCommand(cell_dir=folder, argv=(sys.executable, "-m", "fake_cell", *args), env=_env(cells))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _sleeping(pids: Path) -> tuple[int, int]:
    """The pids a "sleep" cell writes once it and its grandchild run."""
    t0 = time.monotonic()
    while not pids.exists() or not pids.read_text():
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    child, grandchild = map(int, pids.read_text().split())
    return child, grandchild


def test_exit_codes_and_output_are_those_of_a_new_process(executor: LocalExecutor, cells: Path, tmp_path: Path) -> None:
    expected = {("exit", "0"): 0, ("exit", "3"): 3, ("exit", "75"): 75, ("message",): 1, ("raise",): 1}
    for args, code in expected.items():
        folder = tmp_path / "-".join(args)
        for _attempt in range(2):  # appended: a resumed cell keeps its earlier output
            command = _command(cells, folder, *args)
            handle = executor.submit(command)
            assert isinstance(handle, ForkedHandle) and handle.start == "fork server"
            assert _wait(handle) == code, args
        text = command.stdout_path.read_text()
        assert text.count(f"argv {list(args)!r} file fake_cell.py main __main__") == 2, text
        assert text.count("session True stdin True") == 2 and text.count("to stderr") == 2
        if args == ("message",):
            assert "a message" in text
        if args == ("raise",):
            assert "Traceback" in text and "ValueError: bad cell" in text


def test_the_child_holds_the_cells_lock_after_the_harness_lets_go(executor: LocalExecutor, cells: Path, tmp_path: Path) -> None:
    """A cell that outlives its harness keeps its folder locked (flock belongs to the open file)."""
    lock_path, go = tmp_path / ".lock", tmp_path / "go"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle = executor.submit(_command(cells, tmp_path / "cell", "wait", str(go)), keep_fds=(fd,))
    os.close(fd)  # the harness's copy; the child's keeps the lock
    other = os.open(lock_path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        go.touch()
        assert _wait(handle) == 0
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the cell has exited
    finally:
        os.close(other)


def test_cancel_stops_the_forked_cell_and_its_children(executor: LocalExecutor, cells: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    handle = executor.submit(_command(cells, tmp_path / "cell", "sleep", str(pids)))
    child, grandchild = _sleeping(pids)
    assert handle.poll() is None and _alive(child) and _alive(grandchild)
    handle.cancel()
    assert handle.poll() == -signal.SIGTERM
    t0 = time.monotonic()
    while _alive(grandchild) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_a_different_environment_or_the_switch_starts_a_new_process(
        executor: LocalExecutor, cells: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    first = executor.submit(_command(cells, tmp_path / "first", "exit", "0"))  # the server runs with this environment
    assert isinstance(first, ForkedHandle) and _wait(first) == 0
    # An environment variable the server's imports may have read (OMP_NUM_THREADS) must be the same.
    other = CellCommand(cell_dir=tmp_path / "a", argv=(sys.executable, "-m", "fake_cell", "exit", "4"),
                        env={**_env(cells), "OMP_NUM_THREADS": "7"})  # fmt: skip
    handle = executor.submit(other)
    assert isinstance(handle, LocalHandle) and _wait(handle) == 4
    not_listed = CellCommand(cell_dir=tmp_path / "b", argv=(sys.executable, "-c", "import sys; sys.exit(5)"))
    assert isinstance(executor.submit(not_listed), LocalHandle)
    monkeypatch.setenv("HARNESS_FORK_SERVER", "0")
    plain = LocalExecutor(fork_modules=("fake_cell",))
    handle = plain.submit(_command(cells, tmp_path / "c", "exit", "6"))
    assert isinstance(handle, LocalHandle) and _wait(handle) == 6
    assert plain._server is None


def test_a_server_that_cannot_start_leaves_cells_to_new_processes(cells: Path, tmp_path: Path) -> None:
    notes: list[str] = []
    # An interpreter whose fork server fails at start (as a broken install would) but runs cells.
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nif [ \"$2\" = detector.forkserver ]; then echo 'no detector here' >&2; exit 1; fi\n"
                      f"exec {sys.executable} \"$@\"\n")  # fmt: skip
    python.chmod(0o755)
    ex = LocalExecutor(fork_modules=("fake_cell",), note=notes.append)
    command = CellCommand(cell_dir=tmp_path / "cell", argv=(str(python), "-m", "fake_cell", "exit", "0"), env=_env(cells))
    handle = ex.submit(command)
    assert isinstance(handle, LocalHandle) and _wait(handle) == 0
    assert len(notes) == 1 and "cannot start the fork server" in notes[0] and "no detector here" in notes[0], notes
    assert "code 1" in notes[0] and "cells start as new processes" in notes[0]
    assert isinstance(ex.submit(command), LocalHandle) and len(notes) == 1  # said once
    ex.close()


def test_a_dead_server_fails_its_cells_with_a_reason_and_forking_stops(cells: Path, tmp_path: Path) -> None:
    notes: list[str] = []
    ex = LocalExecutor(grace_s=2.0, fork_modules=("fake_cell",), note=notes.append)
    pids = tmp_path / "pids"
    handle = ex.submit(_command(cells, tmp_path / "cell", "sleep", str(pids)))
    child, _grandchild = _sleeping(pids)
    assert ex._server is not None
    ex._server.proc.kill()
    assert _wait(handle, timeout=30) == 1
    assert isinstance(handle, ForkedHandle) and handle.error and "fork server exited" in handle.error
    t0 = time.monotonic()
    while _alive(child) and time.monotonic() - t0 < 10:  # PR_SET_PDEATHSIG: SIGTERM when the server died
        time.sleep(0.05)
    assert not _alive(child)
    after = ex.submit(_command(cells, tmp_path / "next", "exit", "0"))
    assert isinstance(after, LocalHandle) and _wait(after) == 0
    assert len(notes) == 1 and "fork server" in notes[0], notes
    ex.close()


def test_closing_the_executor_ends_the_server(cells: Path, tmp_path: Path) -> None:
    ex = LocalExecutor(fork_modules=("fake_cell",))
    assert _wait(ex.submit(_command(cells, tmp_path / "cell", "exit", "0"))) == 0
    server = ex._server
    assert server is not None and server.proc.poll() is None
    ex.close()
    assert server.proc.returncode == 0 and ex._server is None
