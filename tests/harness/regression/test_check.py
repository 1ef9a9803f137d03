"""CI regression checks: baseline comparison, provenance on update, missing data, determinism, overfit.

No training here: the cells' outcomes are fake metrics (`_outcome`), and `plan_checks` / `execute`
are replaced where a whole `run_regression` / `update_baselines` call is exercised.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.errors import UserError
from harness.execute.runner import CellJob
from harness.regression import check as regression
from harness.regression import update
from harness.regression.baselines import (
    MARKER,
    RegressionSpec,
    compare_metrics,
    default_path,
    load_spec,
    write_baseline,
)
from harness.regression.check import Check
from harness.regression.judge import (
    fingerprint,
    judge_checks,
    portable_spec_hash,
    print_judgement,
)

TRAIN_ANN = "annotations/instances_train2017.json"
METRICS = {"coco/bbox_mAP": 0.0, "coco/bbox_mAP_50": 0.0, "box_ap": 0.0, "first_loss": 5.2313, "final_loss": 2.3816,
           "iters": 8.0, "log/loss@2": 5.0815, "log/loss_cls@2": 4.2672, "log/loss@8": 2.3816}  # fmt: skip


def _coco_root(root: Path, n_images: int = 2) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    images: list[dict[str, Any]] = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 64, "height": 48}
                                    for i in range(n_images)]  # fmt: skip
    for im in images:
        (root / "train2017" / str(im["file_name"])).write_bytes(b"\xff\xd8 not really a jpeg")
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 20], "area": 600, "iscrowd": 0}]
    cats = [{"id": 1, "name": "person", "supercategory": "person"}]
    (root / TRAIN_ANN).write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _check(check_id: str, root: Path, tmp: Path, *, kind: str = "compare", twin: str | None = None) -> Check:
    suite, cell = check_id.split("/")
    spec = {"config": {"name": cell}, "run": {"data_root": str(root), "train_ann": TRAIN_ANN, "seed": 0,
                                             "max_iters": 8, "image_scale": [256, 192]}}  # fmt: skip
    job = CellJob(name=cell, matrix="faster_rcnn", profile=suite, seed=0, folder=tmp / suite / cell, spec=spec, axes={})
    return Check(id=check_id, kind=kind, job=job, twin=twin)


def _outcome(metrics: dict[str, float] | None = None, status: str = "ok", error: str | None = None) -> dict[str, Any]:
    return {"status": status, "error": error, "metrics": dict(METRICS if metrics is None else metrics), "result": {}}


def _entry(checks: list[Check], metrics: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "provenance": {"git_commit": "5eccfd5f" + "0" * 32, "git_dirty": False, "versions": {"torch": "2.14.0"},
                       "device": "cpu", "device_class": "cpu", "cpu": "AMD EPYC", "date": "2026-11-24"},
        "checks": {c.id: {"metrics": dict(METRICS if metrics is None else metrics), "spec_sha256": portable_spec_hash(c.job.spec),
                          "data": fingerprint(Path(c.job.spec["run"]["data_root"]), TRAIN_ANN)} for c in checks},
    }  # fmt: skip


@pytest.fixture()
def spec() -> RegressionSpec:
    return load_spec(default_path("faster_rcnn"))


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return _coco_root(tmp_path / "coco")


# --------------------------------------------------------------------------------------------------
# the baseline file


def test_shipped_file_declares_the_issue_s_checks(spec: RegressionSpec) -> None:
    ids = [c[0] for c in regression.candidates(spec)]
    for cell in ("faster-rcnn_r50_fpn_1x_coco", "faster-rcnn_r50-caffe_fpn_1x_coco", "faster-rcnn_r50_fpn_giou_1x_coco",
                 "faster-rcnn_r50_fpn_amp-1x_coco"):  # fmt: skip
        assert f"coco128/{cell}" in ids and f"synthetic/{cell}" in ids
    assert ids[0].startswith("overfit/") and spec.overfit is not None and 4 <= spec.overfit.images <= 8
    assert spec.overfit.require and spec.overfit.why.strip() and spec.overfit.deviations
    assert spec.determinism in ids and spec.threads >= 1
    assert all(t.why.strip() for t in spec.tolerances)


def test_baselines_stored_for_every_declared_check_on_cpu(spec: RegressionSpec) -> None:
    entry = spec.baselines.get("cpu")
    assert entry is not None, "run `harness baseline update --data ../shared/data/coco128` on a CPU machine"
    ids = {c[0] for c in regression.candidates(spec)}
    assert set(entry["checks"]) == ids
    prov = entry["provenance"]
    assert len(prov["git_commit"]) == 40 and prov["versions"]["torch"] and prov["date"] and prov["cpu"]
    for check in entry["checks"].values():
        assert len(check["data"]["sha256"]) == 64 and check["seed"] == spec.seed and check["iters"] >= 1
        assert check["metrics"]["iters"] == check["iters"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.update(threads=0), "'threads'"),
        (lambda d: d["suites"]["coco128"].update(data="download"), "allowed: given, synthetic"),
        (lambda d: d["tolerances"].pop(), "the last entry must be metric '*'"),
        (lambda d: d["tolerances"][0].update(relative=0.1), "'tolerances[0].relative'"),
        (lambda d: d["budget"].update(image_scale=[256]), "'budget.image_scale'"),
    ],
)
def test_bad_baseline_file_names_file_and_field(tmp_path: Path, edit: Any, expected: str) -> None:
    data = yaml.safe_load(default_path().read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and expected in str(err.value)


# --------------------------------------------------------------------------------------------------
# comparing with a baseline


def test_within_tolerance_passes_and_a_moved_metric_fails(spec: RegressionSpec) -> None:
    first, final = spec.tolerance("first_loss", "coco128/x"), spec.tolerance("final_loss", "coco128/x")
    near = {**METRICS, "first_loss": METRICS["first_loss"] * (1 + first.rel / 2),
            "final_loss": METRICS["final_loss"] * (1 - final.rel / 2)}  # fmt: skip
    assert all(f.ok for f in compare_metrics("coco128/x", near, METRICS, spec))
    moved = {**METRICS, "final_loss": METRICS["final_loss"] * (1 + 3 * final.rel)}
    bad = [f for f in compare_metrics("coco128/x", moved, METRICS, spec) if not f.ok]
    assert [f.metric for f in bad] == ["final_loss"]
    assert bad[0].delta == pytest.approx(METRICS["final_loss"] * 3 * final.rel) and bad[0].severity == pytest.approx(3)
    assert f"+{3 * final.rel:.2%}" in bad[0].describe() and f"tolerance {final.describe()}" in bad[0].describe()


def test_missing_or_extra_metric_cannot_pass(spec: RegressionSpec) -> None:
    got = {k: v for k, v in METRICS.items() if k != "log/loss@8"} | {"log/loss@4": 3.0}
    bad = {f.metric: f.note for f in compare_metrics("synthetic/x", got, METRICS, spec) if not f.ok}
    assert bad == {"log/loss@8": "not measured by this run", "log/loss@4": "not in the baseline (update it on purpose)"}


def test_overfit_check_has_its_own_ap_tolerance(spec: RegressionSpec) -> None:
    assert spec.tolerance("coco/bbox_mAP_50", "overfit/faster-rcnn_r50_fpn_1x_coco").abs > spec.tolerance(
        "coco/bbox_mAP_50", "coco128/faster-rcnn_r50_fpn_1x_coco").abs  # fmt: skip


def test_regression_output_names_cell_metric_delta_and_baseline(spec: RegressionSpec, root: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    checks = [_check("coco128/faster-rcnn_r50_fpn_1x_coco", root, tmp_path), _check("synthetic/faster-rcnn_r50_fpn_1x_coco", root, tmp_path)]
    spec = dataclasses.replace(spec, baselines={"cpu": _entry(checks)}, overfit=None)
    outcome = {checks[0].id: _outcome({**METRICS, "log/loss_cls@2": 4.5}), checks[1].id: _outcome()}
    verdict = judge_checks(spec, checks, outcome, device_class="cpu", data_missing=False)
    assert not verdict.passed and [c.passed for c in verdict.checks] == [False, True]
    print_judgement(verdict, spec, checks, device_class="cpu")
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("REGRESSION"))
    assert "coco128/faster-rcnn_r50_fpn_1x_coco" in line and "log/loss_cls@2 4.2672 -> 4.5" in line
    tol = spec.tolerance("log/loss_cls@2", checks[0].id).describe()
    assert "delta +0.2328" in line and "+5.46%" in line and f"tolerance {tol}" in line
    assert "cpu baseline in matrices/baselines/faster_rcnn.yaml (commit 5eccfd5f, 2026-11-24, torch 2.14.0" in line
    assert out.rstrip().splitlines()[-1].startswith("regression: FAIL: 2 checks, 1 failed, 1 metrics moved")


def test_all_within_tolerance_passes(spec: RegressionSpec, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checks = [_check("coco128/faster-rcnn_r50_fpn_1x_coco", root, tmp_path)]
    spec = dataclasses.replace(spec, baselines={"cpu": _entry(checks)}, overfit=None)
    verdict = judge_checks(spec, checks, {checks[0].id: _outcome({**METRICS, "final_loss": 2.3816 * 1.005})}, device_class="cpu",
                    data_missing=False)  # fmt: skip
    assert verdict.passed
    print_judgement(verdict, spec, checks, device_class="cpu")
    assert "regression: PASS: 1 checks, 0 failed" in capsys.readouterr().out


def test_other_data_other_device_failed_cell_and_missing_baseline_fail(spec: RegressionSpec, root: Path, tmp_path: Path) -> None:
    a, b = _check("coco128/a", root, tmp_path), _check("coco128/b", root, tmp_path)
    entry = _entry([a, b])
    spec = dataclasses.replace(spec, baselines={"cpu": entry}, overfit=None)
    (root / TRAIN_ANN).write_text((root / TRAIN_ANN).read_text().replace('"person"', '"people"'))
    verdict = judge_checks(spec, [a, b], {"coco128/a": _outcome(), "coco128/b": _outcome(status="failed", error="Traceback\nRuntimeError: boom")},
                    device_class="cpu", data_missing=False)  # fmt: skip
    assert "trained on other data than the baseline" in verdict.checks[0].problems[0]
    assert "the cell failed: RuntimeError: boom" in verdict.checks[1].problems[0]
    on_gpu = judge_checks(spec, [a], {"coco128/a": _outcome()}, device_class="H200", data_missing=False)
    assert not on_gpu.passed and "no baseline for device class 'H200'" in on_gpu.problems[0]
    lacking = dataclasses.replace(spec, baselines={"cpu": {**entry, "checks": {}}})
    assert "no baseline for this check" in judge_checks(lacking, [a], {"coco128/a": _outcome()}, device_class="cpu",
                                                 data_missing=False).checks[0].problems[0]  # fmt: skip


def test_changed_spec_is_said_but_metrics_decide(spec: RegressionSpec, root: Path, tmp_path: Path) -> None:
    a = _check("coco128/a", root, tmp_path)
    spec = dataclasses.replace(spec, baselines={"cpu": _entry([a])}, overfit=None)
    a.job.spec["run"]["max_iters"] = 9
    verdict = judge_checks(spec, [a], {"coco128/a": _outcome()}, device_class="cpu", data_missing=False)
    assert verdict.passed and "spec sha256 changed" in verdict.checks[0].notes[0]


def test_overfit_floor_and_determinism(spec: RegressionSpec, root: Path, tmp_path: Path) -> None:
    assert spec.overfit is not None
    metric, floor = next(iter(spec.overfit.require.items()))
    over = _check(f"overfit/{spec.overfit.cell}", root, tmp_path, kind="overfit")
    first = _check("synthetic/faster-rcnn_r50_fpn_1x_coco", root, tmp_path)
    rerun = _check("determinism/faster-rcnn_r50_fpn_1x_coco", root, tmp_path, kind="rerun", twin=first.id)
    learned = {**METRICS, **{m: v + 0.1 for m, v in spec.overfit.require.items()}}
    spec = dataclasses.replace(spec, baselines={"cpu": _entry([over, first]) | {}})
    spec.baselines["cpu"]["checks"][over.id]["metrics"] = learned
    ok = judge_checks(spec, [over, first, rerun], {over.id: _outcome(learned), first.id: _outcome(), rerun.id: _outcome()},
               device_class="cpu", data_missing=False)  # fmt: skip
    assert ok.passed and "identical" in ok.checks[2].notes[0] and "learned" in ok.checks[0].notes[0]
    dull = {**learned, metric: floor - 0.01}
    tiny = {**METRICS, "log/loss@8": METRICS["log/loss@8"] + 1e-12}  # within tolerance, but not identical
    bad = judge_checks(spec, [over, first, rerun], {over.id: _outcome(dull), first.id: _outcome(), rerun.id: _outcome(tiny)},
                device_class="cpu", data_missing=False)  # fmt: skip
    assert "the detector did not learn" in bad.checks[0].problems[0] and metric in bad.checks[0].problems[0]
    assert bad.checks[1].passed
    assert "differ in 1 of" in bad.checks[2].problems[0] and "log/loss@8" in bad.checks[2].problems[0]


# --------------------------------------------------------------------------------------------------
# baseline update


def test_write_baseline_keeps_the_hand_written_part(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    head = default_path().read_text().partition(MARKER)[0].rstrip("\n") + "\n"
    path.write_text(head)
    write_baseline(path, "cpu", {"provenance": {"git_commit": "a"}, "checks": {}})
    write_baseline(path, "H200", {"provenance": {"git_commit": "b"}, "checks": {}})
    write_baseline(path, "cpu", {"provenance": {"git_commit": "c"}, "checks": {}})
    text = path.read_text()
    assert text.startswith(head) and text.count(MARKER) == 1
    assert {k: v["provenance"]["git_commit"] for k, v in load_spec(path).baselines.items()} == {"cpu": "c", "H200": "b"}


def _fake_run(monkeypatch: pytest.MonkeyPatch, checks: list[Check], outcome: dict[str, dict[str, Any]],
              seen: dict[str, Any]) -> None:  # fmt: skip
    def plan(spec: RegressionSpec, *, data_root: Path | None, **kw: Any) -> list[Check]:
        seen["data_root"] = data_root
        return [c for c in checks if data_root is not None or c.id.startswith(("synthetic/", "determinism/"))]

    monkeypatch.setattr(regression, "plan_checks", plan)
    monkeypatch.setattr(regression, "execute", lambda spec, checks, **kw: {c.id: outcome[c.id] for c in checks})


def test_update_writes_metrics_with_provenance(monkeypatch: pytest.MonkeyPatch, root: Path, tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    shutil.copy(default_path(), path)
    checks = [_check("coco128/faster-rcnn_r50_fpn_1x_coco", root, tmp_path), _check("synthetic/faster-rcnn_r50_fpn_1x_coco", root, tmp_path)]
    _fake_run(monkeypatch, checks, {c.id: _outcome() for c in checks}, {})
    assert update.update_baselines(data=str(root), baselines=path, device="cpu", runs_dir=tmp_path, log=print) == 0
    entry = load_spec(path).baselines["cpu"]
    prov = entry["provenance"]
    assert len(prov["git_commit"]) == 40 and isinstance(prov["git_dirty"], bool)
    assert prov["versions"]["torch"] and prov["device_class"] == "cpu" and prov["cpu"] and prov["date"][:2] == "20"
    assert prov["threads_per_cell"] == load_spec(path).threads
    stored = entry["checks"]["coco128/faster-rcnn_r50_fpn_1x_coco"]
    assert stored["metrics"] == METRICS and stored["seed"] == 0 and stored["iters"] == 8
    assert stored["data"] == fingerprint(root, TRAIN_ANN) and stored["spec_sha256"] == portable_spec_hash(checks[0].job.spec)
    assert stored["git_commit"] == prov["git_commit"]


def test_update_refuses_numbers_that_are_not_a_reference(monkeypatch: pytest.MonkeyPatch, root: Path, tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    shutil.copy(default_path(), path)
    before = path.read_text()
    checks = [_check("synthetic/faster-rcnn_r50_fpn_1x_coco", root, tmp_path)]
    _fake_run(monkeypatch, checks, {checks[0].id: _outcome(status="failed", error="RuntimeError: boom")}, {})
    assert update.update_baselines(data=str(root), baselines=path, device="cpu", runs_dir=tmp_path, log=print) == 1
    assert path.read_text() == before
    with pytest.raises(UserError, match="no --data ROOT was given"):  # update never silently skips the real data
        update.update_baselines(baselines=path, device="cpu", runs_dir=tmp_path, log=print)


# --------------------------------------------------------------------------------------------------
# missing data


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("TRUE", True), ("", False), ("false", False)])
def test_ci_mode(value: str, expected: bool) -> None:
    assert regression.ci_mode({"CI": value}) is expected
    assert regression.ci_mode({}) is False


def test_missing_data_under_ci_fails_before_running(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(regression, "execute", lambda *a, **k: pytest.fail("must not train"))
    missing = tmp_path / "shared" / "data" / "coco128"
    with pytest.raises(UserError) as err:
        regression.run_regression(data=str(missing), ci=True, device="cpu", runs_dir=tmp_path)
    assert str(missing) in str(err.value) and "CI=true" in str(err.value) and "synthetic checks alone" in str(err.value)
    with pytest.raises(UserError, match="no --data ROOT was given"):
        regression.run_regression(data=None, ci=True, device="cpu", runs_dir=tmp_path)


@pytest.mark.parametrize("synthetic_ok", [True, False])
def test_missing_data_without_ci_runs_synthetic_only_and_says_so(monkeypatch: pytest.MonkeyPatch, root: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str], synthetic_ok: bool) -> None:  # fmt: skip
    path = tmp_path / "b.yaml"
    shutil.copy(default_path(), path)
    checks = [_check("coco128/faster-rcnn_r50_fpn_1x_coco", root, tmp_path), _check("synthetic/faster-rcnn_r50_fpn_1x_coco", root, tmp_path)]
    write_baseline(path, "cpu", _entry(checks))
    seen: dict[str, Any] = {}
    synthetic = _outcome() if synthetic_ok else _outcome({**METRICS, "first_loss": 6.0})
    _fake_run(monkeypatch, checks, {checks[0].id: _outcome(), checks[1].id: synthetic}, seen)
    lines: list[str] = []
    code = regression.run_regression(data=str(tmp_path / "nope"), ci=False, device="cpu", runs_dir=tmp_path,
                                     baselines=path, log=lines.append)  # fmt: skip
    assert seen["data_root"] is None and code == (0 if synthetic_ok else 1)
    assert any("NOT run" in ln and "only the synthetic checks run" in ln for ln in lines)
    out = capsys.readouterr().out
    assert "the real-data checks (coco128, overfit) were NOT run" in out and "coco128/" not in out.split("note:")[0]
    assert json.loads((tmp_path / "regression" / "faster_rcnn" / "report.json").read_text())["passed"] is synthetic_ok


# --------------------------------------------------------------------------------------------------
# planning (no training: the cells are only described)


def test_plan_synthetic_checks(spec: RegressionSpec, tmp_path: Path) -> None:
    checks = regression.plan_checks(spec, data_root=None, runs_dir=tmp_path, device="cpu",
                                    only=["synthetic/faster-rcnn_r50_fpn_1x_coco"], log=print)  # fmt: skip
    assert [c.id for c in checks] == ["synthetic/faster-rcnn_r50_fpn_1x_coco", "determinism/faster-rcnn_r50_fpn_1x_coco"]
    first, twin = checks
    run = first.job.spec["run"]
    assert (run["max_iters"], tuple(run["image_scale"]), run["eval_max_images"], run["log_interval"], run["bench_images"]) == (
        spec.budget.max_iters, spec.budget.image_scale, spec.budget.eval_max_images, spec.budget.log_interval, 0)  # fmt: skip
    assert twin.job.spec == first.job.spec and twin.job.folder != first.job.folder and twin.twin == first.id
    assert first.job.folder == tmp_path / "regression" / "faster_rcnn" / "synthetic" / "faster-rcnn_r50_fpn_1x_coco"
    on_gpu = regression.plan_checks(spec, data_root=None, runs_dir=tmp_path, device="cuda", only=["synthetic/*_1x_coco"], log=print)
    assert not any(c.kind == "rerun" for c in on_gpu)


def test_plan_overfit_subset(spec: RegressionSpec, tmp_path: Path) -> None:
    assert spec.overfit is not None
    real = _coco_root(tmp_path / "real", n_images=spec.overfit.images + 3)
    (over,) = regression.plan_checks(spec, data_root=real, runs_dir=tmp_path, device="cpu", only=["overfit"], log=print)
    run, cfg = over.job.spec["run"], over.job.spec["config"]
    data = json.loads((Path(run["data_root"]) / TRAIN_ANN).read_text())
    assert [im["id"] for im in data["images"]] == list(range(1, spec.overfit.images + 1))
    assert (Path(run["data_root"]) / "train2017").resolve() == (real / "train2017").resolve()
    assert run["val_ann"] is None and run["max_iters"] == spec.overfit.budget.max_iters  # trained and evaluated on the same images
    assert cfg["schedule"]["lr"] == spec.overfit.lr and cfg["schedule"]["base_batch_size"] == run["images_per_gpu"]
    with pytest.raises(UserError, match="--only nothing-like-this: matches no regression check"):
        regression.plan_checks(spec, data_root=real, runs_dir=tmp_path, device="cpu", only=["nothing-like-this"])


def test_cli_missing_data_under_ci_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from harness.cli import main

    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(regression, "execute", lambda *a, **k: pytest.fail("must not train"))
    code = main(["regression", "--data", str(tmp_path / "coco128"), "--runs-dir", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("harness: error: regression: --data")
    assert "CI=true" in err[0] and str(tmp_path / "coco128") in err[0]


def test_overfit_subset_is_reused_on_a_second_check_and_replaced_when_the_data_changed(root: Path, tmp_path: Path) -> None:
    # `harness regression` twice, or `harness baseline update` after it (what a refresh on purpose
    # does), in the same runs folder: the harness's own subset must not stop the second command.
    first = regression.overfit_root(tmp_path / "runs", root, 1)
    ann = first / TRAIN_ANN
    before = ann.read_bytes()
    assert regression.overfit_root(tmp_path / "runs", root, 1) == first and ann.read_bytes() == before
    data = json.loads((root / TRAIN_ANN).read_text())
    data["annotations"][0]["bbox"] = [2, 2, 30, 20]
    (root / TRAIN_ANN).write_text(json.dumps(data))
    regression.overfit_root(tmp_path / "runs", root, 1)
    assert json.loads(ann.read_text())["annotations"][0]["bbox"] == [2, 2, 30, 20]
    assert sorted(p.name for p in ann.parent.iterdir()) == [ann.name]  # no temporary file left
