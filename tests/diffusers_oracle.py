"""Independent oracles: diffusers / transformers models and pipelines loaded from an rtsd-readable checkpoint.

Weights go through diffusers' own LDM converters (``diffusers.loaders.single_file_utils``), configured from an
``original_config`` dict in the LDM YAML structure, so nothing here reuses rtsd's model code and nothing touches the
network.
"""

from __future__ import annotations

import torch

from rtsd.config import ModelConfig


def ldm_original_config(config: ModelConfig) -> dict:
    """The v1-inference.yaml / v2-inference.yaml structure for ``config`` (what diffusers' converters read)."""
    u, v, s = config.unet, config.vae, config.scheduler
    unet_params = {"in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
                   "attention_resolutions": list(u.attention_resolutions), "num_res_blocks": u.num_res_blocks,
                   "channel_mult": list(u.channel_mult), "use_spatial_transformer": True,
                   "transformer_depth": u.transformer_depth, "context_dim": u.context_dim,
                   "use_linear_in_transformer": u.use_linear_in_transformer, "legacy": False, "image_size": 32}
    if u.num_head_channels > 0:
        unet_params["num_head_channels"] = u.num_head_channels
    else:
        unet_params["num_heads"] = u.num_heads
    return {"model": {"params": {
        "linear_start": s.beta_start, "linear_end": s.beta_end, "timesteps": s.num_train_timesteps,
        "scale_factor": v.scaling_factor,
        "parameterization": "v" if s.prediction_type == "v_prediction" else "eps",
        "unet_config": {"params": unet_params},
        "first_stage_config": {"params": {"embed_dim": v.embed_dim, "ddconfig": {
            "double_z": True, "z_channels": v.z_channels, "resolution": 256, "in_channels": v.in_channels,
            "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks,
            "attn_resolutions": [], "dropout": 0.0}}},
    }}}


def diffusers_models(state_dict: dict[str, torch.Tensor], config: ModelConfig):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel) in fp32 from an LDM single-file state dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    original = ldm_original_config(config)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, state_dict)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state_dict, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, state_dict, scaling_factor=config.vae.scaling_factor)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state_dict, vae_config), strict=True)
    te = config.text_encoder
    text_config = CLIPTextConfig(vocab_size=te.vocab_size, hidden_size=te.hidden_size,
                                 intermediate_size=te.intermediate_size, num_hidden_layers=te.num_layers,
                                 num_attention_heads=te.num_heads, max_position_embeddings=te.max_position_embeddings,
                                 hidden_act=te.hidden_act, layer_norm_eps=te.layer_norm_eps,
                                 bos_token_id=te.bos_token_id, eos_token_id=te.eos_token_id, pad_token_id=1)
    text_encoder = CLIPTextModel(text_config)
    converted = sfu.convert_ldm_clip_checkpoint(state_dict)
    converted.pop("text_model.embeddings.position_ids", None)
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):  # transformers 5 dropped the prefix
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    text_encoder.load_state_dict(converted, strict=True)
    return unet.eval(), vae.eval(), text_encoder.eval()


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


def diffusers_pipeline(state_dict, config: ModelConfig, tokenizer_dir, scheduler, img2img: bool = False):
    """A diffusers StableDiffusion(Img2Img)Pipeline on the same weights; tokenizer = transformers' CLIPTokenizer."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, vae, text_encoder = diffusers_models(state_dict, config)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=config.text_encoder.max_position_embeddings)
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
