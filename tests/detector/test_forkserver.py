"""`python -m detector.forkserver FD`: its protocol as the harness would speak it (the harness's end,
forking real cells, is tested in tests/harness/execute/test_forked.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from detector import forkserver

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server: Linux only")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert forkserver.main([]) == 2 and forkserver.main(["not-a-number"]) == 2
    assert "usage: python -m detector.forkserver FD" in capsys.readouterr().err


def test_the_server_refuses_bad_requests_and_exits_when_the_harness_closes(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-m", "detector.forkserver", str(theirs.fileno())], pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        ours.settimeout(120)
        ready = json.loads(ours.recv(1 << 16))
        assert ready == {"ready": True, "pid": proc.pid}
        out = os.open(tmp_path / "out.txt", os.O_WRONLY | os.O_CREAT)
        try:
            # A module name that is not one (it would reach runpy), and a request without its output file.
            socket.send_fds(ours, [json.dumps({"id": 1, "module": "os; rm", "args": []}).encode()], [out])
            assert json.loads(ours.recv(1 << 16)) == {"id": 1, "error": "bad request: module 'os; rm', 1 fds"}
            ours.send(json.dumps({"id": 2, "module": "json.tool", "args": []}).encode())
            assert json.loads(ours.recv(1 << 16)) == {"id": 2, "error": "bad request: module 'json.tool', 0 fds"}
            # A good one: json.tool reading /dev/null fails with its own message and exit code 1.
            socket.send_fds(ours, [json.dumps({"id": 3, "module": "json.tool", "args": []}).encode()], [out])
            started = json.loads(ours.recv(1 << 16))
            assert started["id"] == 3 and started["pid"] > 0
            assert json.loads(ours.recv(1 << 16)) == {"id": 3, "exit": 1}
        finally:
            os.close(out)
        assert "Expecting value" in (tmp_path / "out.txt").read_text()
    finally:
        ours.close()
        assert proc.wait(timeout=30) == 0
