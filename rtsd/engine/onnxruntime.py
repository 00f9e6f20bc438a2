"""ONNX Runtime backend: CPU execution provider, or CUDA when onnxruntime-gpu is installed and a GPU is visible."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from rtsd.errors import EngineDirError, MissingDependencyError
from rtsd.export.manifest import Manifest
from rtsd.export.specs import IOSpec


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", "onnx", "The ONNX Runtime backend") from None
    return onnxruntime


class OnnxRuntimeEngine:
    """One ONNX Runtime session for one sub-model; inputs are validated against the spec before the session runs."""

    xp = np

    def __init__(self, name: str, path: Path, spec: IOSpec, providers: list[str], threads: int | None = None,
                 session_config: Mapping[str, str] | None = None):
        self.name, self.spec = name, spec
        self._open = (path, providers, threads, dict(session_config or {}))
        self.session = self._session({})
        self._outputs = [t.name for t in spec.outputs]

    def _session(self, initializers: Mapping[str, np.ndarray]):
        ort = _ort()
        path, providers, threads, session_config = self._open
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        for key, value in session_config.items():
            options.add_session_config_entry(key, value)
        if initializers:  # LoRA switching (engine/weights.py): these replace the file's initializers of that name
            # add_external_initializers, not add_initializer: ORT applies the latter after its NCHWc layout pass has
            # already copied conv weights, so conv updates were silently lost. The mapped weights are all external.
            self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in initializers.values()]  # must outlive it
            options.add_external_initializers(list(initializers), self._values)
        try:
            return ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
            raise EngineDirError(f"cannot load {path}: {str(exc).splitlines()[0]}; re-export the engine directory") from None

    def reload(self, initializers: Mapping[str, np.ndarray]) -> None:
        """Recreate the session from the same file with ``initializers`` supplied from memory ({} = the file's)."""
        self.session = None  # release the old session's weights before the new one loads
        self.session = self._session(initializers)

    def allocate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """ONNX Runtime manages its own arena; nothing to reserve."""

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.spec.validate(feeds)
        results = self.session.run(self._outputs, dict(feeds))
        return dict(zip(self._outputs, results))

    def to_host(self, array) -> np.ndarray:
        return array

    def synchronize(self) -> None:
        """Session.run is synchronous."""

    def close(self) -> None:
        self.session = None


# Worker threads that spin between the (long) SD operators only steal the cores the next operator needs: measured
# on 2 cores, identical UNet calls took 2.7 s or 5.7 s with spinning and 2.5 s +-6% without (benchmarks/README.md).
CPU_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, providers: list[str] | None = None, threads: int | None = None,
                 session_config: Mapping[str, str] | None = None):
        """providers: default CUDA when onnxruntime-gpu sees a GPU, else CPU. threads: intra-op threads (default
        RTSD_ORT_THREADS or all cores). session_config: ONNX Runtime session config entries (CPU default:
        CPU_SESSION_CONFIG)."""
        ort = _ort()
        available = ort.get_available_providers()
        self.providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.threads = threads or int(os.environ.get("RTSD_ORT_THREADS", "0")) or None
        self.session_config = dict(CPU_SESSION_CONFIG if self.device == "cpu" else {}, **(session_config or {}))

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def load(self, engine_dir: Path, manifest: Manifest, components: tuple[str, ...]) -> dict[str, OnnxRuntimeEngine]:
        return {name: OnnxRuntimeEngine(name, manifest.onnx_path(engine_dir, name), manifest.spec(name),
                                        self.providers, self.threads, self.session_config)
                for name in components}
