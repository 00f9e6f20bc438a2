"""Frozen model configuration: what a checkpoint is, as detected from its tensors.

One ModelConfig travels everywhere: the reference models are built from it, the export specs derive shapes
from it, and the manifest stores it (``to_dict``/``from_dict``) so C++ hosts and the torch-free runtime can read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class UNetConfig:
    """LDM ``UNetModel`` hyper-parameters (names follow the original ``v1-inference.yaml``)."""

    in_channels: int = 4  # 9 for inpainting UNets (latents + mask + masked-image latents)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsample factors whose levels carry attention
    num_heads: int = 8  # SD 1.x: fixed head count; -1 when num_head_channels is used
    num_head_channels: int = -1  # SD 2.x: fixed head width (64); -1 when num_heads is used
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2.x: proj_in/proj_out are Linear instead of 1x1 Conv
    norm_num_groups: int = 32
    # SDXL: transformer blocks per resolution level (0 = no attention at that level); empty = ``transformer_depth``
    # at every level listed in attention_resolutions. With levels given, ``transformer_depth`` is the middle block's.
    transformer_depth_levels: tuple[int, ...] = ()
    # SDXL: width of the added-condition vector (``label_emb``: pooled text + sinusoids of the time ids); 0 = none.
    adm_in_channels: int = 0
    time_id_embed_dim: int = 256  # each SDXL time id becomes a sinusoid this wide (diffusers addition_time_embed_dim)

    def depth_at(self, level: int) -> int:
        """Transformer blocks at resolution ``level`` (0 when that level has no attention)."""
        if self.transformer_depth_levels:
            return self.transformer_depth_levels[level]
        return self.transformer_depth if 2**level in self.attention_resolutions else 0

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of the attention blocks at a level with ``channels`` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """LDM ``AutoencoderKL`` hyper-parameters (``ddconfig`` + ``embed_dim`` + scale factor)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer. ``kind`` names the checkpoint layout: OpenAI CLIP via transformers, or OpenCLIP."""

    kind: str = "clip"  # "clip" (SD 1.x, cond_stage_model.transformer.*) | "open_clip" (SD 2.x, cond_stage_model.model.*)
    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Which hidden state the UNet is conditioned on: -1 = last layer (SD 1.x), -2 = penultimate (SD 2.x, clip skip 2).
    output_layer: int = -1
    pad_token_id: int = 49407  # SD 1.x pads with <|endoftext|>; SD 2.x (OpenCLIP) pads with 0
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    # SDXL conditions on the penultimate hidden state as is; SD 1.x/2.x apply the final LayerNorm to the chosen layer.
    final_norm: bool = True
    # SDXL's OpenCLIP ViT-bigG: width of the pooled output (final-norm EOS token through text_projection); 0 = none.
    projection_dim: int = 0


@dataclass(frozen=True)
class SchedulerDefaults:
    """The training noise schedule the checkpoint was trained with; NumPy schedulers are built from it."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    timestep_spacing: str = "leading"
    steps_offset: int = 1


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerDefaults = field(default_factory=SchedulerDefaults)
    # SDXL base: OpenCLIP ViT-bigG beside CLIP ViT-L (their hidden states are concatenated); None for one encoder.
    text_encoder_2: TextEncoderConfig | None = None
    default_size: int = 512  # generate()'s height/width when none is given (SDXL: 1024)
    # diffusers' force_zeros_for_empty_prompt (SDXL base): an empty negative prompt conditions on zeros.
    zeros_for_empty_prompt: bool = False

    @property
    def text_encoders(self) -> tuple[TextEncoderConfig, ...]:
        """The text encoders in context order (their hidden states are concatenated along the channel axis)."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def context_dim(self) -> int:
        return sum(te.hidden_size for te in self.text_encoders)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text embedding the UNet's added conditions take (0: the UNet takes none)."""
        return self.text_encoders[-1].projection_dim if self.unet.adm_in_channels else 0

    @property
    def num_time_ids(self) -> int:
        """SDXL time ids per image: 6 for the base (size, crop, target size), 5 for the refiner (aesthetic score)."""
        if not self.unet.adm_in_channels:
            return 0
        return (self.unet.adm_in_channels - self.pooled_dim) // self.unet.time_id_embed_dim

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def latent_channels(self) -> int:
        return self.vae.embed_dim

    @property
    def prediction_type(self) -> str:
        return self.scheduler.prediction_type

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return cls(
            family=data["family"],
            unet=_build(UNetConfig, data["unet"]),
            vae=_build(VAEConfig, data["vae"]),
            text_encoder=_build(TextEncoderConfig, data["text_encoder"]),
            scheduler=_build(SchedulerDefaults, data["scheduler"]),
            **{k: v for k, v in data.items() if k in ("default_size", "zeros_for_empty_prompt")},
            text_encoder_2=_build(TextEncoderConfig, data["text_encoder_2"]) if data.get("text_encoder_2") else None,
        )


def _build(cls, data: dict[str, Any]):
    """Rebuild a frozen config from JSON, turning lists back into tuples; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
