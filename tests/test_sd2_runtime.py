"""SD 2.x end to end (issue 7): tiny-sd2 exported as a v-prediction model, run by ONNX Runtime, against diffusers.

diffusers runs SD 2.x as its converted checkpoints are shipped: OpenCLIP without the last resblock (so its last
hidden state is the penultimate layer), prompts padded with "!" (id 0), schedulers with prediction_type
"v_prediction" — all configured independently of rtsd's code (tests/diffusers_oracle.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtsd.cli import main
from rtsd.export.manifest import Manifest
from rtsd.export.specs import COMPONENTS
from rtsd.models import load_checkpoint
from rtsd.runtime import Runtime
from tests.diffusers_oracle import diffusers_pipeline, diffusers_scheduler
from tests.metrics import FP32_END_TO_END_DB, FP32_MAX_REL_L2, image_psnr, rel_l2


@pytest.fixture(scope="module")
def runtime(tiny_sd2_engine_dir):
    return Runtime(tiny_sd2_engine_dir, backend="onnxruntime")


def test_manifest_records_sd2_and_v_prediction(tiny_sd2_engine_dir):
    manifest = Manifest.read(tiny_sd2_engine_dir)
    assert manifest.model.family == "sd2" and manifest.model.text_encoder.kind == "open_clip"
    assert manifest.model.prediction_type == "v_prediction"
    assert manifest.to_dict()["scheduler"]["prediction_type"] == "v_prediction"
    assert manifest.tokenizer["pad_token_id"] == 0
    ids = Runtime(tiny_sd2_engine_dir, backend="onnxruntime").tokenizer(["a cat"])
    assert ids[0, 3] == 49407 and (ids[0, 4:] == 0).all()  # bos a cat eos, then OpenCLIP's zero padding


def test_onnxruntime_engines_match_the_reference(runtime, tiny_sd2_checkpoint):
    reference = Runtime.from_reference(load_checkpoint(tiny_sd2_checkpoint, dtype=torch.float32, device="cpu"))
    for name in COMPONENTS:
        spec = runtime.engines[name].spec
        feeds = spec.sample_inputs(2 * spec.batch_factor, 128, 192, seed=1)
        ours = runtime.engines[name].infer(feeds)[spec.outputs[0].name]
        ref = reference.engines[name].to_host(reference.engines[name].infer(feeds)[spec.outputs[0].name])
        assert rel_l2(ours, ref) < FP32_MAX_REL_L2, name


@pytest.mark.parametrize("scheduler,options", [("euler", {}), ("dpmpp_2m", {"use_karras_sigmas": True}),
                                               ("ddim", {"set_alpha_to_one": False, "clip_sample": False})])
def test_v_prediction_generate_matches_diffusers(runtime, tiny_sd2_checkpoint, tiny_sd2_engine_dir, scheduler,
                                                 options):
    latents = np.random.default_rng(11).standard_normal((1, 4, 16, 24), dtype=np.float32)
    prompt, negative = "a snowy mountain village at night, detailed", "low quality"
    ours = runtime.generate(prompt, negative, steps=8, guidance_scale=7.0, height=128, width=192, latents=latents,
                            scheduler=scheduler, scheduler_options=options).images[0]
    pipe = diffusers_pipeline(tiny_sd2_checkpoint, "sd21", tiny_sd2_engine_dir / "tokenizer",
                              diffusers_scheduler(scheduler, "sd21-v", **options))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    with torch.inference_mode():
        theirs = pipe(prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=7.0, height=128,
                      width=192, latents=torch.from_numpy(latents), output_type="np").images[0]
    value = image_psnr(ours, theirs)
    assert value > FP32_END_TO_END_DB, f"{scheduler}: PSNR {value:.1f} dB"


def test_parity_command_passes(tiny_sd2_engine_dir, tiny_sd2_checkpoint, capsys):
    assert main(["parity", str(tiny_sd2_engine_dir), "--checkpoint", str(tiny_sd2_checkpoint), "--steps", "2"]) == 0
    assert "PASS" in capsys.readouterr().out
