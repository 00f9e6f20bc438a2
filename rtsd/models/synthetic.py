"""Random-weight checkpoints in the exact key layout of real single-file SD checkpoints (no weights can be downloaded).

The key set and shapes come from the reference modules themselves, built on the ``meta`` device (nothing
allocated), plus what real files also carry: the LDM DDPM schedule buffers and the text encoder's unused extras.
Tensors are generated one at a time, each from its own seeded generator, and streamed into the ``.safetensors``
file, so a full-size fp32 checkpoint (4.3 GB) needs about one tensor's worth of memory.

Scale: weights ~ N(0, 1/fan_in), norm weights ~ 1, biases small, embeddings ~ N(0, 1): activations stay O(1)
through every network (see tests/test_synthetic.py for the measured output std).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from rtsd.config import ModelConfig, SchedulerDefaults, TextEncoderConfig, UNetConfig, VAEConfig
from rtsd.models.loading import COMPONENT_PREFIXES, SCHEDULE_KEYS, build_models, component_prefixes

# 12 layers as in ViT-L/14 (the key set is SD 1.5's); 128 wide = two of the 64-wide heads detection assumes.
_TINY_TEXT = {"hidden_size": 128, "num_layers": 12, "num_heads": 2, "intermediate_size": 512}
# SD 2.x: 64-wide UNet heads and Linear proj_in/out; OpenCLIP ViT-H/14 text tower, penultimate layer, pads with 0.
_SD2_UNET = {"num_heads": -1, "num_head_channels": 64, "use_linear_in_transformer": True}
_OPEN_CLIP = {"kind": "open_clip", "hidden_act": "gelu", "output_layer": -2, "pad_token_id": 0}

PRESETS: dict[str, ModelConfig] = {
    # SD 1.5's block structure (4 levels, 2 res blocks, attention at 4/2/1, 8 heads) with few channels.
    "tiny": ModelConfig(
        family="sd1",
        unet=UNetConfig(model_channels=32, context_dim=128),
        vae=VAEConfig(ch=32),
        text_encoder=TextEncoderConfig(**_TINY_TEXT),
    ),
    # Exactly SD 1.5 (v1-inference.yaml + CLIP ViT-L/14 text model).
    "sd15": ModelConfig(family="sd1"),
    # SD 2.1's layout with few channels; 64 model channels is the least that 64-wide heads allow.
    "tiny-sd2": ModelConfig(
        family="sd2",
        unet=UNetConfig(model_channels=64, context_dim=128, **_SD2_UNET),
        vae=VAEConfig(ch=32),
        text_encoder=TextEncoderConfig(**{**_TINY_TEXT, "num_layers": 24}, **_OPEN_CLIP),
    ),
    # Exactly SD 2.1 (v2-inference.yaml + OpenCLIP ViT-H/14 text tower). The weights do not say epsilon vs v
    # prediction (2.1-base vs 2.1-768-v); like detection, the preset keeps the epsilon default.
    "sd21": ModelConfig(
        family="sd2",
        unet=UNetConfig(context_dim=1024, **_SD2_UNET),
        text_encoder=TextEncoderConfig(
            hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, **_OPEN_CLIP
        ),
    ),
}


def _inpainting(config: ModelConfig) -> ModelConfig:
    """The same model with an inpainting UNet: 9 input channels = latents + mask + masked-image latents."""
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, in_channels=9))


# sd-v1-5-inpainting's and stable-diffusion-2-inpainting's layouts at tiny size (epsilon prediction, the default).
PRESETS["tiny-inpaint"] = _inpainting(PRESETS["tiny"])
PRESETS["tiny-sd2-inpaint"] = _inpainting(PRESETS["tiny-sd2"])

# SDXL (sgm configs sd_xl_base.yaml / sd_xl_refiner.yaml): 64-wide heads, Linear proj_in/out, no attention at the
# first level, per-level transformer depth; CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 on their penultimate layer without
# the final norm; bigG pads with "!" (0) and projects its pooled output; VAE scale 0.13025.
_SDXL_UNET = {"num_heads": -1, "num_head_channels": 64, "use_linear_in_transformer": True,
              "attention_resolutions": (4, 2)}
_SDXL_CLIP_L = {"kind": "clip", "output_layer": -2, "final_norm": False}
_SDXL_BIGG = {**_OPEN_CLIP, "final_norm": False}
_SDXL = {"default_size": 1024, "vae": VAEConfig(scaling_factor=0.13025)}


def _sdxl_base(mc: int, depths: tuple[int, ...], clip_l: TextEncoderConfig, big_g: TextEncoderConfig) -> ModelConfig:
    """The base: 3 levels, two text encoders, added conditions = pooled + 6 time ids x 256."""
    unet = UNetConfig(model_channels=mc, channel_mult=(1, 2, 4), transformer_depth=depths[-1],
                      transformer_depth_levels=depths, context_dim=clip_l.hidden_size + big_g.hidden_size,
                      adm_in_channels=big_g.projection_dim + 6 * 256, **_SDXL_UNET)
    return ModelConfig(family="sdxl", unet=unet, text_encoder=clip_l, text_encoder_2=big_g,
                       zeros_for_empty_prompt=True, **_SDXL)


def _sdxl_refiner(mc: int, depth: int, big_g: TextEncoderConfig) -> ModelConfig:
    """The refiner: 4 levels, attention in the middle two, bigG alone, pooled + 5 time ids (aesthetic score)."""
    unet = UNetConfig(model_channels=mc, channel_mult=(1, 2, 4, 4), transformer_depth=depth,
                      transformer_depth_levels=(0, depth, depth, 0), context_dim=big_g.hidden_size,
                      adm_in_channels=big_g.projection_dim + 5 * 256, **_SDXL_UNET)
    return ModelConfig(family="sdxl_refiner", unet=unet, text_encoder=big_g, **_SDXL)


_BIG_G = TextEncoderConfig(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120,
                           projection_dim=1280, **_SDXL_BIGG)
_TINY_BIG_G = TextEncoderConfig(hidden_size=128, num_layers=6, num_heads=2, intermediate_size=512,
                                projection_dim=128, **_SDXL_BIGG)
_TINY_CLIP_L = TextEncoderConfig(hidden_size=64, num_layers=12, num_heads=1, intermediate_size=256, **_SDXL_CLIP_L)
# Exactly SDXL base 1.0 / refiner 1.0.
PRESETS["sdxl"] = _sdxl_base(320, (0, 2, 10), TextEncoderConfig(**_SDXL_CLIP_L), _BIG_G)
PRESETS["sdxl-refiner"] = _sdxl_refiner(384, 4, _BIG_G)
# Their block structure with few channels and layers (depths differ per level, as in the real base).
_TINY_VAE = {"vae": VAEConfig(ch=32, scaling_factor=0.13025)}
PRESETS["tiny-sdxl"] = dataclasses.replace(_sdxl_base(32, (0, 1, 2), _TINY_CLIP_L, _TINY_BIG_G), **_TINY_VAE)
PRESETS["tiny-sdxl-refiner"] = dataclasses.replace(_sdxl_refiner(32, 2, _TINY_BIG_G), **_TINY_VAE)
PRESETS["tiny-sdxl-inpaint"] = _inpainting(PRESETS["tiny-sdxl"])

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
}


class TensorSpec(NamedTuple):
    """One tensor of a synthetic checkpoint: its key, shape, dtype and how it is filled."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: str  # "fan_in" | "norm_weight" | "bias" | "embedding" | "schedule" | "position_ids" | "logit_scale"


