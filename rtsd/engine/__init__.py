"""Inference backends. ``best_backend`` picks TensorRT when it and a GPU are usable, else ONNX Runtime."""

from __future__ import annotations

from rtsd.errors import MissingDependencyError, RtsdError

BACKENDS = ("tensorrt", "onnxruntime")


def get_backend(name: str | None = None):
    """The backend object for ``name`` (None = best available); one clear error when it cannot run here."""
    if name is None:
        return best_backend()
    if name == "onnxruntime":
        from rtsd.engine.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend()
    if name == "tensorrt":
        from rtsd.engine.tensorrt import TensorRTBackend

        return TensorRTBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def best_backend():
    for name in BACKENDS:
        try:
            return get_backend(name)
        except (MissingDependencyError, RtsdError):
            continue
    raise MissingDependencyError("onnxruntime", "onnx", "running engines")
