"""Declare a matrix of Faster R-CNN cells, run it, compare with the published table, publish the page."""

__version__ = "0.1.0"
