"""SDXL base / refiner / inpainting: detection, parameter counts, and the reference models against diffusers and
transformers loaded from the same tiny checkpoint, as a single file (sgm keys) and as a diffusers folder.

Oracles (tests/diffusers_oracle.py): diffusers' UNet2DConditionModel (addition_embed_type "text_time") and
AutoencoderKL, transformers' CLIPTextModel (ViT-L) and CLIPTextModelWithProjection (bigG), configured from the
published SDXL config.json values and filled by diffusers' own single-file converters. fp32 on CPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import rtsd.models
from rtsd.checkpoint import open_checkpoint, summarize
from rtsd.detection import detect_config
from rtsd.errors import UnsupportedModelError
from rtsd.models.synthetic import PRESETS, checkpoint_shapes, write_checkpoint
from tests.diffusers_oracle import load_sdxl_oracles

TOLERANCE = 1e-5  # reference vs diffusers / transformers, relative L2 (as tests/test_models_parity.py)
SAME = 1e-6  # folder vs single file through rtsd
FAMILY = {"tiny-sdxl": "sdxl", "tiny-sdxl-refiner": "sdxl_refiner"}
SDXL_BASE_UNET_PARAMETERS = 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0's UNet


def rel_l2(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# ------------------------------------------------------------------------------------------- detection and counts


def test_full_size_base_layout_has_sdxl_parameter_count():
    """The full-size preset's shapes (meta device: nothing allocated) detect as SDXL base with the published count."""
    shapes = checkpoint_shapes("sdxl")
    unet = {k: s for k, s in shapes.items() if k.startswith("model.diffusion_model.")}
    assert sum(math.prod(s) for s in unet.values()) == SDXL_BASE_UNET_PARAMETERS
    assert len(unet) == 1680  # sd_xl_base_1.0.safetensors' UNet tensors
    config = detect_config(shapes)
    assert config == PRESETS["sdxl"]
    assert (config.family, config.context_dim, config.pooled_dim, config.num_time_ids) == ("sdxl", 2048, 1280, 6)
    assert config.unet.transformer_depth_levels == (0, 2, 10) and config.unet.adm_in_channels == 2816
    assert config.vae.scaling_factor == 0.13025 and config.text_encoder_2.num_layers == 32


def test_full_size_refiner_layout():
    config = detect_config(checkpoint_shapes("sdxl-refiner"))
    assert config == PRESETS["sdxl-refiner"]
    assert (config.family, config.unet.model_channels, config.unet.adm_in_channels, config.num_time_ids) == (
        "sdxl_refiner", 384, 2560, 5)
    assert config.text_encoder_2 is None and config.text_encoder.hidden_size == 1280


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sdxl-refiner", "tiny-sdxl-inpaint"])
def test_tiny_presets_detect_as_themselves(preset):
    config = detect_config(checkpoint_shapes(preset))
    assert config == PRESETS[preset]
    assert config.is_inpainting == (preset == "tiny-sdxl-inpaint")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_single_files(tmp_path, dtype):
    path = write_checkpoint(tmp_path / "sdxl.safetensors", "tiny-sdxl", dtype=dtype)
    info = summarize(open_checkpoint(path))
    assert info["family"] == "sdxl"
    assert str(dtype).removeprefix("torch.") in info["dtypes"]
    assert info["components"]["unet"]["parameters"] == sum(
        math.prod(s) for k, s in checkpoint_shapes("tiny-sdxl").items() if k.startswith("model.diffusion_model."))


