"""Independent oracles: diffusers / transformers models and pipelines loaded from a single-file checkpoint.

Weights go through diffusers' own LDM converters (``diffusers.loaders.single_file_utils``). Everything the weights
cannot say (activation, LayerNorm eps, head counts, VAE scale factor, training betas, timestep spacing, steps
offset, prediction type, padding token, conditioning layer) is written below as the published configs of SD 1.5
and SD 2.1 give it, and never read from rtsd: a wrong default in rtsd/config.py makes rtsd disagree with these
oracles. Only widths and depths that the tensors' shapes carry are read from the checkpoint itself (the tiny test
presets are narrower than the published models but keep their block structure), and a mismatch there fails the
strict load.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

OPEN_CLIP = "cond_stage_model.model."
UNET = "model.diffusion_model."

# --- published configs, written out -------------------------------------------------------------------------------

# CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml (SD 1.5 is trained with it), model.params.
SD15_LDM = {
    "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "scale_factor": 0.18215,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True,
        "legacy": False}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                     "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                     "attn_resolutions": [], "dropout": 0.0}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
}  # fmt: skip

# Stability-AI/stablediffusion configs/stable-diffusion/v2-inference(-v).yaml (SD 2.1 base / 768-v), model.params.
SD21_LDM = {
    "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "scale_factor": 0.18215,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
        "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
        "transformer_depth": 1, "context_dim": 1024, "use_checkpoint": True, "legacy": False}},
    "first_stage_config": SD15_LDM["first_stage_config"],
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                          "params": {"freeze": True, "layer": "penultimate"}},
}  # fmt: skip

# Text encoders. SD 1.5: openai/clip-vit-large-patch14's text_config (ViT-L/14). SD 2.1: OpenCLIP ViT-H/14's text
# tower as stabilityai/stable-diffusion-2-1's text_encoder/config.json gives it (gelu; diffusers ships 23 of its 24
# layers because SD 2.x conditions on the penultimate one). Heads are 64 wide in both. Token ids are the CLIP BPE
# vocabulary's <|startoftext|> / <|endoftext|>.
SD15_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
SD21_TEXT = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
             "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
             "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}
TEXT_HEAD_WIDTH = 64


@dataclasses.dataclass(frozen=True)
class Family:
    """One published model family, as its configs describe it."""

    name: str
    ldm: dict
    text: dict
    open_clip: bool  # text tower under cond_stage_model.model.* (OpenCLIP) vs .transformer.* (OpenAI CLIP)
    penultimate: bool  # the UNet is conditioned on the text tower's penultimate layer (SD 2.x)
    pad_token: str | None  # the tokenizer's padding token: None = <|endoftext|> (SD 1.x); SD 2.x pads with "!"


FAMILIES = {
    "sd15": Family("sd15", SD15_LDM, SD15_TEXT, open_clip=False, penultimate=False, pad_token=None),
    "sd21": Family("sd21", SD21_LDM, SD21_TEXT, open_clip=True, penultimate=True, pad_token="!"),
}

# diffusers scheduler_config.json of the published pipelines, the keys every scheduler class takes. The files name
# no timestep_spacing: diffusers' default for their classes (PNDM, DDIM) is "leading", written here explicitly.
SD15_SCHEDULER = {  # runwayml/stable-diffusion-v1-5 and runwayml/stable-diffusion-inpainting
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}
SCHEDULER_CONFIGS = {
    "sd15": SD15_SCHEDULER,
    # stabilityai/stable-diffusion-2-1 (the 768-v model)
    "sd21-v": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "v_prediction"},
    # stabilityai/stable-diffusion-2-1-base (the 512 px model, epsilon)
    "sd21-base": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
                  "prediction_type": "epsilon"},
    # stabilityai/stable-diffusion-2-inpainting (epsilon: v2-inpainting-inference.yaml sets no parameterization)
    "sd2-inpainting": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                       "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
                       "prediction_type": "epsilon"},
}  # fmt: skip

# The diffusers class of each rtsd scheduler name used with the pipelines here.
DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a":
                        "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                        "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler",
                        "unipc": "UniPCMultistepScheduler"}


# --- widths and depths, from the tensors -------------------------------------------------------------------------


def _layer_count(ldm: dict, pattern: str) -> int:
    return len({m.group(1) for key in ldm if (m := re.match(pattern, key))})


def _text_sizes(family: Family, ldm: dict) -> dict:
    if family.open_clip:
        vocab, hidden = ldm[OPEN_CLIP + "token_embedding.weight"].shape
        layers = _layer_count(ldm, re.escape(OPEN_CLIP) + r"transformer\.resblocks\.(\d+)\.")
        intermediate = ldm[OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    else:
        prefix = "cond_stage_model.transformer.text_model."
        vocab, hidden = ldm[prefix + "embeddings.token_embedding.weight"].shape
        layers = _layer_count(ldm, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
        intermediate = ldm[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": hidden // TEXT_HEAD_WIDTH}


def ldm_original_config(family: str, ldm: dict) -> dict:
    """The family's published LDM yaml (``model:`` level) that diffusers' config converters read, with the channel
    widths of the checkpoint at hand (read from its tensors)."""
    params = copy.deepcopy(FAMILIES[family].ldm)
    unet, vae = params["unet_config"]["params"], params["first_stage_config"]["params"]["ddconfig"]
    conv_in = ldm[UNET + "input_blocks.0.0.weight"].shape
    unet["model_channels"], unet["in_channels"] = conv_in[0], conv_in[1]  # 9 input channels: inpainting UNets
    unet["context_dim"] = ldm[UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    vae["ch"] = ldm["first_stage_model.encoder.conv_in.weight"].shape[0]
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def clip_text_config(family: str, ldm: dict, num_layers: int | None = None) -> CLIPTextConfig:
    """transformers' config of the family's text encoder, at the checkpoint's widths (``num_layers`` overrides)."""
    values = FAMILIES[family].text | _text_sizes(FAMILIES[family], ldm)
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
    return CLIPTextConfig(**values)


