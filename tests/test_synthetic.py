"""Synthetic checkpoints: exact SD key layouts (checked against diffusers/transformers built on the meta device),
deterministic streaming writes, activations that stay O(1), and strict loading errors."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rtsd.models
from rtsd.errors import CheckpointError
from rtsd.models import build_models, load_state
from rtsd.models.loading import SCHEDULE_KEYS
from rtsd.models.synthetic import PRESETS, checkpoint_shapes, checkpoint_specs, write_checkpoint

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPEN_CLIP = "cond_stage_model.model."
POSITION_IDS = CLIP + "embeddings.position_ids"
# Tensors real files carry beside the text network: CLIP's position_ids, OpenCLIP's loss temperature and projection.
TEXT_EXTRAS = {POSITION_IDS, OPEN_CLIP + "logit_scale", OPEN_CLIP + "text_projection"}


def _component(shapes: dict, prefix: str) -> dict:
    return {key: shape for key, shape in shapes.items() if key.startswith(prefix) and key not in TEXT_EXTRAS}


def _params(shapes: dict) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def _meta_tensors(shapes: dict) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


# ------------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(("tiny", "full"), [("tiny", "sd15"), ("tiny-sd2", "sd21")])
def test_tiny_presets_have_the_full_key_layout_modulo_sizes(tiny, full):
    small, large = checkpoint_specs(tiny), checkpoint_specs(full)
    assert [spec.key for spec in small] == [spec.key for spec in large]
    assert [len(spec.shape) for spec in small] == [len(spec.shape) for spec in large]
    assert sum(math.prod(s.shape) for s in small) < sum(math.prod(s.shape) for s in large) / 20


# (preset, text prefix, UNet params, text tensors, text params, extras): SD 1.5 with CLIP ViT-L/14, SD 2.1 with
# OpenCLIP ViT-H/14 (its 24 resblocks, of which SD 2 runs 23). The VAE is the same in both.
FULL_SIZE = [
    ("sd15", CLIP, 859_520_964, 196, 123_060_480, {POSITION_IDS: (1, 77)}),
    ("sd21", OPEN_CLIP, 865_910_724, 292, 352_984_064, {OPEN_CLIP + "logit_scale": (), OPEN_CLIP + "text_projection": (1024, 1024)}),
]  # fmt: skip


@pytest.mark.parametrize(("preset", "text_prefix", "unet_params", "text_tensors", "text_params", "extras"), FULL_SIZE)
def test_full_size_preset_counts(preset, text_prefix, unet_params, text_tensors, text_params, extras):
    shapes = checkpoint_shapes(preset)
    unet, vae, text = _component(shapes, UNET), _component(shapes, VAE), _component(shapes, text_prefix)
    assert (len(unet), _params(unet)) == (686, unet_params)
    assert (len(vae), _params(vae)) == (248, 83_653_863)
    assert (len(text), _params(text)) == (text_tensors, text_params)
    assert {key: shapes[key] for key in extras} == extras
    assert all(shapes[key] == (1000,) for key in SCHEDULE_KEYS)
    assert len(shapes) == 686 + 248 + text_tensors + len(extras) + len(SCHEDULE_KEYS)


@pytest.mark.parametrize(("preset", "model_type", "context"), [("sd15", "v1", 768), ("sd21", "v2", 1024)])
def test_full_size_presets_detected_by_diffusers(preset, model_type, context):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    shapes = checkpoint_shapes(preset)
    assert infer_diffusers_model_type(_meta_tensors(shapes)) == model_type
    # "v1" is diffusers' fallback: also check the keys its SD decision reads.
    assert shapes[UNET + "output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert shapes[UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"] == (320, context)


FAMILY = {"sd15": "sd15", "sd21": "sd21"}  # the published configs the diffusers models are built from


def _diffusers_text_model(preset: str, ldm: dict):
    """transformers' CLIPTextModel for the preset and the preset's text tensors converted the way diffusers does."""
    from diffusers.loaders import single_file_utils as sfu
    from tests.diffusers_oracle import clip_text_config
    from transformers import CLIPTextModel

    family = FAMILY[preset]
    if family == "sd15":
        return CLIPTextModel(clip_text_config(family, ldm)), sfu.convert_ldm_clip_checkpoint(ldm)
    model = CLIPTextModel(clip_text_config(family, ldm, num_layers=23))  # diffusers' SD 2.x text encoder stops at
    return model, sfu.convert_open_clip_checkpoint(model, ldm)  # the penultimate layer


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_size_tensors_map_one_to_one_onto_diffusers_and_transformers_models(preset):
    """Every LDM tensor lands, through diffusers' converters, on a tensor of the same shape in the diffusers UNet/VAE
    and transformers' CLIPTextModel of that SD version, and nothing is left over on either side."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from tests.diffusers_oracle import ldm_original_config

    ldm = _meta_tensors(checkpoint_shapes(preset))
    original = ldm_original_config(FAMILY[preset], ldm)
    with torch.device("meta"):
        unet_config = sfu.create_unet_diffusers_config_from_ldm(original, ldm)
        vae_config = sfu.create_vae_diffusers_config_from_ldm(original, ldm)
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
        text, converted_text = _diffusers_text_model(preset, ldm)

    def shapes_of(state):
        return {key.removeprefix("text_model."): tuple(value.shape) for key, value in state.items()}

    assert shapes_of(sfu.convert_ldm_unet_checkpoint(ldm, unet_config)) == shapes_of(unet.state_dict())
    assert shapes_of(sfu.convert_ldm_vae_checkpoint(ldm, vae_config)) == shapes_of(vae.state_dict())
    converted = shapes_of(converted_text)
    extras = {"embeddings.position_ids", "text_projection.weight"}  # not CLIPTextModel tensors
    assert {k: v for k, v in converted.items() if k not in extras} == shapes_of(text.state_dict())


