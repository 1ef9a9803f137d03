"""Cell folders, ledger, locks, atomic writes and `run_jobs`, with a stand-in for detector.run.

The stand-in (`FAKE_CELL`) reads spec.json like detector.run and, as told by `spec["run"]["mode"]`,
writes an ok metrics.json, crashes, or reports a non-finite loss (exit 3). Every start appends a line
to `<cell>/starts.txt`, so a test can count how often a cell really ran.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from harness.errors import UserError
from harness.execute import cells as runs
from harness.execute import runner
from harness.execute.executors import LocalExecutor

FAKE_CELL = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    d = Path(sys.argv[1])
    run = json.loads((d / "spec.json").read_text())["run"]
    with open(d / "starts.txt", "a") as f:
        f.write(f"{os.getpid()}\\n")
    print("fake detector.run in", d, flush=True)
    time.sleep(float(run.get("sleep", 0)))
    mode = run.get("mode", "ok")
    if mode == "crash":
        print("Traceback (most recent call last):\\nRuntimeError: CUDA out of memory", flush=True)
        sys.exit(1)
    if mode == "nan":
        (d / "metrics.json").write_text(json.dumps({"status": "failed", "error": "non-finite loss at iteration 4: loss_cls=nan", "failed_at_iter": 4}))
        sys.exit(3)
    (d / "metrics.json").write_text(json.dumps({
        "status": "ok", "error": None, "box_ap": 12.3, "device": "cpu", "device_class": "cpu",
        "world_size": 1, "images_per_gpu": 2, "lr_rescaled": True, "resumed_from_iter": 0,
    }))
    """
)


@pytest.fixture()
def fake_cell(tmp_path: Path) -> Path:
    path = tmp_path / "fake_cell.py"
    path.write_text(FAKE_CELL)
    return path


def _job(runs_dir: Path, name: str, *, seed: int = 0, skip: str | None = None, **run: Any) -> runner.CellJob:
    return runner.CellJob(
        name=name, matrix="m", profile="smoke", seed=seed,
        folder=runs.cell_dir(runs_dir, "m", "smoke", name, seed),
        spec={"config": {"name": name}, "run": {"device": "cpu", "seed": seed, **run}},
        axes={"backbone": "r50"}, notes=("Q5: a quirk",), skip_reason=skip,
    )  # fmt: skip


def _run(jobs: list[runner.CellJob], fake: Path, **kw: Any) -> tuple[runner.RunSummary, list[str]]:
    lines: list[str] = []
    summary = runner.run_jobs(
        jobs, executor=LocalExecutor(), base_provenance={"git_commit": "c" * 40, "git_dirty": False, "versions": {}},
        log=lines.append, argv=lambda folder: (sys.executable, str(fake), str(folder)), **kw,
    )  # fmt: skip
    return summary, lines


def _starts(folder: Path) -> int:
    path = folder / "starts.txt"
    return len(path.read_text().split()) if path.exists() else 0


# --------------------------------------------------------------------------------------------------
# layout, JSON, hash


def test_cell_dir_layout_and_names(tmp_path: Path) -> None:
    assert runs.cell_dir(tmp_path, "faster_rcnn", "smoke", "faster-rcnn_r50_fpn_1x_coco", 0) == tmp_path / "faster_rcnn/smoke/faster-rcnn_r50_fpn_1x_coco"
    assert runs.cell_dir(tmp_path, "faster_rcnn", "ci", "c", 2) == tmp_path / "faster_rcnn/ci/c/seed-2"
    for bad in ("../x", "a/b", "..", "", ".hidden"):
        with pytest.raises(UserError, match="cannot be a folder name"):
            runs.cell_dir(tmp_path, "m", "smoke", bad, 0)
    with pytest.raises(UserError):
        runs.cell_dir(tmp_path, "m/../..", "smoke", "c", 0)


