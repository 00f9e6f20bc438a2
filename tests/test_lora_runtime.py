"""LoRAs at run time on ONNX Runtime: the same images as diffusers' StableDiffusionPipeline with the same LoRAs fused,
``set_loras({})`` back to the base images bit for bit, a baked-in export equal to the run-time switch, older engine
directories refused with one line, and the CLI / PNG metadata carrying the LoRAs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_files import kohya_state, lora_modules, peft_state, save_peft
from rtsd.cli import main
from rtsd.errors import EngineDirError
from rtsd.export.manifest import Manifest
from rtsd.runtime import Runtime
from tests.conftest import EXPORT_RANGE

pytest.importorskip("peft")  # diffusers' LoRA loading goes through PEFT
SCALES = (0.7, -0.4)
REQUEST = dict(prompt="a red fox in the snow, highly detailed", negative_prompt="blurry", steps=6,
               guidance_scale=7.5, height=128, width=128, scheduler="euler")


def _psnr(a, b) -> float:
    """Images in [0, 255]: 10 log10(255^2 / MSE)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _sd15_euler():
    """diffusers' Euler with SD 1.5's published scheduler_config.json values, written out."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                  prediction_type="epsilon", interpolation_type="linear")


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(5).standard_normal((1, 4, 16, 16), dtype=np.float32)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint, tiny_engine_dir):
    from diffusers_oracle import diffusers_pipeline

    return diffusers_pipeline(tiny_checkpoint, "sd15", tiny_engine_dir / "tokenizer", _sd15_euler())


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory):
    """Two LoRA files in two formats, named after diffusers'/transformers' modules: kohya (LoCon) and PEFT."""
    folder = tmp_path_factory.mktemp("loras")
    modules = lora_modules(pipe.unet, pipe.text_encoder)
    picked = {k: m for k, m in modules.items()
              if any(p in k for p in ("down_blocks.1.", "mid_block.", "up_blocks.2.", "conv_in", "layers.5."))}
    style, detail = folder / "style.safetensors", folder / "detail.safetensors"
    save_file(kohya_state(picked, rank=4, alpha=2.0, seed=11), str(style))
    linear = {k: m for k, m in modules.items() if isinstance(m, torch.nn.Linear) and "up_blocks.1." in k or
              "layers.9." in k}
    save_peft(detail, peft_state(linear, rank=8, seed=12), rank=8, alpha=8.0)
    return {str(style): SCALES[0], str(detail): SCALES[1]}


@pytest.fixture(scope="module")
def runtime(tiny_engine_dir):
    return Runtime(tiny_engine_dir, backend="onnxruntime")


@pytest.fixture(scope="module")
def images(runtime, loras, latents):
    base = np.asarray(runtime.generate(**REQUEST, latents=latents).images[0])
    switched = runtime.generate(**REQUEST, latents=latents, loras=loras)
    back = np.asarray(runtime.generate(**REQUEST, latents=latents, loras={}).images[0])
    return base, switched, back


@pytest.mark.slow  # ~40 s: the diffusers pipeline run; pytest -m slow tests/test_lora_runtime.py
def test_switched_loras_match_diffusers_with_the_same_loras_fused(images, pipe, loras, latents):
    pipe.load_lora_weights(list(loras)[0], adapter_name="style")
    pipe.load_lora_weights(list(loras)[1], adapter_name="detail")
    pipe.set_adapters(["style", "detail"], adapter_weights=list(SCALES))
    pipe.fuse_lora(adapter_names=["style", "detail"], lora_scale=1.0)
    pipe.unload_lora_weights()
    with torch.inference_mode():
        theirs = pipe(REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"], num_inference_steps=6,
                      guidance_scale=7.5, height=128, width=128, latents=torch.from_numpy(latents),
                      output_type="np").images[0]
    base, switched, _ = images
    ours = np.asarray(switched.images[0])
    agreement, moved = _psnr(ours, theirs * 255), _psnr(ours, base)
    print(f"LoRA image vs diffusers fused: {agreement:.1f} dB; LoRA vs base image: {moved:.1f} dB")
    assert agreement > 55, f"PSNR {agreement:.1f} dB vs diffusers with the LoRAs fused"
    assert moved < 30, f"the LoRAs barely changed the image ({moved:.1f} dB from the base image)"


def test_empty_set_returns_to_the_base_images_bit_for_bit(images):
    base, switched, back = images
    assert np.array_equal(base, back)
    assert not np.array_equal(base, np.asarray(switched.images[0]))


def test_parameters_carry_the_loras(images, loras):
    _, switched, _ = images
    records = switched.parameters["loras"]
    assert [(r["name"], r["scale"]) for r in records] == [("style.safetensors", 0.7), ("detail.safetensors", -0.4)]
    assert all(len(r["sha256"]) == 12 for r in records)


def test_the_same_set_is_not_applied_twice(runtime, loras):
    runtime.set_loras(loras)
    session = runtime.engines["unet"].session
    runtime.set_loras(dict(loras))
    assert runtime.engines["unet"].session is session
    runtime.set_loras({})


def test_a_bad_lora_changes_nothing(runtime, loras, tmp_path, latents):
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(1, 4),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(4, 1)}, str(tmp_path / "bad.safetensors"))
    runtime.set_loras(loras)
    with pytest.raises(ValueError, match="nothing was applied"):
        runtime.set_loras({**loras, str(tmp_path / "bad.safetensors"): 1.0})
    assert runtime._loras.current == {k: v for k, v in loras.items()}
    runtime.set_loras({})


@pytest.mark.slow  # a second export (~1.5 min on 2 cores); run with: pytest -m slow tests/test_lora_runtime.py
def test_baked_in_export_gives_the_switched_images(tiny_checkpoint, loras, images, latents, tmp_path):
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange

    baked = export(tiny_checkpoint, tmp_path / "baked", shape_range=ShapeRange(**EXPORT_RANGE), progress=None,
                   loras=list(loras.items()))
    manifest = Manifest.read(baked)
    assert [(r["name"], r["scale"]) for r in manifest.loras] == [("style.safetensors", 0.7),
                                                                  ("detail.safetensors", -0.4)]
    ours = np.asarray(Runtime(baked, backend="onnxruntime").generate(**REQUEST, latents=latents).images[0])
    switched = np.asarray(images[1].images[0])
    print(f"baked vs switched: max |diff| {np.abs(ours.astype(int) - switched).max()}, {_psnr(ours, switched)} dB")
    assert np.array_equal(ours, switched)


def test_format_2_engine_dirs_generate_but_ask_to_reexport_for_loras(tiny_engine_dir, tiny_checkpoint, tmp_path, loras,
                                                                      latents):
    """Format 2 (long prompts, before the weights map) is the newest layout without a weights map; format 1 lacks
    it too (its loading is tested in test_prompt_e2e)."""
    from tests.legacy_unet import replace_with_plain_unet

    old = tmp_path / "old"
    shutil.copytree(tiny_engine_dir, old)
    replace_with_plain_unet(old, tiny_checkpoint)  # formats before 4: no ControlNet residual inputs
    data = json.loads((old / "manifest.json").read_text())
    data["format_version"] = 2
    data.pop("loras")
    for record in data["components"].values():
        record.pop("weights_map", None)
    (old / "manifest.json").write_text(json.dumps(data))
    runtime = Runtime(old, backend="onnxruntime")
    assert runtime.generate(**REQUEST, latents=latents).images
    with pytest.raises(EngineDirError, match="re-export it with this rtsd") as info:
        runtime.set_loras(loras)
    assert "\n" not in str(info.value)


def test_cli_generate_with_loras_writes_them_into_the_png(tiny_engine_dir, loras, tmp_path, capsys):
    (style, detail) = loras
    out = tmp_path / "fox.png"
    assert main(["generate", str(tiny_engine_dir), "a fox", "--steps", "2", "--size", "128x128", "--seed", "1",
                 "--lora", f"{style}:0.7", "--lora", f"{detail}:-0.4", "-o", str(out)]) == 0
    parameters = json.loads(Image.open(out).text["parameters"])
    assert [(r["name"], r["scale"]) for r in parameters["loras"]] == [("style.safetensors", 0.7),
                                                                      ("detail.safetensors", -0.4)]
    capsys.readouterr()
    assert main(["generate", str(tiny_engine_dir), "a fox", "--steps", "2", "--size", "128x128",
                 "--lora", str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
