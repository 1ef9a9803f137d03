from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.execute import executors
from harness.execute.executors import (
    RDZV_ENDPOINT,
    CellCommand,
    LocalExecutor,
    SubmititCell,
    SubmititExecutor,
    cell_argv,
    make_executor,
    resolve_jobs,
    run_pool,
    thread_env,
    usable_cores,
)


def _wait(handle, timeout: float = 60.0) -> int:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while (code := handle.poll()) is None:
        assert time.monotonic() - t0 < timeout, "cell process did not finish"
        time.sleep(0.05)
    return int(code)


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


def test_thread_env_splits_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(executors, "usable_cores", lambda: 16)
    assert thread_env(jobs=1, nproc_per_cell=1) == {}
    assert thread_env(jobs=2, nproc_per_cell=2) == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert thread_env(jobs=32, nproc_per_cell=1)["OMP_NUM_THREADS"] == "1"
    assert thread_env(jobs=1, nproc_per_cell=2, nodes_here=2)["OMP_NUM_THREADS"] == "4"  # local --nnodes 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_env(jobs=2, nproc_per_cell=1) == {}


def test_usable_cores_follow_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == affinity  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == affinity  # no quota
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cores(tmp_path) == 1  # half a core still runs one thread
    (tmp_path / "cpu.max").write_text(f"{100000 * (affinity + 8)} 100000\n")
    assert usable_cores(tmp_path) == affinity  # a quota above the mask does not add cores
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1, one core
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(tmp_path) == affinity


def test_resolve_jobs_auto_is_one_cell_per_core_on_local_cpu_only() -> None:
    auto = {"device": "cpu", "executor": "local", "nproc_per_cell": 1, "cells": 30, "cores": 2, "available_gib": 20.0}
    assert resolve_jobs("auto", **auto) == 2
    assert resolve_jobs("auto", **{**auto, "cores": 16}) == 6  # 20 GiB / 3 GiB per cell
    assert resolve_jobs("auto", **{**auto, "cores": 16, "available_gib": 100.0}) == 16
    assert resolve_jobs("auto", **{**auto, "cores": 16, "nproc_per_cell": 4, "available_gib": 100.0}) == 4
    assert resolve_jobs("auto", **{**auto, "cells": 1}) == 1
    assert resolve_jobs("auto", **{**auto, "available_gib": 1.0}) == 1
    assert resolve_jobs("auto", **{**auto, "device": "cuda"}) == 1  # cells would share the GPU they time
    assert resolve_jobs("auto", **{**auto, "executor": "submitit"}) == 1
    assert resolve_jobs(3, **{**auto, "device": "cuda"}) == 3  # a number is what it says


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


def test_submitit_local_executor_runs_cells_for_real(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    executor = SubmititExecutor(folder=tmp_path / "_submitit", cluster="local", timeout_min=5)
    ok = CellCommand(cell_dir=tmp_path / "ok", argv=(sys.executable, "-c", "import os; print('in job', os.environ['H3'])"), env={"H3": "yes"})
    bad = CellCommand(cell_dir=tmp_path / "bad", argv=(sys.executable, "-c", "raise SystemExit(5)"))
    handles = [executor.submit(ok), executor.submit(bad)]
    assert [_wait(h, timeout=120) for h in handles] == [0, 5]
    assert "in job yes" in (tmp_path / "ok" / "stdout.txt").read_text()
    # submitit kept its own job logs under the folder we gave it.
    assert any((tmp_path / "_submitit").iterdir())


def test_submitit_task_runs_its_nodes_agent_against_the_first_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Under Slurm a multi-node cell is one job with one task per node; each task runs that node's
    # torchrun agent, all pointed at the job's first node (submitit.JobEnvironment says which).
    submitit = pytest.importorskip("submitit")

    class Env:
        job_id, node, hostnames = "4242", 1, ["gpu-a", "gpu-b"]

    monkeypatch.setattr(submitit, "JobEnvironment", Env)
    argv = (sys.executable, "-c", "import sys; print(sys.argv[1])", RDZV_ENDPOINT)
    assert SubmititCell(CellCommand(cell_dir=tmp_path, argv=argv, nnodes=2))() == 0
    printed = (tmp_path / "stdout.node1.txt").read_text().strip()
    host, port = printed.split(":")
    assert host == "gpu-a" and 29400 <= int(port) < 49400 and not (tmp_path / "stdout.txt").exists()


def test_submitit_checkpoint_asks_the_cell_to_stop_then_resubmits_the_same_command(tmp_path: Path) -> None:
    # submitit's preemption protocol without Slurm: checkpoint() is called while __call__ waits on the
    # cell; the cell sees the stop file, "saves" and exits 75; what comes back resubmits the same command.
    submitit = pytest.importorskip("submitit")
    import pickle
    import threading

    code = ("import os, sys, time\n"
            "d = sys.argv[1]\n"
            "open(os.path.join(d, 'ready'), 'w').close()\n"
            "while not os.path.exists(os.path.join(d, 'STOP')):\n    time.sleep(0.01)\n"
            "open(os.path.join(d, 'saved'), 'w').close()\n"
            "sys.exit(75)\n")
    cell = SubmititCell(CellCommand(cell_dir=tmp_path, argv=(sys.executable, "-c", code, str(tmp_path))))
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(cell()))
    thread.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    again = cell.checkpoint()
    thread.join(timeout=30)
    assert result == [75] and (tmp_path / "saved").exists()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    resubmitted = pickle.loads(pickle.dumps(again.function))  # what the requeued job unpickles
    assert isinstance(resubmitted, SubmititCell) and resubmitted.command == cell.command and resubmitted._proc is None
