from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.execute.executors import (
    RDZV_ENDPOINT,
    CellCommand,
    LocalExecutor,
    cell_argv,
    run_pool,
)
from harness.execute.plan import make_executor
from harness.execute.slurm import SubmititExecutor
from tests.resources.processes import wait_handle as _wait


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has stopped running, which is what matters here.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_cell_argv_plain_and_torchrun(tmp_path: Path) -> None:
    assert cell_argv(tmp_path) == (sys.executable, "-m", "detector.run", str(tmp_path))
    assert cell_argv(tmp_path, nproc_per_cell=2) == (
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "detector.run", str(tmp_path),
    )  # fmt: skip
    with pytest.raises(UserError, match="nproc-per-cell"):
        cell_argv(tmp_path, nproc_per_cell=0)


def test_cell_argv_multi_node_is_one_torchrun_agent_per_node(tmp_path: Path) -> None:
    argv = cell_argv(tmp_path / "cell", nproc_per_cell=2, nnodes=3)
    assert argv[:9] == (sys.executable, "-m", "torch.distributed.run", "--nnodes", "3", "--nproc-per-node", "2",
                        "--rdzv-backend", "c10d")
    assert argv[9:11] == ("--rdzv-endpoint", RDZV_ENDPOINT) and argv[-3:] == ("-m", "detector.run", str(tmp_path / "cell"))
    rdzv_id = argv[argv.index("--rdzv-id") + 1]
    assert rdzv_id == cell_argv(tmp_path / "cell", nproc_per_cell=2, nnodes=3)[argv.index("--rdzv-id") + 1]  # same cell: same id
    assert rdzv_id != cell_argv(tmp_path / "other", nnodes=3)[argv.index("--rdzv-id") + 1]
    command = CellCommand(cell_dir=tmp_path, argv=argv, nnodes=3)
    assert "host0:29500" in command.node_argv("host0:29500") and RDZV_ENDPOINT not in command.node_argv("h:1")
    assert command.node_stdout(0) == command.stdout_path and command.node_stdout(2) == tmp_path / "stdout.node2.txt"
    with pytest.raises(UserError, match="nnodes"):
        cell_argv(tmp_path, nnodes=0)


def test_local_nodes_share_an_endpoint_and_a_failing_node_stops_the_others(tmp_path: Path) -> None:
    # Two "nodes" on this host: each prints the endpoint it was given; then one node fails at once
    # while the other would sleep: the cell fails with that code and the sleeper is stopped.
    script = "import sys; print(sys.argv[1])"
    argv = (sys.executable, "-c", script, RDZV_ENDPOINT)
    assert _wait(LocalExecutor().submit(CellCommand(cell_dir=tmp_path, argv=argv, nnodes=2))) == 0
    seen = {(tmp_path / name).read_text().strip() for name in ("stdout.txt", "stdout.node1.txt")}
    assert len(seen) == 1 and seen.pop().startswith("127.0.0.1:")
    # The node that creates `first` (O_EXCL: exactly one does) sleeps; the other fails with 3.
    code = ("import os, sys, time\n"
            "d = sys.argv[2]\n"
            "open(os.path.join(d, 'pid%d' % os.getpid()), 'w').close()\n"
            "try:\n    os.close(os.open(os.path.join(d, 'first'), os.O_CREAT | os.O_EXCL))\n"
            "except FileExistsError:\n    sys.exit(3)\n"
            "time.sleep(60)\n")
    failing = (sys.executable, "-c", code, RDZV_ENDPOINT, str(tmp_path))
    t0 = time.monotonic()
    handle = LocalExecutor(grace_s=1.0).submit(CellCommand(cell_dir=tmp_path, argv=failing, nnodes=2))
    assert _wait(handle) == 3 and time.monotonic() - t0 < 30
    pids = [int(p.name[3:]) for p in tmp_path.glob("pid*")]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)


