"""`harness baseline update`: run the regression checks and store their metrics, on purpose.

The checks are `harness.regression.check`'s (planned and run the same way); what this adds is the
refusal to store numbers that must not become the reference, and the provenance written with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from harness.execute import machine
from harness.regression import check as regression
from harness.regression.baselines import default_path, load_spec, write_baseline
from harness.regression.judge import fingerprint, judge_checks, portable_spec_hash, print_judgement


def update_baselines(*, matrix: str = "faster_rcnn", data: str | None = None, only: Sequence[str] = (),
                     runs_dir: Path | None = None, device: str | None = None, baselines: Path | None = None,
                     command: str = "harness baseline update", log: Callable[[str], None] | None = None) -> int:  # fmt: skip
    """`harness baseline update`: run the checks and store their metrics with provenance, on purpose.

    Refuses (exit 1, file untouched) when a cell fails, when the overfit check misses its floor or
    when the determinism check finds two runs differ: such numbers must not become the reference.
    """
    from harness.execute.provenance import base_provenance, now_iso
    from harness.matrix.spec import repo_root

    say = log or regression.log_stderr
    path = Path(baselines or default_path(matrix))
    spec = load_spec(path)
    device = regression.pick_device(device)
    data_root = regression.resolve_data(data, ci=True, log=say) if regression.needs_data(spec, only) else None
    runs = Path(runs_dir) if runs_dir else repo_root() / "runs"
    checks = regression.plan_checks(spec, data_root=data_root, runs_dir=runs, device=device, only=only, log=say)
    outcome = regression.execute(spec, checks, device=device, log=say)
    dclass = regression.device_class_of(device)
    # Judge without baselines: cells must succeed, the overfit floor and determinism must hold.
    verdict = judge_checks(dataclasses.replace(spec, baselines={}), checks, outcome, device_class=dclass, data_missing=False,
                    need_baseline=False)  # fmt: skip
    if not verdict.passed:
        print_judgement(verdict, spec, checks, device_class=dclass)
        say(f"baseline update refused: {path} is unchanged")
        return 1
    prov = base_provenance(include_host=False)
    old = spec.baselines.get(dclass) or {}
    entry_checks = dict(old.get("checks") or {}) if only else {}
    for check in checks:
        if check.kind == "rerun":
            continue
        run = check.job.spec["run"]
        entry_checks[check.id] = {
            "updated_at": now_iso(), "git_commit": prov["git_commit"], "seed": run["seed"], "iters": run["max_iters"],
            "image_scale": list(run["image_scale"]), "spec_sha256": portable_spec_hash(check.job.spec),
            "data": fingerprint(Path(run["data_root"]), run["train_ann"]),
            "metrics": outcome[check.id]["metrics"],
        }  # fmt: skip
    entry = {
        "provenance": {
            "git_commit": prov["git_commit"], "git_dirty": prov["git_dirty"], "versions": prov["versions"],
            "device": device, "device_class": dclass, "cpu": machine.cpu_model(), "threads_per_cell": spec.threads,
            "machine": machine.fingerprint(threads=spec.threads) if device == "cpu" else None,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "updated_at": now_iso(),
            "command": command,
        },
        "checks": dict(sorted(entry_checks.items())),
    }  # fmt: skip
    write_baseline(path, dclass, entry)
    stored = sum(c.kind != "rerun" for c in checks)
    held = " (the determinism check held)" if any(c.kind == "rerun" for c in checks) else ""
    say(f"baselines for {dclass}: {stored} checks written to {path}{held} (commit {prov['git_commit'][:12]}"
        f"{', dirty tree' if prov['git_dirty'] else ''})")  # fmt: skip
    return 0


__all__ = ["update_baselines"]
