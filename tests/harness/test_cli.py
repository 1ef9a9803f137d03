from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import COMMANDS, main

R50 = "faster-rcnn_r50_fpn_1x_coco"


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated COCO-2017 root (2 images): the tests never need ../shared."""
    from detector.data.synth import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("coco") / "root", images=2, seed=0)


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `argv`; it must fail as a user error: exit 2, one stderr line, no traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("harness: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["list", "no_such_matrix"], "no_such_matrix"),
        (["list", "faster_rcnn", "--format", "xml"], "--format"),
        (["list", "faster_rcnn", "--profile", "nightly"], "nightly"),
        (["run", "faster_rcnn", "--only", "faster-rcnn_r52_fpn_1x_coco"], "faster-rcnn_r52_fpn_1x_coco"),
        (["run", "faster_rcnn", "--jobs", "0"], "--jobs"),
        (["run", "faster_rcnn", "--jobs", "two"], "--jobs"),
        (["run", "faster_rcnn", "--jobs", "Auto"], "expected a positive integer or 'auto'"),
        (["run", "faster_rcnn", "--seeds", "-1"], "--seeds"),
        (["run", "faster_rcnn", "--device", "tpu"], "--device"),
        (["run", "faster_rcnn", "--executor", "ray"], "--executor"),
        (["run", "faster_rcnn", "--profile", "nightly"], "nightly"),
        (["run", "faster_rcnn", "--profile", "full"], "--data"),
        (["run", "faster_rcnn", "--pretrained", "resnet50.pth"], "NAME=FILE"),
        (["describe", "faster-rcnn_r18_fpn_1x_coco"], "faster-rcnn_r18_fpn_1x_coco"),
        (["eval", "--ann", "missing_gt.json", "--dets", "missing_dets.json"], "missing_gt.json"),
        (["verify", R50, "--checkpoint", "nope.pth", "--data", "COCO_ROOT"], "nope.pth"),
        (["data"], "ACTION"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, coco_root: Path, args: list[str], expected: str
) -> None:
    args = [str(coco_root) if a == "COCO_ROOT" else a for a in args]
    argv = [*args, "--runs-dir", str(tmp_path)] if args[0] == "run" else args
    assert expected in _error_line(capsys, argv)
    assert not any(tmp_path.iterdir())  # nothing was written before the error


@pytest.mark.parametrize("command", ["report", "compare", "estimate"])
def test_reading_a_runs_dir_with_no_run_of_the_profile_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    """A mistyped --runs-dir or --profile would otherwise give a page, table or estimate of 30
    "not run" rows (and a page folder made under the typo)."""
    typo = tmp_path / "rnus"
    line = _error_line(capsys, [command, "faster_rcnn", "--profile", "smoke", "--runs-dir", str(typo)])
    assert "no run of faster_rcnn / smoke" in line and str(typo) in line
    assert not typo.exists()


@pytest.mark.parametrize("existing", ["annotations/instances_train2017.json", "val2017"])
def test_data_synth_never_overwrites_a_root(capsys: pytest.CaptureFixture[str], tmp_path: Path, existing: str) -> None:
    """`--out` pointed at a real COCO root must not replace its annotation file or mix images in."""
    target = tmp_path / existing
    if target.suffix:
        target.parent.mkdir(parents=True)
        target.write_text('{"mine": 1}')
    else:
        target.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert existing in _error_line(capsys, ["data", "synth", "--out", str(tmp_path), "--images", "1"])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if target.suffix:
        assert target.read_text() == '{"mine": 1}'
    # A folder holding other things is fine: nothing of the same name is there.
    other = tmp_path / "new"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["data", "synth", "--out", str(other), "--images", "1"]) == 0
    assert (other / "notes.txt").read_text() == "mine" and (other / "annotations" / "instances_train2017.json").is_file()


def test_malformed_yaml_names_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("title: x\naxes: [r50, {\n")
    assert "broken.yaml" in _error_line(capsys, ["list", str(bad)])


def test_data_root_must_be_a_coco_root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    line = _error_line(capsys, ["run", "faster_rcnn", "--data", str(root), "--runs-dir", str(tmp_path / "runs")])
    assert "annotations/instances_train2017.json" in line and "train2017/" in line
    line = _error_line(capsys, ["run", "faster_rcnn", "--data", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path / "runs")])
    assert "nowhere" in line


def test_bad_annotation_file_is_a_user_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text("{not json")
    assert "ann.json" in _error_line(capsys, ["data", "subset", "--ann", str(ann), "--out", str(tmp_path / "o.json")])


def test_no_traceback_through_python_m_harness(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "faster_rcnn", "--only", "nope", "--runs-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("harness: error: ") and "Traceback" not in proc.stderr


def test_commands_cover_the_design() -> None:
    design = {"list", "describe", "run", "report", "compare", "reproduce", "eval", "verify", "bench", "data"}
    assert set(COMMANDS) >= design | {"regression"}  # regression: what `nox -s regression` calls


def test_list_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "faster_rcnn"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("faster-rcnn_") for line in out.splitlines()) == 30
    assert "30 cells in faster_rcnn" in out
    assert main(["list", "faster_rcnn", "--format", "json"]) == 0
    cells = json.loads(capsys.readouterr().out)
    assert len(cells) == 30 and len({c["name"] for c in cells}) == 30
    for cell in cells:
        assert set(cell) >= {"name", "section", "axes", "published", "aliases"}
        assert set(cell["published"]) == {"box_ap", "mem_gb", "fps"}
    r50 = next(c for c in cells if c["name"] == R50)
    assert r50["published"] == {"box_ap": 37.4, "mem_gb": 4.0, "fps": 21.4} and r50["section"] == "main"
    assert "faster_rcnn_r50_fpn_1x_coco" in r50["aliases"]
    assert main(["list", "faster_rcnn", "--profile", "ci", "--format", "json"]) == 0
    assert 0 < len(json.loads(capsys.readouterr().out)) < 30


def test_describe_by_alias(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "faster_rcnn_r50_fpn_1x_coco", "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == R50
    assert info["params_total"] > info["params_trainable"] > 1_000_000  # frozen stem + BN stats
    assert info["config"]["backbone"]["depth"] == 50 and info["axes"]["neck"] == "fpn"
    assert main(["describe", R50]) == 0
    assert "params_total: " in capsys.readouterr().out


def test_data_synth_subset_and_eval(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(root), "--images", "2", "--seed", "1"]) == 0
    ann = root / "annotations" / "instances_train2017.json"
    gt = json.loads(ann.read_text())
    assert len(gt["images"]) == 2
    sub = tmp_path / "sub.json"
    assert main(["data", "subset", "--ann", str(ann), "--out", str(sub), "--max-images", "1"]) == 0
    assert len(json.loads(sub.read_text())["images"]) == 1
    # Detections equal to the ground truth score AP 1.0 with pycocotools.
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0} for a in gt["annotations"]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    capsys.readouterr()
    assert main(["eval", "--ann", str(ann), "--dets", str(tmp_path / "dets.json"), "--format", "json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {"bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"} <= set(stats)
    assert len(stats) == 12 and stats["bbox_mAP"] == pytest.approx(1.0)
    # --classwise: mmdet's per-category table, in JSON and as text ("-" where a category has no ground truth).
    assert main(["eval", "--ann", str(ann), "--dets", str(tmp_path / "dets.json"), "--classwise", "--format", "json"]) == 0
    per_category = json.loads(capsys.readouterr().out).pop("per_category")
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    present = {c["name"] for c in gt["categories"] if any(a["category_id"] == c["id"] for a in gt["annotations"])}
    assert list(per_category) == names and 0 < len(present) < len(names)
    assert {n for n, row in per_category.items() if row["mAP"] is not None} == present
    assert all(per_category[n]["mAP"] == pytest.approx(1.0) for n in present)
    assert main(["eval", "--ann", str(ann), "--dets", str(tmp_path / "dets.json"), "--classwise"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("category"))
    assert lines[header].split() == ["category", "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"]
    rows = {line[: len(max(names, key=len))].strip(): line.split()[-6:] for line in lines[header + 2:]}
    assert len(rows) == len(names) and all(rows[n][0] == "1.000" for n in present)
    assert all(rows[n] == ["-"] * 6 for n in set(names) - present)
    # --categories: only those are scored (as a subset-trained model is), an unknown name is one line, exit 2.
    one = sorted(present)[0]
    assert main(["eval", "--ann", str(ann), "--dets", str(tmp_path / "dets.json"), "--categories", f"{one}, ",
                 "--classwise", "--format", "json"]) == 0  # fmt: skip
    assert list(json.loads(capsys.readouterr().out)["per_category"]) == [one]
    assert main(["eval", "--ann", str(ann), "--dets", str(tmp_path / "dets.json"), "--categories", "people"]) == 2
    assert "unknown category 'people'" in capsys.readouterr().err


def test_bench_and_verify_hand_the_resolved_cell_to_the_detector(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, coco_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detector import api

    calls: list[tuple[str, dict[str, object]]] = []

    def fake_bench(cfg: object, **kw: object) -> dict[str, object]:
        calls.append((cfg.name, kw))
        return {"fps": 1.5, "device": "cpu"}

    def fake_verify(cfg: object, **kw: object) -> dict[str, object]:
        calls.append((cfg.name, kw))
        return {"bbox_mAP": 0.374, "box_ap": 37.4, "eval_split": "val2017", "images": 4}

    monkeypatch.setattr(api, "bench", fake_bench)
    monkeypatch.setattr(api, "verify", fake_verify)
    assert main(["bench", "faster_rcnn_r50_fpn_1x_coco", "--images", "3", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"fps": 1.5, "device": "cpu"}
    ckpt = tmp_path / "r50.pth"
    ckpt.write_bytes(b"x")
    assert main(["verify", R50, "--checkpoint", str(ckpt), "--data", str(coco_root), "--device", "cpu", "--max-images", "4"]) == 0
    assert "37.4" in capsys.readouterr().out
    assert calls[0] == (R50, {"device": "cpu", "images": 3})
    assert calls[1] == (R50, {"checkpoint": ckpt, "data_root": coco_root.resolve(), "device": "cpu", "max_images": 4})


@pytest.mark.parametrize(("box_ap", "images", "code", "verdict"), [
    (37.5, 5000, 0, "pass"), (37.1, 5000, 0, "warn"), (36.0, 5000, 1, "fail"), (36.0, 500, 0, "not comparable"),
])  # fmt: skip
def test_verify_judges_the_checkpoint_against_its_published_row(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, coco_root: Path, monkeypatch: pytest.MonkeyPatch,
    box_ap: float, images: int, code: int, verdict: str,
) -> None:
    """R-50-FPN 1x publishes 37.4: the matrix's AP bands apply over all of val2017, exit 1 on a fail."""
    from detector import api

    per_category = {"person": {"mAP": 0.5, "mAP_50": 0.7}, "toaster": {"mAP": None, "mAP_50": None}}
    monkeypatch.setattr(api, "verify", lambda cfg, **kw: {"box_ap": box_ap, "eval_split": "val2017", "images": images,
                                                          "per_category": per_category})
    ckpt = tmp_path / "r50.pth"
    ckpt.write_bytes(b"x")
    assert main(["verify", R50, "--checkpoint", str(ckpt), "--data", str(coco_root), "--format", "json"]) == code
    out = json.loads(capsys.readouterr().out)
    assert out["published_box_ap"] == 37.4 and out["delta_box_ap"] == round(box_ap - 37.4, 1) and out["verdict"] == verdict
    assert (out["verdict_reason"] is None) == (verdict == "pass")
    assert "per_category" not in out  # only with --classwise
    assert main(["verify", R50, "--checkpoint", str(ckpt), "--data", str(coco_root), "--classwise", "--format", "json"]) == code
    assert json.loads(capsys.readouterr().out)["per_category"] == per_category
    assert main(["verify", R50, "--checkpoint", str(ckpt), "--data", str(coco_root), "--classwise"]) == code
    tail = capsys.readouterr().out.splitlines()[-4:]
    assert [line.split() for line in tail] == [["category", "mAP", "mAP_50"], ["--------", "-----", "------"],
                                               ["person", "0.500", "0.700"], ["toaster", "-", "-"]]  # fmt: skip


