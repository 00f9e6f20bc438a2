"""SD 2.x diffusers folders (stabilityai/stable-diffusion-2-1's layout) load as the single file they came from.

The folder is made by diffusers' own single-file converters from the tiny-sd2 checkpoint and saved with
``StableDiffusionPipeline.save_pretrained``: a 23-layer ``CLIPTextModel`` (diffusers drops OpenCLIP's resblock 23),
a v-prediction scheduler config. Oracles: the same folder read by diffusers / transformers, and the single file read
by diffusers' converters with every layer (tests/diffusers_oracle.py).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

import rtsd.models
from rtsd.checkpoint import open_checkpoint
from rtsd.cli import main
from rtsd.errors import CheckpointError
from rtsd.export.pipeline import export
from rtsd.export.specs import ShapeRange
from rtsd.models.synthetic import PRESETS
from rtsd.models.text_encoder import build_text_encoder
from rtsd.tokenizer import Tokenizer
from tests.diffusers_oracle import clip_text_config, ldm_original_config, load_oracles

CONFIG = PRESETS["tiny-sd2"]
TOLERANCE = 1e-5  # against diffusers / transformers
SAME = 1e-6  # folder vs single file through rtsd: the same weights through the same code
DROPPED = "cond_stage_model.model.transformer.resblocks.23."


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _assign(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def folder(tiny_sd2_checkpoint, tmp_path_factory):
    """tiny-sd2 as diffusers ships SD 2.1: converted by diffusers' own functions, saved by the pipeline."""
    ldm = load_file(str(tiny_sd2_checkpoint))
    original = ldm_original_config("sd21", ldm)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, ldm)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, ldm)
    unet = _assign(UNet2DConditionModel(**unet_config), sfu.convert_ldm_unet_checkpoint(ldm, unet_config))
    vae = _assign(AutoencoderKL(**vae_config), sfu.convert_ldm_vae_checkpoint(ldm, vae_config))
    # SD 2.1's text_encoder/config.json: OpenCLIP's width and activation, one layer fewer than the tower.
    text_encoder = CLIPTextModel(clip_text_config("sd21", ldm, num_layers=23))
    text_state = sfu.convert_open_clip_checkpoint(text_encoder, ldm)  # drops resblocks.23 and text_projection
    if not any(key.startswith("text_model.") for key in text_encoder.state_dict()):
        text_state = {key.removeprefix("text_model."): value for key, value in text_state.items()}
    _assign(text_encoder, text_state)

    work = tmp_path_factory.mktemp("sd2-diffusers")
    Tokenizer.default(pad_token_id=0).save(work / "vocab")
    tokenizer = CLIPTokenizer(str(work / "vocab" / "vocab.json"), str(work / "vocab" / "merges.txt"), pad_token="!")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(work / "tiny-sd2")
    return work / "tiny-sd2"


@pytest.fixture(scope="module")
def folder_clip(folder) -> CLIPTextModel:
    """transformers' own reading of the folder's text encoder."""
    return CLIPTextModel.from_pretrained(folder / "text_encoder").eval()


@pytest.fixture(scope="module")
def from_folder(folder) -> rtsd.models.ReferenceModels:
    return rtsd.models.load_checkpoint(folder)


@pytest.fixture(scope="module")
def from_file(tiny_sd2_checkpoint) -> rtsd.models.ReferenceModels:
    return rtsd.models.load_checkpoint(tiny_sd2_checkpoint)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = CONFIG.text_encoder
    ids = torch.randint(0, t.vocab_size - 2, (2, t.max_position_embeddings), generator=g)
    ids[:, 0] = t.bos_token_id
    ids[0, 9] = t.eos_token_id
    ids[0, 10:] = t.pad_token_id
    return {
        "sample": torch.randn(2, 4, 8, 16, generator=g),
        "context": torch.randn(2, t.max_position_embeddings, CONFIG.unet.context_dim, generator=g),
        "latents": torch.randn(2, 4, 4, 6, generator=g),
        "images": torch.rand(2, 3, 32, 48, generator=g) * 2 - 1,
        "input_ids": ids,
    }


