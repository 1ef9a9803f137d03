"""`detector.api`, the harness's one door: every name resolves, importing it stays light."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from detector import api
from detector.config import DetectorConfig


def test_every_public_name_resolves() -> None:
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        api.nope  # noqa: B018


def test_importing_the_door_does_not_import_torch() -> None:
    code = "import sys, detector.api; print('torch' in sys.modules, 'pycocotools' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_cannot_build_leaves_other_errors_to_the_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    import detector.model.faster_rcnn

    cfg = DetectorConfig()
    assert api.cannot_build(cfg) is None
    monkeypatch.setattr(detector.model.faster_rcnn, "build_detector", lambda cfg: (_ for _ in ()).throw(RuntimeError("meta")))
    assert api.cannot_build(cfg) is None
    bad = dataclasses.replace(cfg, name="x")
    monkeypatch.setattr(detector.model.faster_rcnn, "build_detector", lambda cfg: (_ for _ in ()).throw(NotImplementedError("x")))
    assert "NotImplementedError: x" in str(api.cannot_build(bad))
