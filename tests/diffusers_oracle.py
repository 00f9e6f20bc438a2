"""Independent oracles: diffusers / transformers models and pipelines loaded from a single-file checkpoint.

Weights go through diffusers' own LDM converters (``diffusers.loaders.single_file_utils``), configured from an
``original_config`` dict in the LDM YAML structure built from the preset, so nothing here reuses rtsd's model code
and nothing touches the network.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from rtsd.config import ModelConfig

OPEN_CLIP = "cond_stage_model.model."


def ldm_original_config(config: ModelConfig) -> dict:
    """The ``v1-inference.yaml`` / ``v2-inference.yaml`` structure diffusers' config converters read."""
    u, v, s = config.unet, config.vae, config.scheduler
    unet_params = {
        "use_checkpoint": False,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions),
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
        "transformer_depth": u.transformer_depth,
        "context_dim": u.context_dim,
        "use_linear_in_transformer": u.use_linear_in_transformer,
        "legacy": False,
    }
    if u.num_head_channels > 0:
        unet_params["num_head_channels"] = u.num_head_channels
    else:
        unet_params["num_heads"] = u.num_heads
    ddconfig = {
        "double_z": True,
        "z_channels": v.z_channels,
        "resolution": 256,
        "in_channels": v.in_channels,
        "out_ch": v.out_ch,
        "ch": v.ch,
        "ch_mult": list(v.ch_mult),
        "num_res_blocks": v.num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    text_target = {
        "clip": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
        "open_clip": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
    }[config.text_encoder.kind]
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": s.beta_start,
                "linear_end": s.beta_end,
                "timesteps": s.num_train_timesteps,
                "scale_factor": v.scaling_factor,
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig},
                },
                "cond_stage_config": {"target": text_target, "params": {"layer": "penultimate"}}
                if config.text_encoder.kind == "open_clip"
                else {"target": text_target},
            },
        }
    }


def clip_text_config(config: ModelConfig) -> CLIPTextConfig:
    t = config.text_encoder
    return CLIPTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        hidden_act=t.hidden_act,
        layer_norm_eps=t.layer_norm_eps,
        pad_token_id=t.pad_token_id,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
    )


@dataclasses.dataclass
class Oracles:
    config: ModelConfig
    ldm: dict[str, torch.Tensor]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel


