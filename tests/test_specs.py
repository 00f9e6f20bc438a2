"""The I/O contract: profiles, validation and shape-range checks derived from one declaration."""

import numpy as np
import pytest

from rtsd.config import ModelConfig, TextEncoderConfig, UNetConfig
from rtsd.export.specs import COMPONENTS, ShapeRange, specs_for

SD15 = ModelConfig("sd1")


def test_unet_profile_doubles_batch_for_cfg_and_scales_latents():
    profile = specs_for(SD15)["unet"].profile(ShapeRange(min_size=256, max_size=1024, opt_size=512, max_batch=4))
    assert profile["sample"] == {"min": (1, 4, 32, 32), "opt": (2, 4, 64, 64), "max": (8, 4, 128, 128)}
    assert profile["timestep"]["max"] == (8,)
    assert profile["encoder_hidden_states"]["opt"] == (2, 77, 768)


@pytest.mark.parametrize("size,batch", [(256, 1), (512, 2), (768, 3), (1024, 8)])
def test_profiles_cover_requests_inside_the_range(size, batch):
    r = ShapeRange(min_size=256, max_size=1024, opt_size=512, max_batch=8)
    for name, spec in specs_for(SD15).items():
        profile = spec.profile(r)
        shapes = spec.shapes(batch * spec.batch_factor, size, size)
        for tensor in spec.inputs:
            lo, hi = np.array(profile[tensor.name]["min"]), np.array(profile[tensor.name]["max"])
            assert (lo <= shapes[tensor.name]).all() and (shapes[tensor.name] <= hi).all(), (name, tensor.name)


def test_static_profile_is_one_shape():
    profile = specs_for(SD15)["vae_decoder"].profile(ShapeRange.fixed(batch=2, height=512, width=512))
    assert profile["latent"]["min"] == profile["latent"]["opt"] == profile["latent"]["max"] == (2, 4, 64, 64)


def test_sd2_like_config_changes_widths_not_layout():
    config = ModelConfig("sd2", unet=UNetConfig(context_dim=1024, num_heads=-1, num_head_channels=64),
                         text_encoder=TextEncoderConfig(kind="open_clip", hidden_size=1024))
    specs = specs_for(config)
    assert specs["text_encoder"].outputs[0].shape == ("batch", 77, 1024)
    assert specs["unet"].inputs[2].shape == ("batch", "context_length", 1024)


def test_dynamic_axes_name_every_symbolic_dimension():
    axes = specs_for(SD15)["vae_decoder"].dynamic_axes()
    assert axes == {"latent": {0: "batch", 2: "latent_height", 3: "latent_width"},
                    "images": {0: "batch", 2: "height", 3: "width"}}


def test_validate_accepts_sample_inputs_and_resolves_dims():
    spec = specs_for(SD15)["unet"]
    assert spec.validate(spec.sample_inputs(2, 256, 384)) == {"batch": 2, "latent_height": 32, "latent_width": 48,
                                                              "context_length": 77,  # + the ControlNet residuals':
                                                              "latent_height_div2": 16, "latent_width_div2": 24,
                                                              "latent_height_div4": 8, "latent_width_div4": 12,
                                                              "latent_height_div8": 4, "latent_width_div8": 6}


@pytest.mark.parametrize("mutate,error,match", [
    (lambda f: f.pop("timestep"), ValueError, "inputs must be named"),
    (lambda f: f.update(sample=f["sample"].astype(np.float64)), TypeError, "expected dtype float32"),
    (lambda f: f.update(sample=f["sample"][:, :3]), ValueError, "axis 1 must be 4"),
    (lambda f: f.update(timestep=np.zeros(3, np.float32)), ValueError, "'batch' is"),
    (lambda f: f.update(sample=f["sample"][0]), ValueError, "expected shape"),
])
def test_validate_names_the_problem(mutate, error, match):
    spec = specs_for(SD15)["unet"]
    feeds = spec.sample_inputs(2, 256, 256)
    mutate(feeds)
    with pytest.raises(error, match=match):
        spec.validate(feeds)


@pytest.mark.parametrize("batch,height,width,match", [
    (1, 250, 256, "not a multiple of 8"),
    (1, 260, 256, "not a multiple of 8"),
    (1, 1088, 512, r"outside the exported range 256\.\.1024.*--min-size/--max-size"),
    (5, 512, 512, r"outside the exported range 1\.\.4.*--max-batch 5"),
])
def test_shape_range_check_names_the_supported_range(batch, height, width, match):
    with pytest.raises(ValueError, match=match):
        ShapeRange().check(batch, height, width)


def test_coarser_size_multiples_are_enforced_and_named():
    with pytest.raises(ValueError, match="264 is not a multiple of 64, which these engines need"):
        ShapeRange(size_multiple=64).check(1, 264, 256)
    ShapeRange().check(1, 264, 520)  # multiples of 8 are fine by default


def test_shape_range_rejects_inconsistent_bounds():
    with pytest.raises(ValueError, match="multiple of 8"):
        ShapeRange(min_size=260)
    with pytest.raises(ValueError, match="min_size <= opt_size <= max_size"):
        ShapeRange(min_size=512, opt_size=256)


def test_spec_round_trips_through_json_dicts():
    for name, spec in specs_for(SD15).items():
        assert type(spec).from_dict(name, spec.to_dict()) == spec
    assert set(COMPONENTS) == set(specs_for(SD15))