def test_unknown_sdxl_variants_fail_in_one_line():
    shapes = checkpoint_shapes("tiny-sdxl")
    only_l = {k: s for k, s in shapes.items() if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(UnsupportedModelError, match=r"text encoders \['clip'\]") as err:
        detect_config(only_l)
    assert "\n" not in str(err.value)
    other_time_ids = {**shapes, "model.diffusion_model.label_emb.0.0.weight": (128, 128 + 3 * 256)}
    with pytest.raises(UnsupportedModelError, match="3 time ids"):
        detect_config(other_time_ids)
    no_text = {k: s for k, s in shapes.items() if not k.startswith("conditioner.")}
    with pytest.raises(UnsupportedModelError, match="label_emb"):
        detect_config(no_text)


# ------------------------------------------------------------------------------------------------------ parity


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {preset: write_checkpoint(root / f"{preset}.safetensors", preset) for preset in FAMILY}


@pytest.fixture(scope="module", params=list(FAMILY))
def preset(request):
    return request.param


@pytest.fixture(scope="module")
def oracles(preset, sdxl_files):
    return load_sdxl_oracles(sdxl_files[preset], FAMILY[preset])


@pytest.fixture(scope="module")
def models(preset, sdxl_files):
    return rtsd.models.load_checkpoint(sdxl_files[preset])


def _ids(config, seed=0):
    """Two rows of ViT-L-style ids (pad = <|endoftext|>): a short prompt with padding and a full one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49405, (2, 77), generator=g)
    ids[:, 0], ids[:, -1] = 49406, 49407
    ids[0, 9:] = 49407
    return ids


def _pad_with(ids, pad):
    out = ids.clone()
    out[0, 10:] = pad
    return out


def _unet_inputs(models, seed=1):
    config = models.config
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, config.unet.in_channels, 16, 24, generator=g),
                timestep=torch.tensor([999.0, 3.0]),
                context=torch.randn(2, 77, config.unet.context_dim, generator=g),
                text_embeds=torch.randn(2, config.pooled_dim, generator=g),
                # original size, crop top-left, target size (base) / aesthetic score (refiner), as pipelines pass
                time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768.0, 1344, 64, 32, 512, 640]])[
                    :, :config.num_time_ids].clone() if config.num_time_ids == 6 else
                torch.tensor([[1024.0, 1024, 0, 0, 6.0], [768.0, 1344, 64, 32, 2.5]]))


def test_loaded_config_is_the_preset(preset, models):
    assert models.config == PRESETS[preset]


def test_unet_with_added_conditions(models, oracles):
    x = _unet_inputs(models)
    ours = models.unet(x["sample"], x["timestep"], x["context"], x["text_embeds"], x["time_ids"])
    theirs = oracles.unet(x["sample"], x["timestep"], x["context"],
                          added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
    print(f"UNet rel L2 {rel_l2(ours, theirs):.2e}")  # shown by pytest -rP
    assert rel_l2(ours, theirs) < TOLERANCE
    # The added conditions move the output far more than the tolerance (they are not silently ignored).
    other = x["time_ids"].clone()
    other[:, 0] += 256
    moved = models.unet(x["sample"], x["timestep"], x["context"], x["text_embeds"], other)
    assert rel_l2(moved, ours) > 100 * TOLERANCE
    moved = models.unet(x["sample"], x["timestep"], x["context"], x["text_embeds"] * 0, x["time_ids"])
    assert rel_l2(moved, ours) > 100 * TOLERANCE


def test_text_encoders_context_and_pooled(models, oracles):
    ids = _ids(models.config)  # padded as the runtime's tokenizer pads: the first encoder's pad token
    context, pooled = models.text_encoder(_pad_with(ids, models.config.text_encoder.pad_token_id))
    big_g = oracles.text_encoder_2(_pad_with(ids, 0), output_hidden_states=True)
    hidden = [big_g.hidden_states[-2]]
    if oracles.text_encoder is not None:  # the base: ViT-L first, padded with <|endoftext|>
        hidden.insert(0, oracles.text_encoder(ids, output_hidden_states=True).hidden_states[-2])
    print(f"context rel L2 {rel_l2(context, torch.cat(hidden, dim=-1)):.2e}, "
          f"pooled {rel_l2(pooled, big_g.text_embeds):.2e}")
    assert rel_l2(context, torch.cat(hidden, dim=-1)) < TOLERANCE
    assert rel_l2(pooled, big_g.text_embeds) < TOLERANCE
    # bigG's padding matters: with ViT-L's padding its hidden states differ (the in-graph re-pad is not a no-op)
    wrong = oracles.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
    assert rel_l2(context[..., -wrong.shape[-1]:], wrong) > 100 * TOLERANCE


def test_vae_decode_and_encode(models, oracles):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 12, generator=g)
    scale = 0.13025  # the published SDXL vae/config.json scaling_factor, as the pipeline applies it
    print(f"VAE decode rel L2 {rel_l2(models.vae.decode(latents), oracles.vae.decode(latents / scale).sample):.2e}")
    assert rel_l2(models.vae.decode(latents), oracles.vae.decode(latents / scale).sample) < TOLERANCE
    images = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1
    theirs = oracles.vae.encode(images).latent_dist.mean * scale
    assert rel_l2(models.vae.encode(images), theirs) < TOLERANCE


# ------------------------------------------------------------------------------------------------- diffusers folder


@pytest.fixture(scope="module")
def base_folder(sdxl_files, tmp_path_factory):
    """tiny-sdxl as diffusers ships SDXL base 1.0: converted by diffusers' functions, saved by save_pretrained."""
    oracles = load_sdxl_oracles(sdxl_files["tiny-sdxl"], "sdxl")
    folder = tmp_path_factory.mktemp("sdxl-folder")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(oracles, name).save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


def test_folder_loads_as_the_single_file(base_folder, sdxl_files):
    single = rtsd.models.load_checkpoint(sdxl_files["tiny-sdxl"])
    folder = rtsd.models.load_checkpoint(base_folder)
    assert folder.config == single.config == PRESETS["tiny-sdxl"]
    ours, theirs = folder.text_encoder.state_dict(), single.text_encoder.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # text_projection comes back untransposed
    _assert_same_outputs(folder, single, _ids(single.config))


def _assert_same_outputs(folder, single, ids) -> None:
    """The folder's text encoder(s) (context and pooled) and UNet compute what the single file's do."""
    for a, b in zip(folder.text_encoder(ids), single.text_encoder(ids)):
        assert rel_l2(a, b) < SAME
    x = _unet_inputs(single)
    args = (x["sample"], x["timestep"], x["context"], x["text_embeds"], x["time_ids"])
    assert rel_l2(folder.unet(*args), single.unet(*args)) < SAME


def test_refiner_folder_loads_as_the_single_file(sdxl_files, tmp_path):
    """stabilityai/stable-diffusion-xl-refiner-1.0's layout: no text_encoder/ (model_index says null), bigG in
    text_encoder_2/, which single files store as embedder 0."""
    oracles = load_sdxl_oracles(sdxl_files["tiny-sdxl-refiner"], "sdxl_refiner")
    for name in ("unet", "vae", "text_encoder_2"):
        getattr(oracles, name).save_pretrained(tmp_path / name)
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
        "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    single = rtsd.models.load_checkpoint(sdxl_files["tiny-sdxl-refiner"])
    folder = rtsd.models.load_checkpoint(tmp_path)
    assert folder.config == single.config == PRESETS["tiny-sdxl-refiner"]
    _assert_same_outputs(folder, single, _pad_with(_ids(single.config), 0))


def test_half_precision_folder_variant(base_folder, tmp_path):
    """An fp16 folder (unet/diffusion_pytorch_model.fp16.safetensors, as the published repo's variant)."""
    import shutil

    folder = tmp_path / "fp16"
    shutil.copytree(base_folder, folder)
    for file in folder.glob("*/*.safetensors"):
        tensors = {k: v.half() for k, v in load_file(str(file)).items()}
        file.unlink()
        save_file(tensors, str(file.with_name(file.stem + ".fp16.safetensors")))
    info = summarize(open_checkpoint(folder))
    assert info["family"] == "sdxl" and info["dtypes"] == ["float16"]
    assert info["components"]["unet"]["parameters"] == sum(
        math.prod(s) for k, s in checkpoint_shapes("tiny-sdxl").items() if k.startswith("model.diffusion_model."))


def test_rtsd_info_shows_family_and_parameter_counts(sdxl_files, capsys):
    from rtsd.cli import main

    assert main(["info", str(sdxl_files["tiny-sdxl-refiner"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl_refiner"
    shapes = checkpoint_shapes("tiny-sdxl-refiner")
    for name, prefix in (("unet", "model.diffusion_model."), ("text_encoder", "conditioner."),
                         ("vae", "first_stage_model.")):
        assert info["components"][name]["parameters"] == sum(
            math.prod(s) for k, s in shapes.items() if k.startswith(prefix))