def test_presets_are_what_detection_reads_back():
    from rtsd.checkpoint import detect_config

    for name, config in PRESETS.items():
        assert detect_config(checkpoint_shapes(name)) == config, name


# --------------------------------------------------------------------------------------------------- writing


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_written_file_matches_the_layout_and_is_deterministic(tmp_path, tiny_checkpoint):
    with safe_open(str(tiny_checkpoint), "pt") as f:
        names = f.keys()  # safe_open is not a Mapping: iterate its key list
        written = {key: tuple(f.get_slice(key).get_shape()) for key in names}
    assert written == checkpoint_shapes("tiny")

    again = write_checkpoint(tmp_path / "again.safetensors", "tiny", seed=0)
    assert _sha256(again) == _sha256(tiny_checkpoint)
    other_seed = load_file(str(write_checkpoint(tmp_path / "seed1.safetensors", "tiny", seed=1)))
    first = load_file(str(tiny_checkpoint))
    key = UNET + "input_blocks.1.0.in_layers.2.weight"
    assert not torch.equal(first[key], other_seed[key])
    assert torch.equal(first["alphas_cumprod"], other_seed["alphas_cumprod"])


def test_fp16_checkpoint(tmp_path, tiny_checkpoint):
    half = load_file(str(write_checkpoint(tmp_path / "half.safetensors", "tiny", dtype=torch.float16)))
    full = load_file(str(tiny_checkpoint))
    assert {key: t.dtype for key, t in half.items() if key != POSITION_IDS} == {
        key: torch.float16 for key in half if key != POSITION_IDS
    }
    assert half[POSITION_IDS].dtype == torch.int64
    key = VAE + "decoder.conv_in.weight"
    assert torch.equal(half[key], full[key].half())