@dataclasses.dataclass
class Oracles:
    family: Family
    ldm: dict[str, torch.Tensor]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel


def load_oracles(path, family: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Oracles:
    """diffusers' UNet/VAE and transformers' CLIPTextModel (every layer of the tower) from the single file at
    ``path``, configured as the published ``family`` ("sd15", "sd21"), in ``dtype`` on ``device``.

    Modules are built without allocating weights and take the converted tensors by assignment: one copy of the
    weights even for full-size checkpoints (benchmarks/ uses this as its diffusers baseline too).
    """
    from accelerate import init_empty_weights

    ldm = load_file(str(path))
    original = ldm_original_config(family, ldm)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, ldm)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, ldm)
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(clip_text_config(family, ldm))
    _assign(unet, sfu.convert_ldm_unet_checkpoint(ldm, unet_config), dtype)
    _assign(vae, sfu.convert_ldm_vae_checkpoint(ldm, vae_config), dtype)

    if not FAMILIES[family].open_clip:
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
    return Oracles(FAMILIES[family], ldm, unet, vae, text_encoder)


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Strict load by assignment (the module was built on the meta device), in ``dtype``."""
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)


def diffusers_scheduler(name: str, release: str, **options):
    """The diffusers scheduler for rtsd's ``name`` on the training schedule of ``release`` (a SCHEDULER_CONFIGS
    key: "sd15", "sd21-v", "sd21-base", "sd2-inpainting"); ``options`` are further config keys (e.g. DDIM's set_alpha_to_one)."""
    import diffusers

    return getattr(diffusers, DIFFUSERS_SCHEDULERS[name])(**SCHEDULER_CONFIGS[release], **options)


def diffusers_pipeline(path, family: str, tokenizer_dir, scheduler, img2img: bool = False,
                       dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A diffusers StableDiffusion(Img2Img)Pipeline on the checkpoint at ``path`` as the published ``family`` ships
    it; tokenizer = transformers' CLIPTokenizer on the vocabulary files of the engine dir, padding as the family was
    trained (SD 2.x: "!" = id 0).
    """
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    oracles = load_oracles(path, family, dtype=dtype, device=device)
    unet, vae, text_encoder = oracles.unet, oracles.vae, oracles.text_encoder
    if oracles.family.penultimate:
        text_encoder = _drop_last_layer(text_encoder, family, oracles.ldm).to(device=device, dtype=dtype)
    pad = {} if oracles.family.pad_token is None else {"pad_token": oracles.family.pad_token}
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=oracles.family.text["max_position_embeddings"], **pad)
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _drop_last_layer(text_encoder: CLIPTextModel, family: str, ldm: dict) -> CLIPTextModel:
    """SD 2.x as diffusers ships it: OpenCLIP without its last resblock, so the last hidden state (after the final
    LayerNorm) is the penultimate layer. (diffusers' clip_skip is no substitute: it skips layers for the prompt but
    not for the negative prompt.)"""
    last = text_encoder.config.num_hidden_layers - 1
    truncated = CLIPTextModel(clip_text_config(family, ldm, num_layers=last))
    state = {k: v for k, v in text_encoder.state_dict().items() if f"layers.{last}." not in k}
    truncated.load_state_dict(state, strict=True)
    return truncated.eval()


def diffusers_inpaint_pipeline(path, family: str, tokenizer_dir, scheduler, dtype: torch.dtype = torch.float32,
                               device: str = "cpu"):
    """diffusers' StableDiffusionInpaintPipeline on the same components as ``diffusers_pipeline`` (9-channel UNets)."""
    from diffusers import StableDiffusionInpaintPipeline

    base = diffusers_pipeline(path, family, tokenizer_dir, scheduler, dtype=dtype, device=device)
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


# --- SDXL ------------------------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, unet/config.json (the structure keys; the widths of the
# tiny presets are read from the tensors and every width-derived count is scaled with them: heads stay 64 wide).
SDXL_BASE_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True}
SDXL_REFINER_UNET = {
    **SDXL_BASE_UNET, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
# vae/config.json of both (the SDXL VAE): same architecture as SD's, scaling_factor 0.13025.
SDXL_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
            "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "force_upcast": True}
# text_encoder/config.json (CLIPTextModel, ViT-L/14) and text_encoder_2/config.json (CLIPTextModelWithProjection,
# OpenCLIP ViT-bigG/14); both with the legacy special ids (eos 2: the pooled token is the argmax id).
SDXL_TEXT_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
SDXL_TEXT_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
               "layer_norm_eps": 1e-5, "projection_dim": 1280, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
# scheduler/scheduler_config.json of both (EulerDiscreteScheduler), the keys every scheduler class takes.
SCHEDULER_CONFIGS["sdxl"] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                             "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
                             "prediction_type": "epsilon"}
# model_index.json: the base zeroes an empty negative prompt; the refiner takes an aesthetic score instead.
SDXL_PIPELINES = {"sdxl": {"force_zeros_for_empty_prompt": True},
                  "sdxl_refiner": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}}
