"""Sessions: `nox -s tests`, `nox -s lint`, `nox -s reproduce -- faster_rcnn`, `nox -s regression`, `nox -s bench`,
`nox -s tests-oldest` (the oldest supported torch / torchvision pair), `nox -s slurm` (a real single-node Slurm),
`nox -s parity` (every cell against MMDetection 3.3.0's own model).

uv installs the torch / torchvision pair from the registry (it ignores a stray local CPU torch wheel
that breaks torchvision's ops) and the environments are reused between runs. `pip install "nox[uv]"`
brings both; without uv the sessions stop with one line saying so (pip's resolver would pick that
stray wheel on some machines, so there is deliberately no virtualenv fallback).
"""

from __future__ import annotations

import os
import shutil
import sys

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

PYTHON = os.environ.get("HARNESS_NOX_PYTHON") or None
# The oldest pair the project supports, and the lower bound in pyproject.toml: `nox -s tests-oldest`
# proves it in CI. It is also the GPU machine's pair (../shared/GPU.md).
OLDEST = ("torch==2.11.0", "torchvision==0.26.0")


def _have_uv() -> bool:
    try:
        import uv  # noqa: F401 - the `nox[uv]` extra ships the binary as a Python package

        return True
    except ImportError:
        return shutil.which("uv") is not None


if not _have_uv():
    sys.exit('nox: this project\'s sessions need uv: pip install "nox[uv]" (or pip install uv), then run nox again')


def _install(session: nox.Session, *groups: str, extras: str = "", pins: tuple[str, ...] = ()) -> None:
    """Install the project (editable), its `extras`, the named dependency groups and any `pins`.

    The first install downloads torch with its CUDA libraries from the registry (about 3 GB, ~5.5 GB
    on disk); uv says nothing while it downloads, so we say it once here.

    uv compiles the installed packages to bytecode: every cell of a matrix is its own Python process,
    and where `PYTHONDONTWRITEBYTECODE` is set (this machine sets it) an uncompiled torch +
    torchvision costs each of them ~3 s of `compile()` at import (5.4 s -> 2.4 s measured on 2 cores).
    """
    marker = os.path.join(session.virtualenv.location, ".harness-installed")
    if not os.path.exists(marker):
        session.log("first install of this environment: torch + torchvision with their CUDA libraries, about "
                    "3 GB to download (README: 'Install size'); later runs reuse it")
    args = ["-e", f".[{extras}]" if extras else "."]
    for group in groups:
        args += ["--group", group]
    session.install(*args, *pins, env={"UV_COMPILE_BYTECODE": "1"})
    with open(marker, "w"):
        pass


def _pytest_args(posargs: list[str]) -> list[str]:
    """The suite spread over one pytest-xdist worker per core, at most 8 (each worker imports torch:
    ~0.5 GB), unless the arguments choose (`-n 0` runs it in one process). 2 cores: about 4 minutes
    against about 6.5 in one process."""
    if any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in posargs):
        return posargs
    return ["-n", str(min(8, os.cpu_count() or 1)), *posargs]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite on CPU."""
    _install(session, "test")
    session.run("pytest", *_pytest_args(session.posargs))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (pyflakes, import order, bugbear, pyupgrade) on the tree and mypy on both packages."""
    _install(session, "lint")
    session.run("ruff", "check", "harness", "detector", "tests", "scripts", "noxfile.py")
    session.run("mypy")


@nox.session(python=PYTHON, name="tests-oldest")
def tests_oldest(session: nox.Session) -> None:
    """The test suite on the oldest supported torch / torchvision pair (pyproject's lower bound)."""
    _install(session, "test", pins=OLDEST)
    session.run("python", "-c", "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)")
    session.run("pytest", *_pytest_args(session.posargs))


@nox.session(python=PYTHON)
def reproduce(session: nox.Session) -> None:
    """Run a matrix, regenerate its page and print the comparison: `nox -s reproduce -- faster_rcnn`."""
    _install(session, extras="cluster")  # so that `--executor submitit` works here too
    args = session.posargs or ["faster_rcnn"]
    session.run("harness", "reproduce", *args)


