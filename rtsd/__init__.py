"""rtsd: a lean, fast inference runtime for Stable Diffusion.

``import rtsd`` is torch-free; the PyTorch reference models and exporters are imported lazily.
"""

from rtsd.errors import RtsdError

__version__ = "0.1.0"

__all__ = ["Runtime", "RtsdError", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import rtsd` stays cheap and never imports onnxruntime/tensorrt until a Runtime is made.
    if name == "Runtime":
        from rtsd.runtime import Runtime

        return Runtime
    raise AttributeError(f"module 'rtsd' has no attribute {name!r}")
