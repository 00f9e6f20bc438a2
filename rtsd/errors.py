"""User-facing error types. The CLI turns any of these into one line on stderr and exit status 2."""


class RtsdError(Exception):
    """Base class for errors caused by user input (paths, files, options), not by bugs."""


class CheckpointError(RtsdError, ValueError):
    """A checkpoint file that cannot be read: missing, truncated, corrupt, unsafe pickle, wrong keys."""


class UnsupportedModelError(RtsdError, ValueError):
    """A readable checkpoint of an architecture rtsd does not support (yet)."""


class EngineDirError(RtsdError, ValueError):
    """An engine directory that is missing files, has an unknown format version, or stale engines."""


class NonFiniteOutputError(RtsdError, FloatingPointError):
    """An engine returned inf/NaN (fp16 overflow); writing it out would give a black or noisy image."""


class MissingDependencyError(RtsdError, ImportError):
    """An optional dependency (torch, onnx, onnxruntime, tensorrt, ...) is needed for this path."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(f"{purpose} needs '{package}', which is not installed: pip install 'rtsd[{extra}]'")
        self.package = package
        self.extra = extra