def test_write_json_atomic_replaces_whole_files_only(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "result.json"
    runs.write_json_atomic(path, {"a": 1})
    runs.write_json_atomic(path, {"a": 2, "t": (1, 2)})
    assert json.loads(path.read_text()) == {"a": 2, "t": [1, 2]}
    with pytest.raises(ValueError):
        runs.write_json_atomic(path, {"a": float("nan")})  # not valid JSON: refused, old file kept
    assert json.loads(path.read_text()) == {"a": 2, "t": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left behind


def test_config_hash_is_canonical() -> None:
    a = {"config": {"x": 1, "y": [1, 2]}, "run": {"seed": 0}}
    b = {"run": {"seed": 0}, "config": {"y": [1, 2], "x": 1}}
    assert runs.config_hash(a) == runs.config_hash(b)
    assert len(runs.config_hash(a)) == 64
    assert runs.config_hash(a) != runs.config_hash({**a, "run": {"seed": 1}})


def test_iter_results_order_seeds_and_archives(tmp_path: Path) -> None:
    for name, seed in (("b", 0), ("a", 10), ("a", 2), ("a", 0)):
        runs.write_json_atomic(runs.cell_dir(tmp_path, "m", "p", name, seed) / "result.json", {"name": name, "seed": seed})
    runs.write_json_atomic(tmp_path / "m/p/a/_previous/result.json", {"name": "old"})
    (tmp_path / "m/p/b/seed-3").mkdir()  # no result yet
    got = [(r["name"], r["seed"]) for r in runs.iter_results(tmp_path, "m", "p")]
    assert got == [("a", 0), ("a", 2), ("a", 10), ("b", 0)]
    assert list(runs.iter_results(tmp_path, "m", "other")) == []


def test_outcome_rules(tmp_path: Path) -> None:
    out = tmp_path / "stdout.txt"
    out.write_text("\n".join(f"line {i}" for i in range(40)) + "\nValueError: bad\n")
    assert runner.outcome(0, {"status": "ok"}, out) == ("ok", None)
    assert runner.outcome(3, {"status": "failed", "error": "non-finite loss"}, out) == ("failed", "non-finite loss")
    status, error = runner.outcome(1, None, out)
    assert status == "failed" and error is not None
    assert error.startswith("detector.run exit code 1") and error.endswith("ValueError: bad") and "line 20" not in error
    assert "SIGKILL" in str(runner.outcome(-9, None, out)[1])
    assert "metrics.json missing" in str(runner.outcome(0, None, out)[1])


# --------------------------------------------------------------------------------------------------
# running


def test_run_records_ok_failed_skipped_and_one_failure_does_not_stop_the_rest(tmp_path: Path, fake_cell: Path) -> None:
    jobs = [
        _job(tmp_path, "crash", mode="crash"),
        _job(tmp_path, "nan", mode="nan"),
        _job(tmp_path, "good"),
        _job(tmp_path, "good", seed=1),
        _job(tmp_path, "c4", skip="the detector cannot build this cell: NotImplementedError: C4"),
    ]
    summary, lines = _run(jobs, fake_cell, max_in_flight=2)
    assert summary.statuses == {"crash": "failed", "nan": "failed", "good": "ok", "good (seed 1)": "ok", "c4": "skipped"}
    results = {(r["name"], r["seed"]): r for r in runs.iter_results(tmp_path, "m", "smoke")}
    ok = results[("good", 0)]
    assert ok["status"] == "ok" and ok["metrics"]["box_ap"] == 12.3 and "status" not in ok["metrics"]
    assert ok["config_hash"] == runs.config_hash(json.loads((jobs[2].folder / "spec.json").read_text()))
    assert ok["notes"] == ["Q5: a quirk"] and ok["axes"] == {"backbone": "r50"} and ok["matrix"] == "m"
    prov = ok["provenance"]
    assert prov["git_commit"] == "c" * 40 and prov["seed"] == 0 and prov["wall_time_s"] > 0 and prov["started_at"] <= prov["finished_at"]
    assert results[("good", 1)]["provenance"]["seed"] == 1
    assert results[("crash", 0)]["error"].endswith("RuntimeError: CUDA out of memory")
    assert results[("nan", 0)]["error"] == "non-finite loss at iteration 4: loss_cls=nan"
    assert results[("nan", 0)]["metrics"]["failed_at_iter"] == 4
    skipped = results[("c4", 0)]
    assert skipped["status"] == "skipped" and "NotImplementedError" in skipped["reason"] and skipped["metrics"] == {}
    assert not (jobs[4].folder / "stdout.txt").exists()  # nothing ran for it
    # one line per start and per finish, with timing
    assert sum(" start " in line for line in lines) == 4
    assert any("failed  crash: " in line and " s, RuntimeError: CUDA out of memory" in line for line in lines)


def test_ledger_skips_finished_reruns_failed_changed_and_forced(tmp_path: Path, fake_cell: Path) -> None:
    good, bad, skip = _job(tmp_path, "good"), _job(tmp_path, "bad", mode="crash"), _job(tmp_path, "s", skip="no C4")
    _run([good, bad, skip], fake_cell)
    first = json.loads((good.folder / "result.json").read_text())
    summary, lines = _run([good, bad, skip], fake_cell)
    assert _starts(good.folder) == 1 and _starts(bad.folder) == 2  # finished: kept; failed: run again
    assert summary.cached == ["good", "s"] and summary.statuses["good"] == "ok"
    assert json.loads((good.folder / "result.json").read_text()) == first  # untouched
    assert any("done    good" in line for line in lines)

    changed = _job(tmp_path, "good", image_scale=[320, 192])  # the config changed: runs again
    (good.folder / "checkpoints").mkdir()
    (good.folder / "checkpoints" / "latest.pt").write_bytes(b"old config")
    _run([changed], fake_cell)
    assert _starts(good.folder) == 2
    assert (good.folder / "_previous" / "checkpoints" / "latest.pt").read_bytes() == b"old config"
    assert not (good.folder / "checkpoints").exists()  # detector.run cannot resume another config
    assert json.loads((good.folder / "result.json").read_text())["config_hash"] == changed.config_hash

    _run([changed], fake_cell, force=True)
    assert _starts(good.folder) == 3

    # Skipped because the detector could not build it; the same spec runs once the detector can.
    buildable = dataclasses.replace(skip, skip_reason=None)
    summary, _ = _run([buildable], fake_cell)
    assert summary.statuses == {"s": "ok"} and _starts(skip.folder) == 1
    assert json.loads((good.folder / "_previous" / "result.json").read_text())["config_hash"] == changed.config_hash


def test_failed_cell_resumes_in_place(tmp_path: Path, fake_cell: Path) -> None:
    crash = _job(tmp_path, "x", mode="crash")
    _run([crash], fake_cell)
    (crash.folder / "checkpoints").mkdir()
    (crash.folder / "checkpoints" / "latest.pt").write_bytes(b"iter 40")
    _run([crash], fake_cell)  # same config: the checkpoints stay for detector.run to resume from
    assert (crash.folder / "checkpoints" / "latest.pt").read_bytes() == b"iter 40"
    assert not (crash.folder / "_previous").exists()


RUNNER = textwrap.dedent(
    """
    import signal, sys
    from pathlib import Path
    # Ctrl-C as at a terminal: a suite started in the background (`cmd &` in a script) hands its
    # children SIGINT ignored, and the SIGINT test would then wait out the slow cell.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from harness.execute import cells as runs, runner
    from harness.execute.executors import LocalExecutor
    runs_dir, fake, sleep, jobs_n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    names = sys.argv[5:]
    jobs = [runner.CellJob(name=n, matrix="m", profile="smoke", seed=0, folder=runs.cell_dir(runs_dir, "m", "smoke", n, 0),
                         spec={"config": {"name": n}, "run": {"sleep": float(sleep.split(",")[i % len(sleep.split(","))])}},
                         axes={}) for i, n in enumerate(names)]
    summary = runner.run_jobs(jobs, executor=LocalExecutor(grace_s=2.0), base_provenance={}, max_in_flight=jobs_n,
                            log=lambda s: print(s, flush=True), argv=lambda f: (sys.executable, fake, str(f)))
    print("SUMMARY", sorted(summary.statuses.items()), flush=True)
    """
)


def _runner(tmp_path: Path, fake: Path, sleep: str, jobs_n: int, names: list[str]) -> subprocess.Popen[str]:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "runs"), str(fake), sleep, str(jobs_n), *names],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_two_runners_never_run_the_same_cell(tmp_path: Path, fake_cell: Path) -> None:
    names = ["a", "b", "c", "d"]
    first = _runner(tmp_path, fake_cell, "1.0", 1, names)
    t0 = time.monotonic()
    while not (tmp_path / "runs/m/smoke/a/starts.txt").exists():  # the first runner holds cell a
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    second = _runner(tmp_path, fake_cell, "1.0", 1, names)
    out1, out2 = first.communicate(timeout=120)[0], second.communicate(timeout=120)[0]
    assert first.returncode == 0 and second.returncode == 0, out1 + out2
    for name in names:
        folder = tmp_path / "runs/m/smoke" / name
        assert _starts(folder) == 1, (name, out1, out2)
        assert json.loads((folder / "result.json").read_text())["status"] == "ok"
    assert "busy    a" in out2  # it met a held cell and did not touch it
    for out in (out1, out2):
        assert "SUMMARY [('a', 'ok'), ('b', 'ok'), ('c', 'ok'), ('d', 'ok')]" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_keeps_finished_results_and_stops_running_cells(tmp_path: Path, fake_cell: Path, sig: int) -> None:
    runner = _runner(tmp_path, fake_cell, "0,120", 2, ["quick", "slow"])
    quick, slow = tmp_path / "runs/m/smoke/quick", tmp_path / "runs/m/smoke/slow"
    t0 = time.monotonic()
    while not ((quick / "result.json").exists() and (slow / "starts.txt").exists()):
        assert time.monotonic() - t0 < 60 and runner.poll() is None
        time.sleep(0.05)
    slow_pid = int((slow / "starts.txt").read_text().split()[0])
    runner.send_signal(sig)  # SIGINT: Ctrl-C; SIGTERM: kill, a batch system's stop
    out = runner.communicate(timeout=60)[0]
    assert runner.returncode != 0 and "KeyboardInterrupt" in out
    assert json.loads((quick / "result.json").read_text())["status"] == "ok"
    assert not (slow / "result.json").exists()  # interrupted: no verdict, it resumes next time
    t0 = time.monotonic()
    while os.path.exists(f"/proc/{slow_pid}") and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{slow_pid}")
    lock = runs.CellLock(slow)
    assert lock.acquire()  # the lock went with the runner
    lock.release()


