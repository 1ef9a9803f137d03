from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from detector.config import ScheduleConfig
from detector.train import checkpoint as ckpt
from detector.train import engine, solver
from tests.resources.fakes_engine import TinyDetector, TinySource

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ loop
def _run(tmp: Path | None, *, max_iters: int, seed: int = 0, resume: dict | None = None, init_seed: int = 0,
         model: TinyDetector | None = None, grad_clip: float | None = None,
         weight_decay: float = 1e-4, checkpoint_interval: int | None = 4) -> tuple[TinyDetector, engine.TrainResult]:
    torch.manual_seed(init_seed)
    model = model or TinyDetector()
    source = TinySource(seed=seed)
    plan, _ = solver.make_schedule(ScheduleConfig(lr=0.2), iters_per_epoch=len(source), total_batch=2,
                                   max_iters=max_iters)
    opt = solver.build_optimizer(model, ScheduleConfig(weight_decay=weight_decay), lr=plan.lr)
    engine.seed_everything(seed)
    result = engine.train(model, source, opt, plan, device=CPU, amp=solver.resolve_amp("fp32", CPU),
                          grad_clip=grad_clip, cell_dir=tmp, checkpoint_interval=checkpoint_interval, log_interval=3,
                          progress=False, resume=resume)
    return model, result


def test_train_logs_jsonl_and_keeps_two_checkpoints(tmp_path: Path) -> None:
    model, result = _run(tmp_path, max_iters=14)
    assert result.iters == 14 and result.resumed_from_iter == 0
    assert result.epochs == pytest.approx(14 / 6)
    assert math.isfinite(result.first_loss) and math.isfinite(result.final_loss)
    log = pd.read_json(tmp_path / "log.jsonl", lines=True)
    assert list(log["iter"]) == [3, 6, 9, 12, 14]
    for col in ("epoch", "lr", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss", "time",
                "data_time", "memory"):
        assert col in log.columns, col
    assert log["loss"].iloc[-1] == pytest.approx(result.final_loss)
    assert ckpt.checkpoint_iters(tmp_path / "checkpoints") == [12, 14]
    latest = ckpt.load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert latest["iteration"] == 14 and latest["epoch"] == 2 and latest["iter_in_epoch"] == 2
    assert torch.equal(latest["model"]["conv.weight"], model.conv.weight.detach())


def test_no_checkpoint_interval_writes_no_checkpoint(tmp_path: Path) -> None:
    _, result = _run(tmp_path, max_iters=5, checkpoint_interval=None)
    assert result.iters == 5 and (tmp_path / "log.jsonl").is_file()
    assert not (tmp_path / "checkpoints").exists()


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full, full_res = _run(full_dir, max_iters=10)
    state = ckpt.load_checkpoint(full_dir / "checkpoints" / "iter_8.pt")
    assert state["iteration"] == 8 and state["epoch"] == 1 and state["iter_in_epoch"] == 2
    # a different init and RNG state: everything must come from the checkpoint
    resumed, res = _run(part_dir, max_iters=10, resume=state, init_seed=99, seed=0)
    assert res.resumed_from_iter == 8 and res.iters == 10
    assert res.first_loss == full_res.first_loss and res.final_loss == full_res.final_loss
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_iteration_reads_its_losses_once_after_launching_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU a read of device values waits for the queue to drain: an iteration reads its loss
    terms once, after the backward and the optimiser step are launched (read between forward and
    backward, the GPU idled while the backward was launched), and makes no blocking copy to the
    device (`torch.tensor(..., device=)`)."""
    from detector.bench.syncs import count_syncs

    events: list[str] = []
    step, tolist = engine._backward_step, torch.Tensor.tolist
    monkeypatch.setattr(engine, "_backward_step", lambda *a, **k: (events.append("step"), step(*a, **k))[1])
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (events.append("read"), tolist(self))[1])
    _run(None, max_iters=3, checkpoint_interval=None)
    assert events == ["step", "read"] * 3
    monkeypatch.undo()
    syncs, by_kind = count_syncs(lambda: _run(None, max_iters=3, checkpoint_interval=None))
    assert by_kind.get("Tensor.tolist") == 3 and "torch.tensor(device=)" not in by_kind, by_kind


def test_non_finite_loss_stops_with_iteration_and_terms(tmp_path: Path) -> None:
    with pytest.raises(engine.NonFiniteLoss) as info:
        _run(tmp_path, max_iters=10, model=TinyDetector(nan_at_call=3))
    assert info.value.iteration == 3
    assert math.isnan(info.value.loss_terms["loss_bbox"]) and "loss_cls" in info.value.loss_terms


def test_grad_clip_bounds_the_update() -> None:
    torch.manual_seed(0)
    ref = TinyDetector()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    model, _ = _run(None, max_iters=1, model=ref, grad_clip=1e-6, weight_decay=0.0)
    moved = [(model.state_dict()[k] - before[k]).norm() ** 2 for k in before if "weight" in k or "bias" in k]
    lr0 = 0.2 * 2 / 16 * 0.001  # a 1-iteration budget has a 1-iteration warmup at warmup_ratio
    assert 0 < float(sum(moved)) ** 0.5 <= lr0 * 1e-6 * 1.001


def test_truncate_log_drops_lines_after_the_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"iter": i, "loss": 1.0}) + "\n" for i in (3, 6, 9)))
    engine.truncate_log(log, 6)
    assert [json.loads(x)["iter"] for x in log.read_text().splitlines()] == [3, 6]


def test_progress_writes_deciles_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    bar = engine.Progress(20, "train")
    for _ in range(20):
        bar.update(1, loss=0.5)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("train [####################] 20/20")


def test_resume_refuses_a_checkpoint_of_another_world_size(tmp_path: Path) -> None:
    _run(tmp_path, max_iters=4)
    state = ckpt.load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert state["extra"]["world_size"] == 1
    state["extra"]["world_size"] = 2
    with pytest.raises(ValueError, match="written by 2 process"):
        _run(tmp_path / "again", max_iters=8, resume=state)
