from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from harness.execute import provenance


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path


def test_git_info_clean_then_dirty(repo: Path) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    info = provenance.git_info(repo)
    assert info == {"git_commit": head, "git_dirty": False}
    # An untracked scratch file is not part of the code: still clean.
    (repo / "scratch.txt").write_text("notes")
    assert provenance.git_info(repo)["git_dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    assert provenance.git_info(repo) == {"git_commit": head, "git_dirty": True}


def test_git_info_outside_a_repository_or_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert provenance.git_info(outside) == {"git_commit": "unknown", "git_dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git executable at all
    assert provenance.git_info(Path(__file__).parent) == {"git_commit": "unknown", "git_dirty": None}


def test_library_versions_name_every_library() -> None:
    versions = provenance.library_versions()
    assert set(versions) == {"python", "torch", "torchvision", "pycocotools", "pandas", "harness"}
    import torch

    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["python"].count(".") == 2


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cpu", "cpu"),
        ("", "unknown"),
        ("NVIDIA H200", "H200"),
        ("Tesla V100-SXM2-32GB", "V100"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
    ],
)
def test_device_class(name: str, expected: str) -> None:
    assert provenance._device_class(name) == expected
    assert provenance.device_class(name) == expected  # the detector's rule agrees on these


def test_device_info_cpu() -> None:
    assert provenance.device_info("cpu") == {"device": "cpu", "device_class": "cpu"}


def test_now_iso_is_parseable_utc() -> None:
    stamp = datetime.fromisoformat(provenance.now_iso())
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_cell_provenance_prefers_what_the_cell_measured() -> None:
    base = {"git_commit": "a" * 40, "git_dirty": False, "versions": {"torch": "2.14"}, "hostname": "h"}
    run = {"device": "cpu", "seed": 3, "images_per_gpu": 2}
    metrics = {"device": "NVIDIA H200", "device_class": "H200", "world_size": 2, "images_per_gpu": 4,
               "lr_rescaled": True, "resumed_from_iter": 40}  # fmt: skip
    prov = provenance.cell_provenance(base, metrics=metrics, run=run, nproc=1, started_at="s", finished_at="f", wall_time_s=1.23456)
    assert prov["device"] == "NVIDIA H200" and prov["device_class"] == "H200"
    assert prov["world_size"] == 2 and prov["images_per_gpu"] == 4 and prov["seed"] == 3
    assert prov["lr_rescaled"] is True and prov["resumed_from_iter"] == 40
    assert prov["git_commit"] == "a" * 40 and prov["versions"] == {"torch": "2.14"} and prov["hostname"] == "h"
    assert prov["wall_time_s"] == 1.235 and prov["started_at"] == "s" and prov["finished_at"] == "f"
    assert prov["start"] == "new process"
    forked = provenance.cell_provenance(base, metrics=metrics, run=run, nproc=1, started_at="s", finished_at="f",
                                        wall_time_s=1.0, start="fork server")  # fmt: skip
    assert forked["start"] == "fork server"
    # A cell that produced no metrics (crashed at start-up) falls back on what was asked for.
    bare = provenance.cell_provenance(base, metrics={}, run=run, nproc=2, started_at="s", finished_at="f", wall_time_s=0)
    assert bare["device_class"] == "cpu" and bare["world_size"] == 2 and bare["images_per_gpu"] == 2
    assert bare["resumed_from_iter"] == 0 and bare["lr_rescaled"] is None


def test_base_provenance_of_this_checkout() -> None:
    base = provenance.base_provenance()
    assert set(base) >= {"git_commit", "git_dirty", "versions", "hostname"}
    assert base["git_commit"] == "unknown" or len(base["git_commit"]) == 40
    assert "cells_at_once" not in base["machine"]
    assert provenance.base_provenance(cells_at_once=2)["machine"]["cells_at_once"] == 2  # timings depend on it


def test_machine_text_says_how_many_cells_ran_at_once() -> None:
    import pandas as pd

    from harness.publish.facts import machine_text

    ran = pd.DataFrame({"device": ["cpu", "cpu"], "cpu": ["AMD EPYC"] * 2, "cores": [2, 2], "threads": [1, 1],
                        "load_1m": [0.5, 1.5], "cells_at_once": [2, 2]})
    assert machine_text(ran) == ("device cpu (host: CPU AMD EPYC, 2 logical cores, 1 torch threads per cell, "
                                 "2 cell(s) at a time, load 0.5-1.5 when the run began)")
    assert "at a time" not in machine_text(ran.assign(cells_at_once=None))  # runs from before it was recorded
    # How the cells' processes began: start-up time and CPU peak RSS depend on it.
    started = ran.assign(start=["fork server", "new process"])
    assert "2 cell(s) at a time, cell start: fork server, new process, load" in machine_text(started)
    assert "cell start" not in machine_text(ran.assign(start=None))