@nox.session(python=PYTHON)
def regression(session: nox.Session) -> None:
    """CI regression on small COCO subsets against `matrices/baselines/`."""
    _install(session)
    session.run("harness", "regression", *session.posargs)


SLURM_CELLS = "faster-rcnn_r50_fpn_*iou*"  # three smoke cells, about a minute in all


@nox.session(python=PYTHON)
def slurm(session: nox.Session) -> None:
    """`harness run --executor submitit` through a real single-node Slurm on this host (sbatch, slurmctld,
    slurmd, munge), checked against the same cells run locally: identical metrics. Needs root; as root it
    installs Debian's slurm-wlm and munge with apt when they are missing."""
    import tempfile

    _install(session, extras="cluster")
    # Debian installs the daemons (munged, slurmctld, slurmd) in /usr/sbin, which a user's or a CI
    # runner's PATH may lack: look there too, for this check and for the scripts below.
    path = os.environ.get("PATH", "").split(os.pathsep)
    path += [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in path]
    session.env["PATH"] = os.pathsep.join(path)
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b, path=session.env["PATH"]) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        session.log(f"slurm: installing slurm-wlm and munge with apt (missing: {', '.join(missing)})")
        session.run("apt-get", "update", "-qq", external=True)
        session.run("apt-get", "install", "-y", "-qq", "slurm-wlm", "munge", external=True,
                    env={"DEBIAN_FRONTEND": "noninteractive"})
    elif missing:
        session.error(f"slurm: missing {', '.join(missing)}; as root: apt-get install slurm-wlm munge (the session "
                      "starts its own single-node cluster and needs root for its daemons)")
    work = tempfile.mkdtemp(prefix="harness-slurm-")
    session.run("bash", "scripts/slurm_cluster.sh", "start", work, external=True)
    try:
        common = ("harness", "run", "faster_rcnn", "--profile", "smoke", "--only", SLURM_CELLS, "--jobs", "3")
        session.run(*common, "--executor", "submitit", "--runs-dir", f"{work}/slurm",
                    env={"SLURM_CONF": f"{work}/slurm.conf", "HARNESS_SUBMITIT_CLUSTER": "slurm"})
        session.run(*common, "--runs-dir", f"{work}/local")
        session.run("python", "scripts/slurm_check.py", f"{work}/slurm", f"{work}/local")
        # Preemption: a training cell gets Slurm's pre-preemption signal, checkpoints, is requeued and
        # resumes, ending identical to the uninterrupted local run.
        session.run("python", "scripts/slurm_preempt.py", work, f"{work}/local",
                    env={"SLURM_CONF": f"{work}/slurm.conf"})
    finally:
        session.run("bash", "scripts/slurm_cluster.sh", "stop", work, external=True)


MMDETECTION = ("mmdet==3.3.0", "mmengine==0.10.7", "mmcv-lite==2.1.0")


@nox.session(python=PYTHON)
def parity(session: nox.Session) -> None:
    """Every cell against MMDetection 3.3.0's own model (reports/parity.md): `nox -s parity`, or a few
    cells: `nox -s parity -- faster_rcnn --only 'faster-rcnn_r50_fpn_*'` (written to runs/parity/)."""
    _install(session, "parity")
    session.install("--no-deps", *MMDETECTION)  # why --no-deps: pyproject.toml, the `parity` group
    # Full-scale CPU passes: torch's allocator asks for transparent huge pages (2 MB) for its large
    # tensors. Measured on 2 cores, one R-50-FPN cell: 58 s -> 50 s, system time 30 s -> 14 s (a 4 KB
    # page fault for every page of every fresh 60 MB feature map), peak memory unchanged. Linux only;
    # the numbers computed are the same.
    session.run("harness", "parity", *(session.posargs or ["faster_rcnn", "--reports-dir", "reports"]),
                env={"THP_MEM_ALLOC_ENABLE": "1"})


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Our detector side by side with torchvision's: writes reports/bench.json and benchmarks.md."""
    _install(session)
    # By default also the ablation and the operator profile that reports/benchmarks.md discusses
    # (about 10 minutes on 2 cores); any arguments replace these (e.g. `-- --pairs 3`).
    session.run("python", "-m", "detector.bench.vs_torchvision", *(session.posargs or ["--ablation", "--profile"]))
