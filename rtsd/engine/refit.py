"""TensorRT refit: new weights into a deserialized refittable plan, in place, without a rebuild (TensorRT 10 API).

Plans are built refittable by ``rtsd export --backend tensorrt --refittable``: REFIT_INDIVIDUAL with exactly the
weights map's initializers marked refittable (``INetworkDefinition.mark_weights_refittable``), so the builder keeps
its freedom (fusions, constant folding) for every other weight and only LoRA-addressable weights pay for refit.
The ONNX parser names a network's weights after the ONNX initializers, so the weights map's initializer names are
the refitter's names too.

``refit_engine`` hands the refitter one array per changed weight (``set_named_weights``), checks
``get_missing_weights`` (a weight TensorRT needs together with one that changed, e.g. fused into the same kernel,
must be supplied as well: the caller gets one clear error naming it), and runs ``refit_cuda_engine``. The caller
drops captured CUDA graphs afterwards (they may have baked in the old weight addresses).

The merge runs on the host in NumPy (the same float32 merge as ONNX Runtime); refit copies the result to the device.
Written against TensorRT 10's Python API and tested with a stand-in (tests/tensorrt_refit_sim.py); it has not run
on a real TensorRT here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from rtsd.errors import EngineDirError

if TYPE_CHECKING:  # TensorRT 10's published stubs (pip install tensorrt-stubs): pyright checks every call below
    import tensorrt as trt_types


def mark_refittable(trt: Any, network: "trt_types.INetworkDefinition", config: "trt_types.IBuilderConfig",
                    names: Iterable[str]) -> bool:
    """Builder side: make exactly ``names`` refittable (REFIT_INDIVIDUAL); False when there are none."""
    names = list(names)
    if not names:
        return False
    flag: trt_types.BuilderFlag = trt.BuilderFlag.REFIT_INDIVIDUAL
    config.set_flag(flag)
    for name in names:
        if not network.mark_weights_refittable(name):
            raise EngineDirError(f"TensorRT found no weights named {name} in the parsed network; re-export")
    return True


def refit_engine(trt: Any, engine: "trt_types.ICudaEngine", logger: "trt_types.ILogger",
                 weights: Mapping[str, np.ndarray]) -> None:
    """Replace the named weights of ``engine`` (an ICudaEngine built refittable) with ``weights`` (host arrays)."""
    if not engine.refittable:
        raise EngineDirError("this TensorRT plan is not refittable, so its LoRAs cannot change; re-export with "
                             "`rtsd export --backend tensorrt --refittable` (or bake them in: --lora FILE:SCALE)")
    refitter: trt_types.Refitter = trt.Refitter(engine, logger)
    keep = []  # TensorRT reads the host memory during refit_cuda_engine: keep every array alive until then
    for name, array in weights.items():
        array = np.ascontiguousarray(array)
        keep.append(array)
        values: trt_types.Weights = trt.Weights(array)
        if not refitter.set_named_weights(name, values):
            raise EngineDirError(f"TensorRT refused new values for weight {name} (shape {list(array.shape)}, "
                                 f"{array.dtype}); the plan and the weights map disagree: re-export")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise EngineDirError(f"TensorRT needs {len(missing)} more weight(s) to refit ({', '.join(missing[:3])}); "
                             f"they are not LoRA-addressable in the weights map: re-export with this rtsd")
    if not refitter.refit_cuda_engine():
        raise EngineDirError("TensorRT could not refit the plan (see its log); re-export with --refittable")
    del keep


if TYPE_CHECKING:
    def _module_surface(engine: trt_types.ICudaEngine, logger: trt_types.ILogger, array: np.ndarray) -> None:
        """What ``trt`` (the lazily imported module) is called with above, spelled against the stubs."""
        trt_types.Refitter(engine, logger)
        trt_types.Weights(array)
        trt_types.BuilderFlag.REFIT_INDIVIDUAL