def load_oracles(path, config: ModelConfig, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Oracles:
    """diffusers' UNet/VAE and transformers' CLIPTextModel from the single file at ``path``, in ``dtype`` on ``device``.

    Modules are built without allocating weights and take the converted tensors by assignment: one copy of the
    weights even for full-size checkpoints (benchmarks/ uses this as its diffusers baseline too).
    """
    from accelerate import init_empty_weights

    ldm = load_file(str(path))
    original = ldm_original_config(config)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, ldm)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, ldm)
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(clip_text_config(config))
    _assign(unet, sfu.convert_ldm_unet_checkpoint(ldm, unet_config), dtype)
    _assign(vae, sfu.convert_ldm_vae_checkpoint(ldm, vae_config), dtype)

    if config.text_encoder.kind == "clip":
        text_state = sfu.convert_ldm_clip_checkpoint(ldm)
    else:
        # diffusers drops SD 2.x's last resblock (index 23: SD 2 never runs it) by full key name; a neutral prefix
        # converts every layer, so that both the last and the penultimate layer can be compared.
        prefix = "open_clip_text."
        renamed = {prefix + k.removeprefix(OPEN_CLIP): v for k, v in ldm.items() if k.startswith(OPEN_CLIP)}
        text_state = sfu.convert_open_clip_checkpoint(text_encoder, renamed, prefix=prefix)
    if not any(key.startswith("text_model.") for key in text_encoder.state_dict()):
        # transformers >= 5 flattened CLIPTextModel (no ``text_model.`` level); diffusers' converters still emit it.
        text_state = {key.removeprefix("text_model."): value for key, value in text_state.items()}
    # Not part of CLIPTextModel: the position_ids buffer (SD 1.x files) and the pooled projection (SD 2.x files).
    extras = {k for k in text_state if k.removeprefix("text_model.") in ("embeddings.position_ids",
                                                                         "text_projection.weight")}
    _assign(text_encoder, {k: v for k, v in text_state.items() if k not in extras}, dtype)

    for module in (unet, vae, text_encoder):
        module.to(device=device).eval().requires_grad_(False)
    return Oracles(config, ldm, unet, vae, text_encoder)


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Strict load by assignment (the module was built on the meta device), in ``dtype``."""
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)


DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                        "dpmpp_2m": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler",
                        "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler", "unipc": "UniPCMultistepScheduler"}


def diffusers_scheduler(name: str, config: ModelConfig, **options):
    import diffusers

    s = config.scheduler
    cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[name])
    return cls(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
               beta_schedule=s.beta_schedule, prediction_type=s.prediction_type,
               timestep_spacing=s.timestep_spacing, steps_offset=s.steps_offset, **options)


def diffusers_pipeline(path, config: ModelConfig, tokenizer_dir, scheduler, img2img: bool = False,
                       dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A diffusers StableDiffusion(Img2Img)Pipeline on the checkpoint at ``path``; tokenizer = transformers'
    CLIPTokenizer on the vocabulary files of the engine dir, padding as the family was trained (SD 2.x: "!" = id 0).
    """
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    oracles = load_oracles(path, config, dtype=dtype, device=device)
    unet, vae, text_encoder = oracles.unet, oracles.vae, oracles.text_encoder
    if config.text_encoder.output_layer == -2:
        text_encoder = _drop_last_layer(text_encoder, config).to(device=device, dtype=dtype)
    pad = {} if config.text_encoder.pad_token_id == config.text_encoder.eos_token_id else {"pad_token": "!"}
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=config.text_encoder.max_position_embeddings, **pad)
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _drop_last_layer(text_encoder: CLIPTextModel, config: ModelConfig) -> CLIPTextModel:
    """SD 2.x as diffusers ships it: OpenCLIP without its last resblock, so the last hidden state (after the final
    LayerNorm) is the penultimate layer. (diffusers' clip_skip is no substitute: it skips layers for the prompt but
    not for the negative prompt.)"""
    last = config.text_encoder.num_layers - 1
    truncated = CLIPTextModel(clip_text_config(_with_layers(config, last)))
    state = {k: v for k, v in text_encoder.state_dict().items() if f"layers.{last}." not in k}
    truncated.load_state_dict(state, strict=True)
    return truncated.eval()


def _with_layers(config: ModelConfig, layers: int) -> ModelConfig:
    return dataclasses.replace(config, text_encoder=dataclasses.replace(config.text_encoder, num_layers=layers))


def diffusers_inpaint_pipeline(path, config: ModelConfig, tokenizer_dir, scheduler, dtype: torch.dtype = torch.float32,
                               device: str = "cpu"):
    """diffusers' StableDiffusionInpaintPipeline on the same components as ``diffusers_pipeline`` (9-channel UNets)."""
    from diffusers import StableDiffusionInpaintPipeline

    base = diffusers_pipeline(path, config, tokenizer_dir, scheduler, dtype=dtype, device=device)
    pipe = StableDiffusionInpaintPipeline(**base.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def give_pipeline_our_noise(monkeypatch, pipeline_module, noise) -> None:
    """Make an image-conditioned diffusers pipeline (img2img, inpaint) start from rtsd's inputs: its ``randn_tensor``
    returns ``noise`` (for strength < 1 diffusers must draw it itself: ``latents=`` would skip noising the image),
    and the VAE posterior is read at its mean, as rtsd encodes, instead of sampled."""
    monkeypatch.setattr(pipeline_module, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    original = pipeline_module.retrieve_latents
    monkeypatch.setattr(pipeline_module, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        original(out, generator, sample_mode="argmax"))
