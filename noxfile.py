"""Sessions: `nox -s tests`, `nox -s reproduce -- faster_rcnn`, `nox -s regression`, `nox -s bench`.

uv installs the torch / torchvision pair from the registry (it ignores a stray local CPU torch wheel
that breaks torchvision's ops) and the environments are reused between runs.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

PYTHON = os.environ.get("HARNESS_NOX_PYTHON") or None


def _install(session: nox.Session, *groups: str) -> None:
    """Install the project (editable) and the named dependency groups.

    uv compiles the installed packages to bytecode: every cell of a matrix is its own Python process,
    and where `PYTHONDONTWRITEBYTECODE` is set (this machine sets it) an uncompiled torch +
    torchvision costs each of them ~3 s of `compile()` at import (5.4 s -> 2.4 s measured on 2 cores).
    """
    args = ["-e", "."]
    for group in groups:
        args += ["--group", group]
    session.install(*args, env={"UV_COMPILE_BYTECODE": "1"})


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite on CPU."""
    _install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def reproduce(session: nox.Session) -> None:
    """Run a matrix, regenerate its page and print the comparison: `nox -s reproduce -- faster_rcnn`."""
    _install(session)
    args = session.posargs or ["faster_rcnn"]
    session.run("harness", "reproduce", *args)


@nox.session(python=PYTHON)
def regression(session: nox.Session) -> None:
    """CI regression on small COCO subsets against `matrices/baselines/`."""
    _install(session)
    session.run("harness", "regression", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Our detector side by side with torchvision's: writes reports/bench.json and benchmarks.md."""
    _install(session)
    # By default also the ablation and the operator profile that reports/benchmarks.md discusses
    # (about 10 minutes on 2 cores); any arguments replace these (e.g. `-- --pairs 3`).
    session.run("python", "-m", "detector.bench_vs_torchvision", *(session.posargs or ["--ablation", "--profile"]))