TINY = """\
title: tiny
axes:
  backbone: [r50]
profiles:
  tiny:
    extends: smoke
    max_iters: 1
    image_scale: [96, 64]
    eval_max_images: 1
    bench_images: 0
    synth_images: 2
"""


def _tiny(tmp_path: Path) -> list[str]:
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(TINY)
    return [str(matrix), "--profile", "tiny", "--runs-dir", str(tmp_path / "runs")]


def _harness(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.slow
def test_reproduce_one_real_cell_then_the_ledger_skips_it(tmp_path: Path) -> None:
    """End to end with the real detector.run: run + report + compare, then a cached re-run."""
    base = _tiny(tmp_path)
    proc = _harness("reproduce", *base, "--reports-dir", str(tmp_path / "page"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 ok, 0 failed" in proc.stdout and "page: " in proc.stdout and "verdicts: " in proc.stdout
    assert "start   " + R50 in proc.stderr and f"ok      {R50}: " in proc.stderr
    assert "(local, 1 at a time (auto))" in proc.stderr  # the smoke profile's jobs: auto, one cell to run
    cell = tmp_path / "runs" / "tiny" / "tiny" / R50
    result = json.loads((cell / "result.json").read_text())
    assert result["provenance"]["machine"]["cells_at_once"] == 1 and result["provenance"]["start"] == "fork server"
    assert result["status"] == "ok" and result["metrics"]["iters"] == 1 and result["provenance"]["resumed_from_iter"] == 0
    assert result["metrics"]["eval_split"] == "val2017" and (tmp_path / "page" / "README.md").is_file()
    assert (tmp_path / "runs" / "_data" / "synthetic-2-s0" / "annotations" / "instances_train2017.json").is_file()

    again = _harness("run", *base)
    assert again.returncode == 0 and f"done    {R50}" in again.stderr and "start   " not in again.stderr
    assert json.loads((cell / "result.json").read_text()) == result


@pytest.mark.slow
def test_a_cell_forked_by_the_fork_server_equals_one_started_as_a_new_process(tmp_path: Path) -> None:
    """The fork server is a fast path of the cell's start: the same losses at every iteration and the
    same metrics as `HARNESS_FORK_SERVER=0`; only the start-up time and the CPU peak RSS may differ."""
    runs = {}
    for switch, start in (("0", "new process"), ("1", "fork server")):
        where = tmp_path / switch
        where.mkdir()
        matrix = where / "tiny.yaml"
        matrix.write_text(TINY.replace("max_iters: 1", "max_iters: 3\n    workers: 1"))  # a data worker forked by the cell
        proc = _harness("run", str(matrix), "--profile", "tiny", "--runs-dir", str(where / "runs"),
                        env={"HARNESS_FORK_SERVER": switch})  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        cell = where / "runs" / "tiny" / "tiny" / R50
        result = json.loads((cell / "result.json").read_text())
        assert result["status"] == "ok" and result["provenance"]["start"] == start
        log = [{k: v for k, v in json.loads(line).items() if k not in ("time", "data_time", "memory")}
               for line in (cell / "log.jsonl").read_text().splitlines()]  # fmt: skip
        runs[switch] = (result["metrics"], log)
    (plain, plain_log), (forked, forked_log) = runs["0"], runs["1"]
    assert len(plain_log) == 3 and forked_log == plain_log
    for key in ("box_ap", "coco", "first_loss", "final_loss", "iters", "deviations", "threads"):
        assert forked[key] == plain[key], key
    assert plain["phase_s"]["startup"] > 1.0 > forked["phase_s"]["startup"]  # the imports, paid once by the server


@pytest.mark.slow
def test_run_one_real_cell_through_submitit(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    base = _tiny(tmp_path)
    # submitit's own local cluster, never a Slurm the test machine may know (srun/sbatch on PATH would
    # make AutoExecutor submit real jobs from a test).
    proc = _harness("run", *base, "--executor", "submitit", env={"HARNESS_SUBMITIT_CLUSTER": "local"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "runs" / "tiny" / "tiny" / R50 / "result.json").read_text())
    assert result["status"] == "ok" and result["metrics"]["iters"] == 1
    assert any((tmp_path / "runs" / "_submitit" / "tiny" / "tiny").iterdir())  # submitit's own job files


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path: Path) -> None:
    """--nproc-per-cell 2: the cell runs under torchrun (gloo on CPU) and reports world size 2.
    --nnodes 2: two torchrun agents on this host meet through a c10d rendezvous: world size 2, and
    the same metrics as the one node of two processes."""
    for x in "ab":
        (tmp_path / x).mkdir()
    nodes = _harness("run", *_tiny(tmp_path / "a"), "--nnodes", "2")
    assert nodes.returncode == 0, nodes.stdout + nodes.stderr
    single = _harness("run", *_tiny(tmp_path / "b"), "--nproc-per-cell", "2")
    assert single.returncode == 0, single.stdout + single.stderr
    a, b = (json.loads((tmp_path / x / "runs" / "tiny" / "tiny" / R50 / "result.json").read_text()) for x in "ab")
    for r in (a, b):
        assert r["status"] == "ok" and r["provenance"]["world_size"] == 2 and r["metrics"]["total_batch"] == 4
    assert (tmp_path / "a" / "runs" / "tiny" / "tiny" / R50 / "stdout.node1.txt").is_file()  # the second agent
    for key in ("box_ap", "coco", "first_loss", "final_loss", "iters", "world_size"):
        assert a["metrics"][key] == b["metrics"][key], key


@pytest.mark.slow
def test_images_per_gpu_overrides_the_profile_and_is_recorded(tmp_path: Path) -> None:
    proc = _harness("run", *_tiny(tmp_path), "--images-per-gpu", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "runs" / "tiny" / "tiny" / R50 / "result.json").read_text())
    assert result["metrics"]["images_per_gpu"] == 1 and result["metrics"]["total_batch"] == 1
    assert any("1 process(es) x 1 images = total batch 1" in d for d in result["metrics"]["deviations"])


def test_every_option_and_argument_has_help_text() -> None:
    import argparse

    from harness.parser import build_parser

    def walk(parser: argparse.ArgumentParser, where: str) -> list[str]:
        bare: list[str] = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    bare += walk(sub, f"{where} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
                bare.append(f"{where}: {action.option_strings or action.dest}")
        return bare

    assert walk(build_parser(), "harness") == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("harness ")


def test_full_profile_refuses_random_init_before_anything_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, coco_root: Path
) -> None:
    argv = ["run", "faster_rcnn", "--profile", "full", "--data", str(coco_root), "--runs-dir", str(tmp_path),
            "--only", "faster-rcnn_r50_fpn_1x_coco", "faster-rcnn_r50-caffe_fpn_1x_coco"]  # fmt: skip
    line = _error_line(capsys, argv)
    assert "torchvision://resnet50 (file resnet50-0676ba61.pth)" in line and "--allow-random-init" in line
    assert "open-mmlab://detectron2/resnet50_caffe (file resnet50_msra-5891d200.pth)" in line
    assert not any(tmp_path.iterdir())
    # A folder that lacks the expected file is refused too, naming the file.
    line = _error_line(capsys, [*argv, "--pretrained", f"torchvision://resnet50={tmp_path}"])
    assert "resnet50-0676ba61.pth" in line


def test_verify_accepts_a_val_only_root(tmp_path: Path) -> None:
    from harness.errors import UserError
    from harness.execute.data_root import check_coco_root

    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    (tmp_path / "val2017").mkdir()
    assert check_coco_root(tmp_path, "--data", need="eval") == tmp_path.resolve()
    with pytest.raises(UserError, match="missing annotations/instances_train2017.json and train2017/"):
        check_coco_root(tmp_path, "--data")
