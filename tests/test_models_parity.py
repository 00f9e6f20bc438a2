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
from transformers import CLIPTextModel

import rtsd.models
from rtsd.config import ModelConfig
from rtsd.models.synthetic import PRESETS
from rtsd.models.text_encoder import build_text_encoder
from tests.diffusers_oracle import Oracles, load_oracles

FAMILY = {"tiny": "sd15", "tiny-sd2": "sd21"}  # the published configs each preset's oracle is built from
TOLERANCE = 1e-5
BATCH = 2
LATENT_HW = (16, 24)  # UNet: non-square
VAE_LATENT_HW = (8, 12)  # VAE: 64x96 images


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(scope="module", params=["tiny", "tiny-sd2"])
def preset(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint_path(preset, request):
    return request.getfixturevalue({"tiny": "tiny_checkpoint", "tiny-sd2": "tiny_sd2_checkpoint"}[preset])


@pytest.fixture(scope="module")
def oracles(preset, checkpoint_path) -> Oracles:
    return load_oracles(checkpoint_path, FAMILY[preset])


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


@pytest.mark.parametrize("latent_hw", [(9, 13), (17, 10)])
def test_unet_matches_diffusers_on_latents_that_are_not_multiples_of_8(models, oracles, latent_hw):
    """Images that are multiples of 8 but not 64: the downsamplers round up, the upsamplers must land on the skips
    (diffusers forwards upsample_size the same way)."""
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(BATCH, models.config.unet.in_channels, *latent_hw, generator=g)
    context = _inputs(models.config)["context"]
    with torch.no_grad():
        ours = models.unet(sample, torch.tensor([700.0, 20.0]), context)
        theirs = oracles.unet(sample, torch.tensor([700.0, 20.0]), encoder_hidden_states=context).sample
    assert ours.shape == sample.shape
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
    from_folder = rtsd.models.load_checkpoint(folder)  # a refusal here is a failure: rtsd reads diffusers folders
    assert from_folder.config == models.config
    x = _inputs(models.config, seed=1)
    with torch.no_grad():
        assert rel_l2(from_folder.unet(x["sample"], torch.tensor(10), x["context"]),
                      models.unet(x["sample"], torch.tensor(10), x["context"])) < 1e-6  # fmt: skip
        assert rel_l2(from_folder.vae.decode(x["latents"]), models.vae.decode(x["latents"])) < 1e-6
        assert rel_l2(from_folder.vae.encode(x["images"]), models.vae.encode(x["images"])) < 1e-6
        assert rel_l2(from_folder.text_encoder(x["input_ids"]), models.text_encoder(x["input_ids"])) < 1e-6