def test_folder_is_laid_out_as_diffusers_ships_sd2(folder):
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text["hidden_act"] == "gelu" and text["num_hidden_layers"] == CONFIG.text_encoder.num_layers - 1
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_folder_reads_as_the_single_file_minus_the_dropped_layer(folder, tiny_sd2_checkpoint):
    """Every LDM tensor read from the folder, q/k/v packed back into in_proj, equals the single file's."""
    ours = open_checkpoint(folder).tensors()
    theirs = open_checkpoint(tiny_sd2_checkpoint).tensors()
    assert any(key.endswith("attn.in_proj_weight") for key in ours)
    unused = {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
    expected = {k for k in theirs if k.startswith(("model.", "first_stage", "cond_stage")) and k not in unused}
    assert sorted(ours) == sorted(k for k in expected if not k.startswith(DROPPED))
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key


def test_single_file_converted_back_from_a_folder_loads_too(folder, from_folder, tmp_path):
    """The 23-layer tower in a single file (what converting a diffusers folder back gives) detects as 24 layers."""
    path = tmp_path / "back.safetensors"
    save_file(open_checkpoint(folder).tensors(), path)
    models = rtsd.models.load_checkpoint(path)
    assert models.config == dataclasses.replace(from_folder.config, scheduler=CONFIG.scheduler)  # no scheduler here
    ids = _inputs()["input_ids"]
    with torch.no_grad():
        assert torch.equal(models.text_encoder(ids), from_folder.text_encoder(ids))


def test_loads_as_sd2_with_the_scheduler_configs_prediction_type(from_folder):
    config = from_folder.config
    assert config.family == "sd2" and config.text_encoder.kind == "open_clip"
    assert config.prediction_type == "v_prediction"
    # The whole tower is described (24 layers, penultimate output), as for the single file; only 23 are built.
    assert config == dataclasses.replace(CONFIG, scheduler=dataclasses.replace(CONFIG.scheduler,
                                                                               prediction_type="v_prediction"))
    assert len(from_folder.text_encoder.layer_stack()) == CONFIG.text_encoder.num_layers - 1


def test_unet_matches_the_single_file_and_diffusers(folder, from_folder, from_file):
    x = _inputs()
    diffusers_unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    timestep = torch.tensor([999.0, 3.0])
    with torch.no_grad():
        ours = from_folder.unet(x["sample"], timestep, x["context"])
        assert rel_l2(ours, from_file.unet(x["sample"], timestep, x["context"])) < SAME
        theirs = diffusers_unet(x["sample"], timestep, encoder_hidden_states=x["context"]).sample
    assert rel_l2(ours, theirs) < TOLERANCE


def test_vae_matches_the_single_file_and_diffusers(folder, from_folder, from_file):
    x = _inputs()
    diffusers_vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    scale = diffusers_vae.config.scaling_factor
    with torch.no_grad():
        decoded = from_folder.vae.decode(x["latents"])
        encoded = from_folder.vae.encode(x["images"])
        assert rel_l2(decoded, from_file.vae.decode(x["latents"])) < SAME
        assert rel_l2(encoded, from_file.vae.encode(x["images"])) < SAME
        assert rel_l2(decoded, diffusers_vae.decode(x["latents"] / scale).sample) < TOLERANCE
        assert rel_l2(encoded, diffusers_vae.encode(x["images"]).latent_dist.mean * scale) < TOLERANCE


def _final_layer_norm(model: CLIPTextModel) -> torch.nn.Module:
    return getattr(model, "text_model", model).final_layer_norm  # transformers < 5 nests one level deeper


def test_text_encoder_matches_the_single_file_and_transformers(folder_clip, from_folder, from_file,
                                                              tiny_sd2_checkpoint):
    ids = _inputs()["input_ids"]
    whole_tower = load_oracles(tiny_sd2_checkpoint, "sd21").text_encoder  # all 24 layers, from the single file
    with torch.no_grad():
        ours = from_folder.text_encoder(ids)
        assert rel_l2(ours, from_file.text_encoder(ids)) < SAME
        # What diffusers' SD 2.x pipeline conditions on: the 23-layer model's last hidden state ...
        assert rel_l2(ours, folder_clip(ids).last_hidden_state) < TOLERANCE
        # ... which is the whole tower's penultimate layer with the final LayerNorm.
        penultimate = whole_tower(ids, output_hidden_states=True).hidden_states[-2]
        assert rel_l2(ours, _final_layer_norm(whole_tower)(penultimate)) < TOLERANCE


def test_another_output_layer_needs_the_layers_it_runs(from_folder, folder_clip):
    """Clip skip on a folder's encoder: earlier layers work, the dropped last layer is a clear error, never random."""
    ids = _inputs()["input_ids"]
    text_config = from_folder.config.text_encoder
    earlier = build_text_encoder(dataclasses.replace(text_config, output_layer=-3)).eval()
    earlier.load_state_dict(from_folder.text_encoder.state_dict(), strict=True)
    with torch.no_grad():
        hidden = folder_clip(ids, output_hidden_states=True).hidden_states[-2]
        assert rel_l2(earlier(ids), _final_layer_norm(folder_clip)(hidden)) < TOLERANCE
    last = build_text_encoder(dataclasses.replace(text_config, output_layer=-1))
    with pytest.raises(CheckpointError, match=r"have 23 of 24 layers, but output layer -1 runs 24.*clip skip 2"):
        last.load_state_dict(from_folder.text_encoder.state_dict(), strict=True)


def test_rtsd_info_on_the_folder(folder, capsys):
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "diffusers" and info["family"] == "sd2"
    assert info["prediction_type"] == "v_prediction" and info["prediction_type_source"] == "checkpoint config"
    assert info["config"]["text_encoder"]["num_layers"] == 24 and info["config"]["text_encoder"]["output_layer"] == -2


def test_export_from_the_folder(folder, folder_clip, tmp_path):
    """No prediction type given: the manifest takes v_prediction from the folder; the text encoder ONNX is SD 2.x's.

    The text encoder alone (seconds): it is the one network whose folder form differs from the single file's.
    """
    import onnxruntime

    log = []
    out = export(folder, tmp_path / "engines", shape_range=ShapeRange(min_size=64, max_size=64, opt_size=64,
                                                                      max_batch=1),
                 components=("text_encoder",), progress=log.append)
    assert any("prediction type v_prediction (from the folder's scheduler/scheduler_config.json)" in line
               for line in log), log
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["scheduler"]["prediction_type"] == "v_prediction"
    assert manifest["model"]["family"] == "sd2" and manifest["model"]["text_encoder"]["output_layer"] == -2
    assert manifest["source"]["format"] == "diffusers"
    ids = _inputs()["input_ids"]
    session = onnxruntime.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    extra = np.zeros(session.get_inputs()[1].shape, np.float32)  # no textual-inversion rows used
    ours = session.run(None, {"input_ids": ids.numpy().astype(np.int64), "extra_embeddings": extra})[0]
    with torch.no_grad():
        theirs = folder_clip(ids).last_hidden_state
    assert rel_l2(torch.from_numpy(ours), theirs) < TOLERANCE