SDXL_EMBEDDERS = "conditioner.embedders."


@dataclasses.dataclass
class SDXLOracles:
    family: str  # "sdxl" | "sdxl_refiner"
    ldm: dict[str, torch.Tensor]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: "torch.nn.Module | None"  # CLIPTextModel (ViT-L); None for the refiner
    text_encoder_2: "torch.nn.Module"  # CLIPTextModelWithProjection (bigG)


def _sdxl_unet_config(family: str, ldm: dict) -> dict:
    config = copy.deepcopy(SDXL_BASE_UNET if family == "sdxl" else SDXL_REFINER_UNET)
    conv_in = ldm[UNET + "input_blocks.0.0.weight"].shape
    scale = conv_in[0] / config["block_out_channels"][0]
    config["in_channels"] = conv_in[1]
    config["block_out_channels"] = [int(c * scale) for c in config["block_out_channels"]]
    config["attention_head_dim"] = [max(1, c // 64) for c in config["block_out_channels"]]
    config["cross_attention_dim"] = ldm[UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    config["projection_class_embeddings_input_dim"] = ldm[UNET + "label_emb.0.0.weight"].shape[1]
    # transformer depth per level, from the tensors (tiny presets are shallower); level 0 of the base has none
    depths = []
    for level, kind in enumerate(config["down_block_types"]):
        first = 1 + level * (config["layers_per_block"] + 1)
        depths.append(_layer_count(ldm, re.escape(f"{UNET}input_blocks.{first}.1.") + r"transformer_blocks\.(\d+)\.")
                      if kind.startswith("CrossAttn") else 1)
    middle = _layer_count(ldm, re.escape(UNET + "middle_block.1.") + r"transformer_blocks\.(\d+)\.")
    if isinstance(config["transformer_layers_per_block"], int):  # the refiner: one depth, the middle's too
        config["transformer_layers_per_block"] = middle
    else:
        config["transformer_layers_per_block"] = depths[:-1] + [middle]
    return config


def _sdxl_text_config(values: dict, ldm: dict, prefix: str, open_clip: bool) -> CLIPTextConfig:
    if open_clip:
        vocab, hidden = ldm[prefix + "token_embedding.weight"].shape
        layers = _layer_count(ldm, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
        intermediate = ldm[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        projection = ldm[prefix + "text_projection"].shape[1]
    else:
        vocab, hidden = ldm[prefix + "embeddings.token_embedding.weight"].shape
        layers = _layer_count(ldm, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
        intermediate = ldm[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = hidden
    return CLIPTextConfig(**{**values, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
                             "num_hidden_layers": layers, "num_attention_heads": hidden // TEXT_HEAD_WIDTH,
                             "projection_dim": projection})


def load_sdxl_oracles(path, family: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> SDXLOracles:
    """diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel (+WithProjection) from the
    SDXL single file at ``path``, configured as the published ``family`` ("sdxl" base or "sdxl_refiner")."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextModelWithProjection

    ldm = load_file(str(path))
    unet_config = _sdxl_unet_config(family, ldm)
    vae_config = {**SDXL_VAE, "block_out_channels": [
        ldm["first_stage_model.encoder.conv_in.weight"].shape[0] * m for m in (1, 2, 4, 4)]}
    base = family == "sdxl"
    g_prefix = f"{SDXL_EMBEDDERS}{1 if base else 0}.model."
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_2 = CLIPTextModelWithProjection(_sdxl_text_config(SDXL_TEXT_G, ldm, g_prefix, open_clip=True))
        text_1 = CLIPTextModel(_sdxl_text_config(SDXL_TEXT_L, ldm, f"{SDXL_EMBEDDERS}0.transformer.text_model.",
                                                 open_clip=False)) if base else None
    _assign(unet, sfu.convert_ldm_unet_checkpoint(ldm, unet_config), dtype)
    _assign(vae, sfu.convert_ldm_vae_checkpoint(ldm, vae_config), dtype)
    state_2 = sfu.convert_open_clip_checkpoint(text_2, ldm, prefix=g_prefix)
    _assign(text_2, _fit_text_state(text_2, state_2), dtype)
    modules = [unet, vae, text_2]
    if base:
        state_1 = sfu.convert_ldm_clip_checkpoint(ldm, remove_prefix=f"{SDXL_EMBEDDERS}0.transformer.")
        _assign(text_1, _fit_text_state(text_1, state_1), dtype)
        modules.append(text_1)
    for module in modules:
        module.to(device=device).eval().requires_grad_(False)
    return SDXLOracles(family, ldm, unet, vae, text_1, text_2)


def _fit_text_state(model, state: dict) -> dict:
    """diffusers' converters emit ``text_model.*`` (and position_ids); transformers >= 5 may have flattened it."""
    if not any(key.startswith("text_model.") for key in model.state_dict()):
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    expected = set(model.state_dict())
    return {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}


def sdxl_tokenizers(tokenizer_dir):
    """transformers' CLIPTokenizers as the SDXL repos ship them: tokenizer/ pads with <|endoftext|>, tokenizer_2/
    with "!" (id 0)."""
    from transformers import CLIPTokenizer

    files = (str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    return (CLIPTokenizer(*files, model_max_length=77),
            CLIPTokenizer(*files, model_max_length=77, pad_token="!"))


def sdxl_pipeline(path, family: str, tokenizer_dir, scheduler, mode: str = "txt2img",
                  dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline (``mode``) on the SDXL single file at ``path``, with
    the published model_index.json flags of ``family``."""
    import diffusers

    oracles = load_sdxl_oracles(path, family, dtype=dtype, device=device)
    tokenizer, tokenizer_2 = sdxl_tokenizers(tokenizer_dir)
    cls = {"txt2img": diffusers.StableDiffusionXLPipeline, "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[mode]
    pipe = cls(vae=oracles.vae, text_encoder=oracles.text_encoder, text_encoder_2=oracles.text_encoder_2,
               tokenizer=tokenizer if oracles.text_encoder is not None else None, tokenizer_2=tokenizer_2,
               unet=oracles.unet, scheduler=scheduler, **SDXL_PIPELINES[family])
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- ControlNet ---------------------------------------------------------------------------------------------------

# diffusers ControlNetModel config.json of the published ControlNets: lllyasviel/control_v11p_sd15_canny (SD 1.5) and
# thibaud/controlnet-sd21-canny-diffusers (SD 2.1: heads 64 wide, so attention_head_dim = heads per level, Linear
# proj_in/out, OpenCLIP's 1024-wide context). Widths the tensors carry are read from them (tiny presets).
CONTROLNET_CONFIGS = {
    "sd15": {"_class_name": "ControlNetModel", "act_fn": "silu", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "class_embed_type": None,
             "conditioning_embedding_out_channels": [16, 32, 96, 256], "conditioning_channels": 3,
             "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False,
             "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
             "norm_num_groups": 32, "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
             "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False},
    "sd21": {"_class_name": "ControlNetModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
             "block_out_channels": [320, 640, 1280, 1280], "class_embed_type": None,
             "conditioning_embedding_out_channels": [16, 32, 96, 256], "conditioning_channels": 3,
             "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 1024,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False,
             "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
             "norm_num_groups": 32, "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
             "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": True},
}  # fmt: skip
SD2_HEAD_WIDTH = 64


def controlnet_config(family: str, ldm: dict) -> dict:
    """The published ControlNet config of ``family`` at the widths of the LDM ControlNet tensors ``ldm`` (with or
    without the control_model. prefix)."""
    prefix = "control_model." if any(k.startswith("control_model.") for k in ldm) else ""
    config = copy.deepcopy(CONTROLNET_CONFIGS[family])
    channels = ldm[prefix + "input_blocks.0.0.weight"].shape[0]
    config["block_out_channels"] = [channels * m for m in (1, 2, 4, 4)]
    config["cross_attention_dim"] = ldm[prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    if isinstance(config["attention_head_dim"], list):  # SD 2.x: heads per level = width / 64
        config["attention_head_dim"] = [c // SD2_HEAD_WIDTH for c in config["block_out_channels"]]
    return config


def diffusers_controlnet(path, family: str, config_dir, dtype: torch.dtype = torch.float32):
    """diffusers' ControlNetModel.from_single_file on an LDM ControlNet file (offline: the published config is
    written to ``config_dir`` and passed as ``config``)."""
    import json
    from pathlib import Path

    from diffusers import ControlNetModel

    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps(controlnet_config(family, load_file(str(path)))))
    model = ControlNetModel.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                             torch_dtype=dtype)
    return model.eval().requires_grad_(False)


def diffusers_controlnet_pipeline(path, family: str, tokenizer_dir, scheduler, controlnets, img2img: bool = False,
                                  dtype: torch.dtype = torch.float32):
    """StableDiffusionControlNet(Img2Img)Pipeline on the components of ``diffusers_pipeline``; ``controlnets``: one
    diffusers ControlNetModel, or a list (wrapped in MultiControlNetModel)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    base = diffusers_pipeline(path, family, tokenizer_dir, scheduler, dtype=dtype)
    controlnet = MultiControlNetModel(controlnets) if isinstance(controlnets, (list, tuple)) else controlnets
    cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
    pipe = cls(**base.components, controlnet=controlnet, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
