"""LoRA files for the tests: random tensors in the key layouts real trainers write, named after the module names of
an independent model (diffusers' UNet2DConditionModel / transformers' CLIPTextModel), never after rtsd's tables."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file


def lora_modules(unet, text_encoder, convs: bool = True) -> dict[str, torch.nn.Module]:
    """'unet.<path>' / 'text_encoder.<path>' -> Linear/Conv2d module that LoRA trainers target."""
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) or (convs and isinstance(module, torch.nn.Conv2d)):
            out[f"unet.{name}"] = module
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            out[f"text_encoder.{name}"] = module  # as this transformers names it (>= 5: no text_model. level)
    return out


def _shapes(module, rank):
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        return (rank, module.in_channels, kh, kw), (module.out_channels, rank, 1, 1)
    return (rank, module.in_features), (module.out_features, rank)


def kohya_state(modules, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    """kohya/A1111: lora_unet_<path with _>.lora_down/.lora_up/.alpha (LoCon for convs, 3x3 included)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in modules.items():
        component, path = name.split(".", 1)
        if component == "text_encoder" and not path.startswith("text_model."):
            path = f"text_model.{path}"  # kohya names the text encoder as transformers 4 did
        prefix = ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")
        down, up = _shapes(module, rank)
        state[f"{prefix}.lora_down.weight"] = torch.randn(down, generator=g) / down[1]
        state[f"{prefix}.lora_up.weight"] = torch.randn(up, generator=g) * 0.5
        state[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return state


def peft_state(modules, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """diffusers/PEFT: unet.<path>.lora_A.weight / lora_B.weight (alpha lives in the file's metadata)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in modules.items():
        down, up = _shapes(module, rank)
        state[f"{name}.lora_A.weight"] = torch.randn(down, generator=g) / down[1]
        state[f"{name}.lora_B.weight"] = torch.randn(up, generator=g) * 0.5
    return state


def save_peft(path, state, rank: int, alpha: float) -> None:
    """With the LoraConfig metadata diffusers' save_lora_weights writes (prefix.lora_alpha, prefix.r, ...)."""
    metadata = {}
    for prefix in ("unet", "text_encoder"):
        modules = sorted({k[len(prefix) + 1:].rsplit(".", 2)[0] for k in state if k.startswith(prefix + ".")})
        if modules:
            metadata.update({f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha, f"{prefix}.target_modules": modules})
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
