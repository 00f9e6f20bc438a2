"""Build the three reference networks from one ModelConfig and load them strictly from LDM-keyed tensors."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rtsd.config import ModelConfig
from rtsd.errors import CheckpointError
from rtsd.detection import component_prefixes
from rtsd.models.sdxl_text import SDXLTextEncoder
from rtsd.models.text_encoder import UNUSED_TEXT_KEYS, LayerStackEncoder, build_text_encoder
from rtsd.models.unet import UNetModel
from rtsd.models.vae import AutoencoderKL

if TYPE_CHECKING:
    from rtsd.checkpoint import Checkpoint

# Where each network lives in an LDM single-file checkpoint; module state-dict keys are the rest of the key.
COMPONENT_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
}
# LDM DDPM.register_schedule buffers stored at the top level of SD checkpoints: training tables, not weights.
SCHEDULE_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# SDXL (sgm) files: CLIP's position_ids buffer and OpenCLIP's contrastive temperature, under either embedder index.
SDXL_UNUSED_TEXT_KEYS = tuple(
    f"conditioner.embedders.{index}.{key}"
    for index in (0, 1)
    for key in ("transformer.text_model.embeddings.position_ids", "model.logit_scale")
)
# Keys a complete checkpoint may carry that no reference network reads; everything else must match exactly.
IGNORED_KEYS = frozenset(SCHEDULE_KEYS + UNUSED_TEXT_KEYS + SDXL_UNUSED_TEXT_KEYS)
_MAX_LISTED = 8


@dataclass(eq=False)
class ReferenceModels:
    """The PyTorch reference of one checkpoint: ``unet``, ``vae``, ``text_encoder`` (eval mode, no grads)."""

    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: LayerStackEncoder | SDXLTextEncoder

    @property
    def prefixes(self) -> dict[str, str]:
        return component_prefixes(self.config)

    @functools.cached_property
    def tokenizer(self):
        """The CLIP tokenizer with this family's padding convention (imported on first use; torch-free)."""
        from rtsd.tokenizer import Tokenizer

        return Tokenizer.default(pad_token_id=self.config.text_encoder.pad_token_id)

    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ReferenceModels:
        for module in self.components().values():
            module.to(device=device, dtype=dtype)
        return self

    def ldm_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor these networks expect, by its LDM checkpoint key."""
        return {
            self.prefixes[name] + key: tuple(value.shape)
            for name, module in self.components().items()
            for key, value in module.state_dict().items()
        }


def build_models(
    config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> ReferenceModels:
    """Randomly initialised networks for ``config`` (``device="meta"`` allocates nothing: names and shapes only)."""
    if config.unet.context_dim != config.context_dim:
        raise ValueError(f"UNet context_dim {config.unet.context_dim} != text encoder hidden size {config.context_dim}")
    with torch.device(device):
        models = ReferenceModels(
            config=config,
            unet=UNetModel(config.unet),
            vae=AutoencoderKL(config.vae),
            text_encoder=_text_encoder(config),
        )
    for module in models.components().values():
        module.to(dtype=dtype).eval().requires_grad_(False)
    return models


def check_state_shapes(
    models: ReferenceModels, shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint"
) -> None:
    """Raise one CheckpointError listing missing keys, unexpected keys and shape mismatches (LDM key names)."""
    expected = models.ldm_shapes()
    given = {key: tuple(shape) for key, shape in shapes.items() if key not in IGNORED_KEYS}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    mismatched = sorted(
        f"{key} {given[key]} in the file vs {expected[key]} in the model"
        for key in expected.keys() & given.keys()
        if given[key] != expected[key]
    )
    problems = [
        _listing(missing, "missing key"),
        _listing(unexpected, "unexpected key"),
        _listing(mismatched, "shape mismatch", plural="shape mismatches"),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(
            f"{source} does not fit the {config_name(models.config)} reference models "
            f"({len(expected)} tensors expected): {'; '.join(problems)}"
        )


def fit_text_layers(models: ReferenceModels, keys: Iterable[str]) -> None:
    """Drop the text encoder's trailing layers that the checkpoint lacks and the reference never runs.

    diffusers' SD 2.x folders store OpenCLIP without its last layer; conditioning on the penultimate one does not
    need it. Every other tensor stays required.
    """
    prefix = models.prefixes["text_encoder"]
    models.text_encoder.fit_stored_layers(key[len(prefix) :] for key in keys if key.startswith(prefix))


def load_state(models: ReferenceModels, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load LDM-keyed tensors into the networks, strictly: every key present, none extra, every shape equal
    (except text encoder layers after the output layer, which may be absent: ``fit_text_layers``).

    Modules built on the ``meta`` device take the tensors as they are (``assign``), so nothing is allocated twice.
    """
    fit_text_layers(models, tensors)
    check_state_shapes(models, {key: tuple(t.shape) for key, t in tensors.items()}, source)
    for name, module in models.components().items():
        prefix = models.prefixes[name]
        state = {
            key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix) and key not in IGNORED_KEYS
        }
        on_meta = any(p.is_meta for p in module.parameters())
        if on_meta:
            dtype = next(module.parameters()).dtype
            state = {key: t.to(dtype) for key, t in state.items()}
        module.load_state_dict(state, strict=True, assign=on_meta)
        module.requires_grad_(False)


def load_checkpoint(
    path: "str | Path | Checkpoint", dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    component_dtypes: Mapping[str, torch.dtype] | None = None,
) -> ReferenceModels:
    """Read a checkpoint (single file or diffusers folder), detect its architecture, and load the references.

    The config's prediction type is what the files beside the weights say (``rtsd.checkpoint.model_config``).
    component_dtypes: {"vae": torch.float32, ...} overrides ``dtype`` per network (SDXL's fp16 export keeps its
    VAE in fp32); each tensor is cast as it is read.
    """
    from rtsd.checkpoint import model_config, open_checkpoint

    checkpoint = open_checkpoint(path)  # an opened Checkpoint (export's) is used as it is
    models = build_models(model_config(checkpoint), dtype=dtype, device="meta")
    overrides = dict(component_dtypes or {})
    for name, module in models.components().items():
        if name in overrides:
            module.to(dtype=overrides[name])
    source = f"checkpoint {checkpoint.path}"
    fit_text_layers(models, checkpoint.shapes)
    check_state_shapes(models, checkpoint.shapes, source)  # before reading a single tensor
    by_prefix = {models.prefixes[name]: d for name, d in overrides.items()}
    load_state(models, checkpoint.tensors(dtype=dtype, dtypes_by_prefix=by_prefix), source)
    return models.to(device=device)


def _text_encoder(config: ModelConfig) -> LayerStackEncoder | SDXLTextEncoder:
    if config.unet.adm_in_channels:
        return SDXLTextEncoder(config.text_encoders)
    return build_text_encoder(config.text_encoder)


def config_name(config: ModelConfig) -> str:
    return {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}.get(
        config.family, config.family)


def _listing(items: list[str], noun: str, plural: str | None = None) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:_MAX_LISTED]) + (
        f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    )
    word = noun if len(items) == 1 else (plural or noun + "s")
    return f"{len(items)} {word}: {shown}"