def test_cell_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    one, two = runs.CellLock(tmp_path), runs.CellLock(tmp_path)
    assert one.acquire()
    assert not two.acquire()
    one.release()
    assert two.acquire()
    two.release()


def test_real_detector_run_failure_is_recorded_and_others_go_on(tmp_path: Path, fake_cell: Path) -> None:
    """The real `python -m detector.run` on a spec with a bad data root fails; the next cell still runs."""
    from detector.config import DetectorConfig, RunConfig
    from harness.execute.executors import cell_argv

    bad = runner.CellJob(
        name="bad-data", matrix="m", profile="smoke", seed=0, folder=runs.cell_dir(tmp_path, "m", "smoke", "bad-data", 0),
        spec={"config": DetectorConfig().to_dict(), "run": RunConfig(data_root=str(tmp_path / "no_coco_here"), workers=0).to_dict()},
        axes={},
    )  # fmt: skip
    good = _job(tmp_path, "good")
    summary = runner.run_jobs(
        [bad, good], executor=LocalExecutor(), base_provenance={}, log=lambda s: None,
        argv=lambda folder: cell_argv(folder) if folder.name == "bad-data" else (sys.executable, str(fake_cell), str(folder)),
    )  # fmt: skip
    assert summary.statuses == {"bad-data": "failed", "good": "ok"}
    error = json.loads((bad.folder / "result.json").read_text())["error"]
    assert "no_coco_here" in error and "Traceback" not in error.splitlines()[0]
