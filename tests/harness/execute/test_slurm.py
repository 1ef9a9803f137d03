"""harness.execute.slurm: submitit jobs (its local executor here; `nox -s slurm` runs a real Slurm)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from harness.execute.executors import RDZV_ENDPOINT, CellCommand
from harness.execute.slurm import SubmititCell, SubmititExecutor
from tests.resources.processes import wait_handle as _wait


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
