"""Bake LoRAs into the PyTorch reference weights before the ONNX export (``rtsd export --lora FILE:SCALE``).

The same NumPy merge as the run-time switch (lora.merged), so a baked engine directory and a base one switched to
the same LoRAs hold the same float32 weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rtsd.adapters.lora import merged, read_lora, stack_deltas
from rtsd.adapters.lora_keys import lora_table


def bake_loras(models, loras: Sequence[tuple[str | Path, float]]) -> list[dict]:
    """Merge each (file, scale) into ``models`` in place, in order; returns the manifest's records of them."""
    files = [(read_lora(path), float(scale)) for path, scale in loras]
    table = lora_table(models.ldm_shapes(), models.config.unet.num_res_blocks)
    per_key = stack_deltas(files, table, models.config.family)
    parameters = {models.prefixes[name] + key: value for name, module in models.components().items()
                  for key, value in module.named_parameters()}
    with torch.no_grad():
        for key, deltas in per_key.items():
            parameter = parameters[key]
            update = merged(parameter.detach().to("cpu", torch.float32).numpy(), deltas)
            parameter.copy_(torch.from_numpy(update).to(parameter.dtype))
    return [lora.record(scale) for lora, scale in files]