def test_schedule_buffers_match_diffusers_ddpm_tables(tiny_checkpoint):
    from diffusers import DDPMScheduler

    ckpt = load_file(str(tiny_checkpoint))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(ckpt["betas"], scheduler.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(ckpt["alphas_cumprod"], scheduler.alphas_cumprod, rtol=1e-6, atol=0)
    assert ckpt["alphas_cumprod_prev"][0] == 1.0
    torch.testing.assert_close(ckpt["alphas_cumprod_prev"][1:], ckpt["alphas_cumprod"][:-1])


def test_header_is_valid_safetensors_json(tiny_checkpoint):
    raw = tiny_checkpoint.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    assert (8 + size) % 8 == 0
    ends = sorted(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    assert ends[-1] == len(raw) - 8 - size


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic preset 'sd9'.*tiny"):
        write_checkpoint(tmp_path / "x.safetensors", "sd9")


# ------------------------------------------------------------------------------------------- activations


def _output_stds(models, latent_hw=(16, 24)) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    ids = torch.from_numpy(models.tokenizer(["a photograph of an astronaut riding a horse", ""]))
    with torch.no_grad():
        context = models.text_encoder(ids)
        latents = torch.randn(2, 4, *latent_hw, generator=g)
        prediction = models.unet(latents, torch.tensor([999, 1]), context)
        images = models.vae.decode(latents[:1, :, :16, :16])  # one 128x128 image: the VAE is the slow part on CPU
        encoded = models.vae.encode(images.clamp(-1, 1))
    outputs = {"text_encoder": context, "unet": prediction, "vae_decode": images, "vae_encode": encoded}
    for name, value in outputs.items():
        assert torch.isfinite(value).all(), name
    return {name: value.std().item() for name, value in outputs.items()}


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "tiny_sd2_checkpoint"])
def test_tiny_activations_are_finite_and_order_one(checkpoint, request):
    stds = _output_stds(rtsd.models.load_checkpoint(request.getfixturevalue(checkpoint)))
    print(f"{checkpoint} output std:", stds)
    assert all(0.05 < std < 5 for std in stds.values()), stds


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_size_write_load_and_forward(tmp_path, preset):
    path = tmp_path / f"{preset}.safetensors"
    # A separate process, so that peak memory is the writer's alone: it streams one tensor at a time. VmHWM (this
    # process image's peak RSS), not ru_maxrss, which a child inherits from the parent it was forked from.
    script = (
        "import re, sys; from rtsd.models.synthetic import write_checkpoint; write_checkpoint(sys.argv[1], sys.argv[2]); "
        "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))"
    )
    run = subprocess.run([sys.executable, "-c", script, str(path), preset], check=True, capture_output=True, text=True)
    peak_kib = int(run.stdout.split()[-1])
    data_bytes = sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in checkpoint_specs(preset))
    assert data_bytes < path.stat().st_size < data_bytes + 1_000_000  # tensors + header, nothing else
    assert peak_kib < 1.5e6, f"writer peak RSS {peak_kib / 1e6:.2f} GB"

    models = rtsd.models.load_checkpoint(path)
    assert models.config == PRESETS[preset]
    stds = _output_stds(models, latent_hw=(32, 32))  # UNet at 256x256
    print(f"{preset} output std:", stds, f"writer peak RSS {peak_kib / 1e6:.2f} GB")
    assert all(0.05 < std < 5 for std in stds.values()), stds


# ------------------------------------------------------------------------------------------ strict loading


@pytest.fixture(scope="module")
def tiny_state(tiny_checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_checkpoint))


def test_checkpoint_with_a_missing_key_is_refused_by_name(tmp_path, tiny_state):
    dropped = UNET + "output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    path = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in tiny_state.items() if k != dropped}, str(path))
    with pytest.raises(CheckpointError, match=r"1 missing key: " + dropped.replace(".", r"\.")):
        rtsd.models.load_checkpoint(path)


def test_checkpoint_with_an_extra_key_is_refused_by_name(tmp_path, tiny_state):
    extra = UNET + "input_blocks.1.0.extra_scale"
    path = tmp_path / "extra.safetensors"
    save_file({**tiny_state, extra: torch.ones(3)}, str(path))
    with pytest.raises(CheckpointError, match=r"1 unexpected key: " + extra.replace(".", r"\.")):
        rtsd.models.load_checkpoint(path)


def test_load_state_lists_every_problem(tiny_state):
    models = build_models(PRESETS["tiny"], device="meta")
    state = dict(tiny_state)
    del state[VAE + "decoder.conv_out.bias"], state[VAE + "encoder.conv_in.bias"]
    state[CLIP + "encoder.layers.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    state["cond_stage_model.model.ln_final.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as error:
        load_state(models, state)
    message = str(error.value)
    assert "\n" not in message
    assert "2 missing keys: first_stage_model.decoder.conv_out.bias, first_stage_model.encoder.conv_in.bias" in message
    assert "1 unexpected key: cond_stage_model.model.ln_final.weight" in message
    assert "1 shape mismatch: " + CLIP + "encoder.layers.0.mlp.fc1.weight (3, 3) in the file vs (512, 128)" in message


def test_schedule_and_position_ids_are_not_network_weights(tiny_state):
    models = build_models(PRESETS["tiny"], device="meta")
    load_state(models, tiny_state)  # carries both; neither is unexpected
    assert not any(p.is_meta for module in models.components().values() for p in module.parameters())
