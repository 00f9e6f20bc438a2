"""The reference models against independent implementations loaded from the same single-file checkpoint.

Oracles: diffusers' UNet2DConditionModel and AutoencoderKL, transformers' CLIPTextModel, each filled through diffusers'
own LDM converters (``diffusers.loaders.single_file_utils``) with an LDM-yaml-shaped ``original_config`` built from the
preset; nothing touches the network. fp32 on CPU, batch 2, non-square latents; relative L2 error < 1e-5.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

import rtsd.models
from rtsd.config import ModelConfig
from rtsd.errors import CheckpointError, UnsupportedModelError
from rtsd.models.synthetic import PRESETS
from rtsd.models.text_encoder import build_text_encoder

TOLERANCE = 1e-5
BATCH = 2
LATENT_HW = (16, 24)  # UNet: non-square, multiples of 8 (three downsamplings must line up with the skips)
VAE_LATENT_HW = (8, 12)  # VAE: 64x96 images
OPEN_CLIP = "cond_stage_model.model."


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


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


def load_oracles(path, config: ModelConfig) -> Oracles:
    ldm = load_file(str(path))
    original = ldm_original_config(config)

    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, ldm)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(ldm, unet_config), strict=True)

    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, ldm)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(ldm, vae_config), strict=True)

    text_encoder = CLIPTextModel(clip_text_config(config))
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
    missing, unexpected = text_encoder.load_state_dict(text_state, strict=False)
    assert not missing, missing
    # Not part of CLIPTextModel: the position_ids buffer (SD 1.x files) and the pooled projection (SD 2.x files).
    assert {key.removeprefix("text_model.") for key in unexpected} <= {
        "embeddings.position_ids",
        "text_projection.weight",
    }

    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Oracles(config, ldm, unet, vae, text_encoder)


@pytest.fixture(scope="module", params=["tiny", "tiny-sd2"])
def preset(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint_path(preset, request):
    return request.getfixturevalue({"tiny": "tiny_checkpoint", "tiny-sd2": "tiny_sd2_checkpoint"}[preset])


@pytest.fixture(scope="module")
def oracles(preset, checkpoint_path) -> Oracles:
    return load_oracles(checkpoint_path, PRESETS[preset])


@pytest.fixture(scope="module")
def models(checkpoint_path) -> rtsd.models.ReferenceModels:
    return rtsd.models.load_checkpoint(checkpoint_path, dtype=torch.float32, device="cpu")


def _inputs(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = config.latent_channels
    ids = torch.randint(
        0, config.text_encoder.vocab_size - 2, (BATCH, config.text_encoder.max_position_embeddings), generator=g
    )
    ids[:, 0] = config.text_encoder.bos_token_id
    ids[0, 9] = config.text_encoder.eos_token_id  # a short prompt followed by padding, and one that fills all 77
    ids[0, 10:] = config.text_encoder.pad_token_id
    return {
        "sample": torch.randn(BATCH, config.unet.in_channels, *LATENT_HW, generator=g),
        "context": torch.randn(
            BATCH, config.text_encoder.max_position_embeddings, config.unet.context_dim, generator=g
        ),
        "latents": torch.randn(BATCH, c, *VAE_LATENT_HW, generator=g),
        "images": torch.rand(BATCH, 3, VAE_LATENT_HW[0] * 8, VAE_LATENT_HW[1] * 8, generator=g) * 2 - 1,
        "input_ids": ids,
    }


def test_loaded_config_is_the_preset(preset, models):
    assert models.config == PRESETS[preset]


@pytest.mark.parametrize("timestep", [torch.tensor([999.0, 3.0]), torch.tensor(500), torch.tensor([250])])
def test_unet_matches_diffusers(models, oracles, timestep):
    x = _inputs(models.config)
    with torch.no_grad():
        ours = models.unet(x["sample"], timestep, x["context"])
        theirs = oracles.unet(x["sample"], timestep, encoder_hidden_states=x["context"]).sample
    assert ours.shape == x["sample"].shape
    assert rel_l2(ours, theirs) < TOLERANCE


def test_vae_decode_matches_diffusers(models, oracles):
    latents = _inputs(models.config)["latents"]
    with torch.no_grad():
        ours = models.vae.decode(latents)
        theirs = oracles.vae.decode(latents / oracles.vae.config.scaling_factor).sample
    assert ours.shape == (BATCH, 3, VAE_LATENT_HW[0] * 8, VAE_LATENT_HW[1] * 8)
    assert rel_l2(ours, theirs) < TOLERANCE


def test_vae_encode_matches_diffusers(models, oracles):
    images = _inputs(models.config)["images"]
    with torch.no_grad():
        ours = models.vae.encode(images)
        theirs = oracles.vae.encode(images).latent_dist.mean * oracles.vae.config.scaling_factor
    assert ours.shape == (BATCH, models.config.latent_channels, *VAE_LATENT_HW)
    assert rel_l2(ours, theirs) < TOLERANCE


def _text_encoder_at(models, output_layer: int) -> torch.nn.Module:
    """The reference text encoder with the same weights, conditioned on another layer."""
    if output_layer == models.config.text_encoder.output_layer:
        return models.text_encoder
    encoder = build_text_encoder(dataclasses.replace(models.config.text_encoder, output_layer=output_layer)).eval()
    encoder.load_state_dict(models.text_encoder.state_dict(), strict=True)
    return encoder


def _final_layer_norm(model: CLIPTextModel) -> torch.nn.Module:
    text_model = getattr(model, "text_model", model)  # transformers < 5 nests the transformer one level deeper
    return text_model.final_layer_norm


@pytest.mark.parametrize("output_layer", [-1, -2])
def test_text_encoder_matches_transformers(models, oracles, output_layer):
    ids = _inputs(models.config)["input_ids"]
    with torch.no_grad():
        ours = _text_encoder_at(models, output_layer)(ids)
        out = oracles.text_encoder(ids, output_hidden_states=True)
        if output_layer == -1:
            theirs = out.last_hidden_state
        else:  # SD 2.x and "clip skip": an earlier layer, with the final LayerNorm applied
            theirs = _final_layer_norm(oracles.text_encoder)(out.hidden_states[output_layer])
    assert ours.shape == (BATCH, 77, models.config.text_encoder.hidden_size)
    assert rel_l2(ours, theirs) < TOLERANCE


def test_text_encoder_key_contract_loads_ldm_keys_directly(models, oracles):
    """``text_encoder.load_state_dict`` takes the checkpoint's ``cond_stage_model.`` keys minus the prefix."""
    prefix = "cond_stage_model."
    state = {k[len(prefix) :]: v for k, v in oracles.ldm.items() if k.startswith(prefix)}
    state.pop("transformer.text_model.embeddings.position_ids", None)  # a buffer we do not keep (arange instead)
    state.pop("model.logit_scale", None)
    state.pop("model.text_projection", None)
    encoder = build_text_encoder(models.config.text_encoder)
    encoder.load_state_dict(state, strict=True)
    unet = type(models.unet)(models.config.unet)
    unet.load_state_dict(
        {
            k[len("model.diffusion_model.") :]: v
            for k, v in oracles.ldm.items()
            if k.startswith("model.diffusion_model.")
        },
        strict=True,
    )


def test_diffusers_folder_loads_equally(tmp_path, preset, models, oracles):
    folder = tmp_path / f"{preset}-diffusers"
    oracles.unet.save_pretrained(folder / "unet")
    oracles.vae.save_pretrained(folder / "vae")
    oracles.text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
            }
        )
    )
    try:
        from_folder = rtsd.models.load_checkpoint(folder)
    except (CheckpointError, UnsupportedModelError) as error:
        if "diffusers" in str(error) and "not supported" in str(error):
            pytest.skip(f"rtsd.checkpoint refuses this diffusers folder: {error}")
        raise
    assert from_folder.config == models.config
    x = _inputs(models.config, seed=1)
    with torch.no_grad():
        assert rel_l2(from_folder.unet(x["sample"], torch.tensor(10), x["context"]),
                      models.unet(x["sample"], torch.tensor(10), x["context"])) < 1e-6  # fmt: skip
        assert rel_l2(from_folder.vae.decode(x["latents"]), models.vae.decode(x["latents"])) < 1e-6
        assert rel_l2(from_folder.vae.encode(x["images"]), models.vae.encode(x["images"])) < 1e-6
        assert rel_l2(from_folder.text_encoder(x["input_ids"]), models.text_encoder(x["input_ids"])) < 1e-6
