"""The bundled Faster R-CNN: torch + torchvision ops, recipes faithful to MMDetection's model zoo."""

__version__ = "0.1.0"