def preset_config(preset: str | ModelConfig) -> ModelConfig:
    if isinstance(preset, ModelConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def checkpoint_specs(preset: str | ModelConfig, dtype: torch.dtype = torch.float32) -> list[TensorSpec]:
    """Every tensor a real single-file checkpoint of this architecture holds, in file order (sorted keys)."""
    config = preset_config(preset)
    models = build_models(config, device="meta")
    prefixes = component_prefixes(config)
    specs = []
    for name, component in models.components().items():
        for module_name, module in component.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                key = f"{prefixes[name]}{module_name}.{param_name}"
                specs.append(TensorSpec(key, tuple(param.shape), dtype, _init_kind(module, param_name)))
    if config.unet.adm_in_channels:
        specs += _sdxl_text_extras(config, dtype)
    else:
        specs += _text_extras(config.text_encoder, dtype)
    specs += [TensorSpec(key, (config.scheduler.num_train_timesteps,), dtype, "schedule") for key in SCHEDULE_KEYS]
    return sorted(specs, key=lambda spec: spec.key)


def checkpoint_shapes(preset: str | ModelConfig) -> dict[str, tuple[int, ...]]:
    return {spec.key: spec.shape for spec in checkpoint_specs(preset)}


def write_checkpoint(
    path: str | os.PathLike, preset: str | ModelConfig = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a random-weight ``.safetensors`` checkpoint; the same (preset, seed, dtype) gives the same bytes."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"synthetic checkpoints are fp32, fp16 or bf16, not {dtype}")
    config = preset_config(preset)
    schedule = schedule_buffers(config.scheduler)
    return _write_safetensors(path, checkpoint_specs(config, dtype), lambda spec: _generate(spec, seed, schedule))


def schedule_buffers(scheduler: SchedulerDefaults) -> dict[str, torch.Tensor]:
    """The DDPM tables LDM's ``register_schedule`` stores, computed in float64 (stored in the checkpoint dtype)."""
    if scheduler.beta_schedule != "scaled_linear":
        raise ValueError(f"synthetic checkpoints use the scaled_linear schedule, not {scheduler.beta_schedule!r}")
    n = scheduler.num_train_timesteps
    betas = np.linspace(scheduler.beta_start**0.5, scheduler.beta_end**0.5, n, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    cumprod = np.cumprod(alphas)
    cumprod_prev = np.append(1.0, cumprod[:-1])
    posterior_variance = betas * (1.0 - cumprod_prev) / (1.0 - cumprod)
    tables = {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / cumprod - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(cumprod_prev) / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - cumprod_prev) * np.sqrt(alphas) / (1.0 - cumprod),
    }
    return {key: torch.from_numpy(value) for key, value in tables.items()}


def _init_kind(module: nn.Module, param_name: str) -> str:
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return "norm_weight" if param_name == "weight" else "bias"
    if param_name.endswith("bias"):
        return "bias"
    if isinstance(module, nn.Embedding) or param_name == "positional_embedding":
        return "embedding"
    if param_name == "text_projection":  # used as x @ P: scaled by its input width (dim 0), not by dim 1
        return "projection"
    return "fan_in"  # Linear / Conv2d weights and OpenCLIP's packed in_proj_weight


def _text_extras(config: TextEncoderConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """Tensors real checkpoints carry beside the text network (see text_encoder.UNUSED_TEXT_KEYS)."""
    if config.kind == "clip":
        key = COMPONENT_PREFIXES["text_encoder"] + "transformer.text_model.embeddings.position_ids"
        return [TensorSpec(key, (1, config.max_position_embeddings), torch.int64, "position_ids")]
    prefix = COMPONENT_PREFIXES["text_encoder"] + "model."
    return [
        TensorSpec(prefix + "logit_scale", (), dtype, "logit_scale"),
        TensorSpec(prefix + "text_projection", (config.hidden_size, config.hidden_size), dtype, "fan_in"),
    ]


def _sdxl_text_extras(config: ModelConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """What sgm files carry beside SDXL's text networks: ViT-L's position_ids, bigG's logit_scale."""
    specs = []
    for index, te in enumerate(config.text_encoders):
        prefix = f"conditioner.embedders.{index}."
        if te.kind == "clip":
            key = prefix + "transformer.text_model.embeddings.position_ids"
            specs.append(TensorSpec(key, (1, te.max_position_embeddings), torch.int64, "position_ids"))
        else:
            specs.append(TensorSpec(prefix + "model.logit_scale", (), dtype, "logit_scale"))
    return specs


def _seed_for(seed: int, key: str) -> int:
    # Each tensor's values depend only on (seed, key, shape), never on the order tensors are generated in, so a
    # layout change moves only the tensors it touches (presets with equal VAEs get equal VAE weights).
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generate(spec: TensorSpec, seed: int, schedule: dict[str, torch.Tensor]) -> torch.Tensor:
    if spec.init == "schedule":
        return schedule[spec.key].to(spec.dtype)
    if spec.init == "position_ids":
        return torch.arange(spec.shape[-1], dtype=torch.int64).reshape(spec.shape)
    if spec.init == "logit_scale":
        return torch.full(spec.shape, math.log(1 / 0.07), dtype=spec.dtype)
    generator = torch.Generator().manual_seed(_seed_for(seed, spec.key))
    noise = torch.randn(spec.shape, generator=generator, dtype=torch.float32)
    if spec.init == "fan_in":
        values = noise / math.sqrt(math.prod(spec.shape[1:]))
    elif spec.init == "projection":
        values = noise / math.sqrt(spec.shape[0])
    elif spec.init == "norm_weight":
        values = 1.0 + 0.05 * noise
    elif spec.init == "bias":
        values = 0.02 * noise
    elif spec.init == "embedding":
        values = noise
    else:
        raise ValueError(f"unknown init kind {spec.init!r} for {spec.key}")
    return values.to(spec.dtype)


def _safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The 8-byte length + JSON header of a .safetensors file whose tensors follow back to back in spec order."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * spec.dtype.itemsize
        header[spec.key] = {
            "dtype": _SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(text)) + text


# ------------------------------------------------------------------------------------------------------ ControlNet

CONTROLNET_PREFIX = "control_model."


def controlnet_specs(preset: str | ModelConfig, dtype: torch.dtype = torch.float32,
                     prefix: str = CONTROLNET_PREFIX) -> list[TensorSpec]:
    """Every tensor of an LDM ControlNet file for the preset's UNet (control_v11p_sd15_*: ``control_model.*``;
    ``prefix=""``: the prefix-less files), in file order."""
    from rtsd.models.controlnet import ControlNetModel

    with torch.device("meta"):
        model = ControlNetModel(preset_config(preset).unet)
    specs = [TensorSpec(f"{prefix}{module_name}.{param_name}", tuple(param.shape), dtype, _init_kind(module, param_name))
             for module_name, module in model.named_modules()
             for param_name, param in module.named_parameters(recurse=False)]
    return sorted(specs, key=lambda spec: spec.key)


def controlnet_parameter_count(preset: str | ModelConfig) -> int:
    """Parameters of the preset's ControlNet, counted from shapes (nothing allocated): 361,279,120 for sd15."""
    return sum(math.prod(spec.shape) for spec in controlnet_specs(preset))


def write_controlnet(path: str | os.PathLike, preset: str | ModelConfig = "tiny", seed: int = 0,
                     dtype: torch.dtype = torch.float32, prefix: str = CONTROLNET_PREFIX) -> Path:
    """A random-weight ControlNet ``.safetensors`` in the LDM layout, for the preset's UNet (the zero convs get
    random weights too, as after training, so every residual carries signal)."""
    # Values follow the prefixed key, so files with and without the prefix hold the same weights.
    return _write_safetensors(path, controlnet_specs(preset, dtype, prefix), lambda spec: _generate(
        spec._replace(key=CONTROLNET_PREFIX + spec.key[len(prefix):]), seed, {}))


def _write_safetensors(path: str | os.PathLike, specs, tensor_of) -> Path:
    """Write ``specs`` (header first, then each ``tensor_of(spec)`` in order) to ``path`` without holding the whole
    file in memory; a ``.partial`` file is renamed at the end, so no truncated file is left under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(_safetensors_header(specs))
        for spec in specs:
            f.write(tensor_of(spec).reshape(-1).view(torch.uint8).numpy())
    os.replace(tmp, path)
    return path
