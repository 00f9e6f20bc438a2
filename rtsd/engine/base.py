"""The Engine protocol: what the runtime needs from any backend (ONNX Runtime, TensorRT).

Lifecycle: a Backend loads all engines of an engine directory at once (so TensorRT engines can share one activation
memory block) -> ``allocate`` reserves buffers for the largest shapes a generation will use -> ``infer`` runs one call.

``infer`` takes and returns arrays of the engine's own array module ``xp``: NumPy for ONNX Runtime on the CPU,
CuPy device arrays for TensorRT, so a generation's latents can stay on the device between calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from types import ModuleType
from typing import Any, Mapping, Protocol, runtime_checkable

from rtsd.export.manifest import Manifest
from rtsd.export.specs import IOSpec


class Engine(Protocol):
    name: str
    spec: IOSpec
    xp: ModuleType  # numpy or cupy: the array namespace of infer()'s inputs and outputs

    def allocate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Reserve buffers for every tensor at these (largest) shapes; later calls up to them allocate nothing."""

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run one call; feeds are validated against ``spec`` (names, dtypes, shapes) before anything runs."""

    def to_host(self, array: Any) -> "np.ndarray":
        """Copy one of this engine's arrays to a host NumPy array (a no-op for host backends)."""

    def synchronize(self) -> None:
        """Wait until queued work is done (a no-op for synchronous backends); used for honest stage timings."""

    def close(self) -> None:
        """Release device memory and sessions."""


@runtime_checkable
class Backend(Protocol):
    name: str  # "onnxruntime" | "tensorrt"

    def load(self, engine_dir: Path, manifest: Manifest, components: tuple[str, ...]) -> dict[str, Engine]:
        """Open the named components' engines from ``engine_dir``; raise EngineDirError if they are missing/stale."""
