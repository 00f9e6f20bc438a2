"""rtsd's defaults against the published SD 1.5 / SD 2.1 configs, written out in tests/diffusers_oracle.py.

Weights cannot say which noise schedule, timestep spacing, steps offset, prediction type, text activation or
padding a model was trained with; rtsd fills them in from rtsd/config.py. Here what rtsd detects, what an export
records, and the timesteps a generation then runs are checked against the published values themselves, so a changed
default fails here (and in every end-to-end comparison with diffusers) instead of changing every user's images.
"""

from __future__ import annotations

import numpy as np
import pytest

from rtsd.checkpoint import detect_config, model_config, open_checkpoint
from rtsd.export.manifest import Manifest
from rtsd.models.synthetic import checkpoint_shapes
from rtsd.runtime import Runtime
from tests.diffusers_oracle import SCHEDULER_CONFIGS, SD15_LDM, SD15_TEXT, SD21_LDM, SD21_TEXT
from tests.optional import require

SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                 "timestep_spacing", "steps_offset")


def _schedule(config) -> dict:
    return {key: getattr(config.scheduler, key) for key in SCHEDULE_KEYS}


@pytest.mark.parametrize("fixture,release", [("tiny_checkpoint", "sd15"), ("tiny_inpaint_checkpoint", "sd15"),
                                             ("tiny_sd2_checkpoint", "sd21-base")])
def test_detected_training_schedule_is_the_published_one(request, fixture, release):
    """With nothing beside the weights, rtsd assumes what SD 1.5 and SD 2.1-base / 2-inpainting were trained with
    (epsilon prediction; 2.1's 768-v model needs --prediction-type or its YAML)."""
    config = model_config(open_checkpoint(request.getfixturevalue(fixture)))
    assert _schedule(config) == {key: SCHEDULER_CONFIGS[release][key] for key in SCHEDULE_KEYS}


@pytest.mark.parametrize("preset,ldm,text,output_layer", [("sd15", SD15_LDM, SD15_TEXT, -1),
                                                          ("sd21", SD21_LDM, SD21_TEXT, -2)])
def test_detected_full_size_architecture_is_the_published_one(preset, ldm, text, output_layer):
    config = detect_config(checkpoint_shapes(preset))
    unet, vae = ldm["unet_config"]["params"], ldm["first_stage_config"]["params"]
    assert config.vae.scaling_factor == ldm["scale_factor"] and config.vae.ch == vae["ddconfig"]["ch"]
    assert config.scheduler.beta_start == ldm["linear_start"] and config.scheduler.beta_end == ldm["linear_end"]
    assert config.scheduler.num_train_timesteps == ldm["timesteps"]
    assert (config.unet.model_channels, config.unet.context_dim) == (unet["model_channels"], unet["context_dim"])
    assert list(config.unet.channel_mult) == unet["channel_mult"]
    assert list(config.unet.attention_resolutions) == unet["attention_resolutions"]
    assert config.unet.num_heads == unet.get("num_heads", -1)
    assert config.unet.num_head_channels == unet.get("num_head_channels", -1)
    assert config.unet.use_linear_in_transformer == unet.get("use_linear_in_transformer", False)
    t = config.text_encoder
    assert (t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size) == (
        text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["intermediate_size"])
    assert (t.hidden_act, t.layer_norm_eps, t.max_position_embeddings) == (
        text["hidden_act"], text["layer_norm_eps"], text["max_position_embeddings"])
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (
        text["bos_token_id"], text["eos_token_id"], text["pad_token_id"])
    assert t.output_layer == output_layer


@pytest.mark.parametrize("engines,release", [("tiny_engine_dir", "sd15"), ("tiny_sd2_engine_dir", "sd21-v")])
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_generation_runs_the_published_timesteps(request, engines, release, scheduler):
    """The timesteps a default generation visits are those of diffusers' scheduler on the published config."""
    diffusers = require("diffusers")
    from tests.diffusers_oracle import DIFFUSERS_SCHEDULERS

    runtime = Runtime(request.getfixturevalue(engines), backend="onnxruntime")
    assert Manifest.read(runtime.engine_dir).to_dict()["scheduler"] == {
        key: SCHEDULER_CONFIGS[release][key] for key in SCHEDULE_KEYS}
    visited = []
    runtime.generate("a", steps=7, height=128, width=128, seed=0, scheduler=scheduler,
                     callback=lambda i, total, t, x: visited.append(float(t)))
    reference = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler])(**SCHEDULER_CONFIGS[release])
    reference.set_timesteps(7)
    np.testing.assert_array_equal(np.asarray(visited), reference.timesteps.numpy().astype(np.float64))
