"""SD 2.x inpainting end to end: tiny-sd2-inpaint (stable-diffusion-2-inpainting's layout: OpenCLIP text tower,
Linear proj, 64-wide heads, 9-channel UNet, epsilon prediction) exported to ONNX and driven by Runtime.generate.

Oracle: diffusers' StableDiffusionInpaintPipeline on the same checkpoint through diffusers' own converters, set up as
SD 2.x ships in diffusers (OpenCLIP without its last resblock, "!" padding; tests/diffusers_oracle.py), fed rtsd's
noise and encoding to the posterior mean, as rtsd does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rtsd.export.manifest import Manifest
from rtsd.runtime import Runtime
from tests.metrics import FP32_END_TO_END_DB, image_psnr

HEIGHT, WIDTH = 128, 192  # non-square: 16x24 latents
PRESET = "tiny-sd2-inpaint"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from rtsd.models.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("checkpoints") / f"{PRESET}.safetensors", PRESET, seed=0)


@pytest.fixture(scope="module")
def engine_dir(checkpoint, tmp_path_factory):
    """fp32 ONNX engines at tiny sizes; the prediction type is left to the checkpoint (no YAML: epsilon)."""
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange

    return export(checkpoint, tmp_path_factory.mktemp("engines") / PRESET,
                  shape_range=ShapeRange(min_size=128, max_size=192, opt_size=128, max_batch=2), progress=None)


@pytest.fixture(scope="module")
def runtime(engine_dir):
    return Runtime(engine_dir, backend="onnxruntime")


def test_checkpoint_detects_as_sd2_inpainting(checkpoint):
    """What rtsd's detection reads from the written file is the preset: SD 2.x, inpainting, epsilon."""
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    from rtsd.checkpoint import model_config, open_checkpoint
    from rtsd.models.synthetic import PRESETS

    config = model_config(open_checkpoint(checkpoint))
    assert config == PRESETS[PRESET]
    assert config.family == "sd2" and config.is_inpainting and config.text_encoder.kind == "open_clip"
    assert config.prediction_type == "epsilon" and config.unet.num_head_channels == 64
    # diffusers sees the 9-channel UNet; it tells v2 from v1 by a 1024-wide context only (full-size SD 2.x inpainting,
    # "inpainting_v2", is tests/test_detection.py's), which a tiny preset does not have.
    assert sfu.infer_diffusers_model_type(load_file(str(checkpoint))) in ("inpainting", "inpainting_v2")


def test_engine_dir_records_sd2_inpainting(engine_dir):
    manifest = Manifest.read(engine_dir)
    assert manifest.model.family == "sd2" and manifest.model.is_inpainting
    assert manifest.model.prediction_type == "epsilon"
    assert manifest.tokenizer["pad_token_id"] == 0
    assert manifest.spec("unet").inputs[0].shape == ("batch", 9, "latent_height", "latent_width")
    assert all(manifest.components[name]["parity"]["passed"] for name in manifest.components)


def _init_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(21).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    """A rectangle off-centre plus a ramp column band, so binarising at 0.5 decides some of its edge pixels."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[20:90, 40:150] = 255
    mask[90:120, :] = np.linspace(0, 255, WIDTH).round().astype(np.uint8)
    return Image.fromarray(mask)


DDIM = {"set_alpha_to_one": False, "clip_sample": False}


@pytest.mark.parametrize("scheduler,options,strength", [("euler", {}, 1.0), ("euler", {}, 0.6), ("ddim", DDIM, 0.75)])
def test_sd2_inpainting_matches_diffusers_pipeline(runtime, checkpoint, engine_dir, monkeypatch, scheduler, options,
                                                   strength):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint

    from tests.diffusers_oracle import diffusers_inpaint_pipeline, diffusers_scheduler, give_pipeline_our_noise

    steps, guidance = 8, 7.5
    init, mask = _init_image(), _mask()
    noise = np.random.default_rng(22).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8), dtype=np.float32)
    prompt, negative = "a wooden cabin by a frozen lake, evening light", "blurry, low quality"
    ours = runtime.generate(prompt, negative, steps=steps, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
                            scheduler=scheduler, scheduler_options=options, latents=noise, image=init, mask_image=mask,
                            strength=strength)
    assert ours.parameters["inpainting"] and ours.parameters["model"] == "sd2"

    give_pipeline_our_noise(monkeypatch, inpaint, noise)  # same noise, posterior mean
    pipe = diffusers_inpaint_pipeline(checkpoint, "sd21", engine_dir / "tokenizer",
                                      diffusers_scheduler(scheduler, "sd2-inpainting", **options))
    assert pipe.unet.config.in_channels == 9 and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.text_encoder.config.num_hidden_layers == 23  # OpenCLIP ViT-H's 24 minus the last: penultimate layer
    with torch.inference_mode():
        theirs = pipe(prompt, negative_prompt=negative, image=init, mask_image=mask, strength=strength,
                      num_inference_steps=steps, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
                      output_type="np").images[0]
    value = image_psnr(ours.images[0], theirs)
    print(f"\n[{PRESET} {scheduler} strength={strength} cfg={guidance}] PSNR {value:.1f} dB")
    assert value > FP32_END_TO_END_DB, f"{scheduler} strength={strength}: PSNR {value:.1f} dB"
