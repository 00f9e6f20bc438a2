"""Checkpoint -> ONNX -> TensorRT. Importing this package is cheap; torch/onnx are imported where they are used."""

from rtsd.export.specs import COMPONENTS, IOSpec, ShapeRange, TensorSpec, specs_for

__all__ = ["COMPONENTS", "IOSpec", "ShapeRange", "TensorSpec", "specs_for", "export"]


def __getattr__(name: str):
    if name == "export":
        from rtsd.export.pipeline import export

        return export
    raise AttributeError(name)
