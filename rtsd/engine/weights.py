"""Switch the LoRAs of loaded engines through the manifest's weights map: no re-export, no TensorRT rebuild.

For each LoRA-touched checkpoint key the map names the ONNX initializer, its layout change, and where its base
values lie in the component's ``.onnx.data`` file. A switch reads those base values, merges the new set in float32
(lora.merged), converts to the initializer's layout and dtype, and hands ``{initializer: array}`` to the engine:

- ONNX Runtime: the touched sessions are recreated with these initializers supplied from memory
  (``SessionOptions.add_external_initializers``); the files on disk never change, and ``{}`` recreates them from the files
  alone, i.e. exactly the base weights.
- TensorRT: the plan is refitted in place (engine/refit.py): every weight the new set changes, plus the base
  values of those the previous set changed and the new one does not.

NumPy only (torch-free).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rtsd.adapters.lora import LoraError, LoraFile, merged, read_lora, stack_deltas
from rtsd.adapters.lora_keys import lora_table
from rtsd.errors import EngineDirError
from rtsd.export.manifest import Manifest
from rtsd.export.weights_map import from_initializer, to_initializer

LORA_COMPONENTS = ("unet", "text_encoder")
SHA_PREFIX = 12  # characters of a LoRA's sha256 shown in PNG metadata / GenerationResult.parameters


class LoraSwitcher:
    """The LoRA set an engine directory's loaded engines run with; ``switch`` changes it."""

    def __init__(self, engine_dir: Path, manifest: Manifest, backend: str):
        self.engine_dir, self.manifest, self.backend = Path(engine_dir), manifest, backend
        self.maps = {c: manifest.components[c].get("weights_map") for c in LORA_COMPONENTS}
        self.current: dict[str, float] = {}
        self.records: list[dict[str, Any]] = []
        self.applied: dict[str, dict[str, str]] = {c: {} for c in LORA_COMPONENTS}  # initializer -> ldm key
        self.timings: dict[str, float] = {}
        self._files: dict[tuple, LoraFile] = {}
        self._table = None

    def switch(self, engines: Mapping[str, Any], loras: Mapping[str | Path, float]) -> bool:
        """Run with ``loras`` ({path: scale}) from now on; False when that is already the set (nothing done)."""
        wanted = _normalized(loras)
        if wanted == self.current:
            return False
        self._require_map()
        timings = {}
        t0 = time.perf_counter()
        files = [(self._read(path), scale) for path, scale in wanted.items()]
        timings["read"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_key = stack_deltas(files, self.table(), self.manifest.model.family)  # raises before anything changes
        timings["deltas"] = time.perf_counter() - t0  # matching + the up @ down products
        t0 = time.perf_counter()
        new: dict[str, dict[str, np.ndarray]] = {c: {} for c in LORA_COMPONENTS}
        keys: dict[str, dict[str, str]] = {c: {} for c in LORA_COMPONENTS}
        for key, deltas in per_key.items():
            component, entry = self._entry(key)
            if entry is None:
                continue  # a weight this engine never reads (SD 2.x's last text layer)
            new[component][entry["initializer"]] = to_initializer(entry, merged(self._base(component, entry), deltas))
            keys[component][entry["initializer"]] = key
        timings["merge"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for component in LORA_COMPONENTS:
            if not new[component] and not self.applied[component]:
                continue  # untouched before and after: the session / plan stays as it is
            restore = {name: self._base_initializer(component, key)
                       for name, key in self.applied[component].items() if name not in new[component]}
            apply_weights(engines[component], self.backend, new[component], restore)
            self.applied[component] = keys[component]
        timings["apply"] = time.perf_counter() - t0
        self.current, self.timings = wanted, timings
        self.records = [{"name": f.name, "sha256": f.sha256[:SHA_PREFIX], "scale": s} for f, s in files]
        return True

    def table(self):
        if self._table is None:
            shapes = {}
            for weights_map in self.maps.values():
                shapes.update({k: tuple(e["source_shape"]) for k, e in weights_map["weights"].items()})
                shapes.update({k: tuple(s) for k, s in weights_map.get("unused", {}).items()})
            self._table = lora_table(shapes, self.manifest.model.unet.num_res_blocks)
        return self._table

    def _require_map(self) -> None:
        if not all(self.maps.values()):
            raise EngineDirError(f"{self.engine_dir} has no weights map (exported by an older rtsd, format_version "
                                 f"{self.manifest.format_version}), so it cannot switch LoRAs; re-export it with "
                                 f"this rtsd (`rtsd export --checkpoint CKPT --output {self.engine_dir} --force`)")

    def _entry(self, key: str) -> tuple[str, dict | None]:
        for component, weights_map in self.maps.items():
            if key in weights_map["weights"]:
                return component, weights_map["weights"][key]
        return "", None

    def _read(self, path: str) -> LoraFile:
        stat = Path(path).stat() if Path(path).is_file() else None
        if stat is None:
            raise LoraError(f"LoRA file {path} does not exist")
        cache_key = (path, stat.st_mtime_ns, stat.st_size)
        if cache_key not in self._files:
            self._files[cache_key] = read_lora(path)
        return self._files[cache_key]

    def _raw(self, component: str, entry: Mapping) -> np.ndarray:
        data = self.engine_dir / self.maps[component]["data_file"]
        dtype = np.dtype(entry["dtype"])
        with open(data, "rb") as handle:
            handle.seek(entry["offset"])
            raw = np.frombuffer(handle.read(entry["length"]), dtype=dtype)
        return raw.reshape(entry["shape"])

    def _base(self, component: str, entry: Mapping) -> np.ndarray:
        """The base weight in the checkpoint's layout, float32, from the exported data file."""
        return from_initializer(entry, self._raw(component, entry))

    def _base_initializer(self, component: str, key: str) -> np.ndarray:
        entry = self.maps[component]["weights"][key]
        return np.ascontiguousarray(self._raw(component, entry))


def apply_weights(engine, backend: str, new: Mapping[str, np.ndarray], restore: Mapping[str, np.ndarray]) -> None:
    """Give ``engine`` the merged initializers ``new``; ``restore`` holds base values for ones it had changed."""
    if backend == "onnxruntime":
        engine.reload(new)  # a session from the file with only ``new`` replaced: the rest is base by construction
    elif backend == "tensorrt":
        engine.refit({**restore, **new})
    else:
        raise LoraError(f"the {backend} backend cannot switch LoRAs; use an engine directory (ONNX Runtime or "
                        f"TensorRT)")


def _normalized(loras: Mapping[str | Path, float]) -> dict[str, float]:
    if not isinstance(loras, Mapping):
        raise TypeError(f"loras must be a mapping {{path: scale}}, got {type(loras).__name__}")
    out = {}
    for path, scale in loras.items():
        if not isinstance(scale, (int, float)) or not np.isfinite(scale):
            raise ValueError(f"LoRA {path}: scale must be a finite number, got {scale!r}")
        if scale != 0:
            out[str(Path(path))] = float(scale)
    return out
