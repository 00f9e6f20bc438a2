"""The PyTorch reference models behind the Engine protocol.

Not a production backend: it lets the very same generation loop run on the reference (fp32 on the CPU, fp16 on
CUDA), which makes it the oracle for end-to-end parity and the "PyTorch reference" baseline in benchmarks.
Tensors stay on the models' device between calls; I/O dtypes follow the spec (float32 latents), the models run in
their own dtype.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from rtsd.export.onnx import component_module
from rtsd.export.specs import COMPONENTS, specs_for


class TorchArrays:
    """The few array-module functions the runtime loop uses, bound to one torch device."""

    float32 = torch.float32

    def __init__(self, device: torch.device):
        self.device = device

    def asarray(self, array) -> torch.Tensor:
        return torch.as_tensor(array, device=self.device)

    def concatenate(self, arrays, axis: int = 0) -> torch.Tensor:
        return torch.cat(list(arrays), dim=axis)

    def full(self, shape, value, dtype=torch.float32) -> torch.Tensor:
        return torch.full(shape, value, dtype=dtype, device=self.device)


class TorchEngine:
    def __init__(self, name: str, models, xp: TorchArrays, shape_range=None):
        self.name, self.xp = name, xp
        self.spec = specs_for(models.config, shape_range)[name]
        self.module = component_module(models, name)
        self.dtype = next(self.module.parameters()).dtype

    def allocate(self, shapes) -> None:
        """The caching allocator of torch reserves memory itself."""

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        args = []
        for t in self.spec.inputs:
            value = self.xp.asarray(feeds[t.name])
            args.append(value.to(self.dtype) if t.dtype.startswith("float") else value)
        with torch.inference_mode():
            out = self.module(*args)
        outs = out if isinstance(out, tuple) else (out,)  # SDXL's text encoder: (context, pooled)
        return {t.name: o.float() for t, o in zip(self.spec.outputs, outs)}

    def to_host(self, array) -> np.ndarray:
        return array.detach().float().cpu().numpy()

    def synchronize(self) -> None:
        if self.xp.device.type == "cuda":
            torch.cuda.synchronize(self.xp.device)

    def close(self) -> None:
        self.module = None


class TorchBackend:
    name = "torch"

    def __init__(self, models, shape_range=None):
        self.models, self.shape_range = models, shape_range
        # The first network still held (the export's parity check releases each once it is checked).
        self.device = next(next(m.parameters()).device for m in models.components().values() if m is not None)

    def load(self, engine_dir=None, manifest=None, components=COMPONENTS) -> dict[str, TorchEngine]:
        xp = TorchArrays(self.device)
        return {name: TorchEngine(name, self.models, xp, self.shape_range) for name in components}