def test_local_executor_runs_without_shell_and_captures_output(tmp_path: Path) -> None:
    # A shell would expand `$HOME` and `;`: the argument must arrive untouched.
    code = "import sys; print('out', sys.argv[1]); print('err', file=sys.stderr); sys.exit(3)"
    cmd = CellCommand(cell_dir=tmp_path / "cell", argv=(sys.executable, "-c", code, "$HOME;x"), env={"H3_MARK": "1"})
    assert _wait(LocalExecutor().submit(cmd)) == 3
    text = (tmp_path / "cell" / "stdout.txt").read_text()
    assert "out $HOME;x" in text and "err" in text


def test_local_cancel_stops_the_whole_process_tree(tmp_path: Path) -> None:
    # The cell starts a grandchild (as torchrun starts workers); cancel must stop both.
    code = (
        "import subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
        f"open({str(tmp_path / 'pids')!r}, 'w').write(f'{{p.pid}}');"
        "time.sleep(120)"
    )
    handle = LocalExecutor(grace_s=2.0).submit(CellCommand(cell_dir=tmp_path, argv=(sys.executable, "-c", code)))
    t0 = time.monotonic()
    while not (tmp_path / "pids").exists() or not (tmp_path / "pids").read_text():
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    grandchild = int((tmp_path / "pids").read_text())
    assert handle.poll() is None and _alive(grandchild)
    handle.cancel()
    assert handle.poll() is not None
    t0 = time.monotonic()
    while _alive(grandchild) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not _alive(grandchild)


class _FakeHandle:
    def __init__(self, log: list[str], name: str, polls: int, code: int) -> None:
        self.log, self.name, self.polls, self.code = log, name, polls, code
        self.cancelled = False

    def poll(self) -> int | None:
        self.polls -= 1
        return self.code if self.polls <= 0 else None

    def cancel(self) -> None:
        self.cancelled = True
        self.log.append(f"cancel {self.name}")


def test_run_pool_caps_in_flight_and_survives_failures() -> None:
    log: list[str] = []
    running: set[str] = set()
    peak = 0

    def start(name: str) -> _FakeHandle | None:
        nonlocal peak
        if name == "cached":
            return None
        running.add(name)
        peak = max(peak, len(running))
        log.append(f"start {name}")
        return _FakeHandle(log, name, polls=3, code=1 if name == "bad" else 0)

    def finish(name: str, code: int) -> None:
        running.discard(name)
        log.append(f"finish {name} {code}")

    run_pool(["a", "bad", "cached", "c", "d"], start=start, finish=finish, max_in_flight=2, poll_s=0.001)
    assert peak == 2
    assert sorted(x for x in log if x.startswith("finish")) == ["finish a 0", "finish bad 1", "finish c 0", "finish d 0"]
    with pytest.raises(UserError, match="--jobs"):
        run_pool([], start=start, finish=finish, max_in_flight=0)


def test_run_pool_cancels_running_items_on_interrupt() -> None:
    log: list[str] = []
    handles: list[_FakeHandle] = []
    polls = 0

    class Interrupting(_FakeHandle):
        def poll(self) -> int | None:
            nonlocal polls
            polls += 1
            if polls == 5:  # Ctrl-C arrives while the pool waits on its cells
                raise KeyboardInterrupt
            return None

    def start(name: str) -> _FakeHandle:
        handles.append(Interrupting(log, name, polls=0, code=0))
        return handles[-1]

    def finish(name: str, code: int) -> None:
        raise AssertionError("nothing finished")

    with pytest.raises(KeyboardInterrupt):
        run_pool(["a", "b", "c"], start=start, finish=finish, max_in_flight=2, poll_s=0.001)
    assert [h.name for h in handles] == ["a", "b"] and all(h.cancelled for h in handles)


def test_make_executor_names() -> None:
    assert isinstance(make_executor("local", folder=Path(".")), LocalExecutor)
    sub = make_executor("submitit", folder=Path("x"), nproc_per_cell=2, device="cuda", cluster="local")
    assert isinstance(sub, SubmititExecutor) and sub.gpus_per_node == 2 and sub.timeout_min >= 60
    assert make_executor("submitit", folder=Path("x"), nproc_per_cell=2, device="cpu").gpus_per_node == 0  # type: ignore[attr-defined]
    with pytest.raises(UserError, match="allowed: local, submitit"):
        make_executor("ray", folder=Path("."))
