"""Numerical parity of the bundled detector with MMDetection 3.3.0's own model (`nox -s parity`).

Needs the `parity` dependency group (mmdet, mmengine, mmcv-lite); nothing else in the project
imports this package.
"""
