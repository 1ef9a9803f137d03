from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detector.train import checkpoint as ckpt


def _draw() -> tuple[float, float, float]:
    return torch.rand(()).item(), float(np.random.rand()), random.random()


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)
    saved = ckpt.rng_state()
    expected = [_draw() for _ in range(3)]
    path = tmp_path / "rng.pt"
    torch.save(saved, path)
    loaded = torch.load(path, weights_only=True)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt.set_rng_state(loaded)
    assert [_draw() for _ in range(3)] == expected


def _state(model: nn.Module, it: int) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    return ckpt.training_state(model=model, optimizer=opt, scaler=torch.amp.GradScaler("cpu"), iteration=it,
                               epoch=1, iter_in_epoch=3, rng=[ckpt.rng_state()], data={"gen": torch.ones(2)},
                               extra={"first_loss": 1.5, "window": {"sums": {"loss": 2.0}, "count": 1}})


def test_save_keeps_last_two_and_latest_points_at_newest(tmp_path: Path) -> None:
    model, ckdir = nn.Linear(2, 2), tmp_path / "checkpoints"
    for it in (4, 8, 12):
        ckpt.save_checkpoint(ckdir, _state(model, it), iteration=it)
    assert ckpt.checkpoint_iters(ckdir) == [8, 12]
    assert sorted(p.name for p in ckdir.iterdir()) == ["iter_12.pt", "iter_8.pt", "latest.pt"]
    latest = ckpt.load_checkpoint(ckpt.latest_checkpoint(ckdir))
    assert latest["iteration"] == 12 and latest["iter_in_epoch"] == 3 and latest["extra"]["first_loss"] == 1.5
    assert torch.equal(latest["model"]["weight"], model.weight.detach())
    assert "momentum_buffer" in latest["optimizer"]["state"][0]
    assert latest["scaler"] is not None and torch.equal(latest["data"]["gen"], torch.ones(2))


def _damage(path: Path) -> None:
    """Cut a file short in place under a new inode (latest.pt is a hard link of the newest iter_<n>.pt)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 3])


def test_resume_falls_back_to_the_newest_readable_checkpoint_and_says_so(tmp_path: Path) -> None:
    model, ckdir = nn.Linear(2, 2), tmp_path / "checkpoints"
    assert ckpt.resume_checkpoint(ckdir) == (None, None)  # nothing saved: a fresh start
    for it in (4, 8):
        ckpt.save_checkpoint(ckdir, _state(model, it), iteration=it)
    state, note = ckpt.resume_checkpoint(ckdir)
    assert state is not None and state["iteration"] == 8 and note is None
    _damage(ckdir / "latest.pt")
    state, note = ckpt.resume_checkpoint(ckdir)
    assert state is not None and state["iteration"] == 8  # iter_8.pt, the same checkpoint, still reads
    assert note is not None and note.startswith("resumed from iter_8.pt (iteration 8): latest.pt: ")
    _damage(ckdir / "iter_8.pt")
    state, note = ckpt.resume_checkpoint(ckdir)
    assert state is not None and state["iteration"] == 4 and "latest.pt: " in note and "iter_8.pt: " in note
    _damage(ckdir / "iter_4.pt")
    with pytest.raises(ValueError, match=r"no training checkpoint can be read \(latest.pt: .*iter_8.pt: .*iter_4.pt: .*move the folder"):
        ckpt.resume_checkpoint(ckdir)
    assert sorted(p.name for p in ckdir.iterdir()) == ["iter_4.pt", "iter_8.pt", "latest.pt"]  # nothing deleted


def test_latest_checkpoint_ignores_and_removes_stale_temporary_files(tmp_path: Path) -> None:
    ckdir = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(ckdir) is None
    ckdir.mkdir()
    stale = ckdir / ".iter_4.pt.tmp.999"
    stale.write_bytes(b"half a checkpoint")
    assert ckpt.latest_checkpoint(ckdir) is None and not stale.exists()


def test_load_refuses_files_that_are_not_training_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        ckpt.load_checkpoint(path)


def test_load_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"iteration": 1, "model": {}, "obj": os.stat_result((0,) * 10)}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        ckpt.load_checkpoint(path)
