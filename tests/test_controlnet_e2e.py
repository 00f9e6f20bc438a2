"""ControlNet generations end to end (issue 13) against diffusers' StableDiffusionControlNetPipeline and
StableDiffusionControlNetImg2ImgPipeline (MultiControlNetModel for two), same latents, fp32 ONNX Runtime engines.

The diffusers side is built from literal published configs (tests/diffusers_oracle.py): the tiny SD 1.x model and
ControlNets loaded from the same files rtsd exported. PSNR is computed here (tests/metrics.py); the gate is the
fp32 figure of DESIGN.md's arithmetic (55 dB), and each test also checks that the ControlNet moves the image.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from rtsd.cli import main
from rtsd.models.synthetic import write_controlnet
from rtsd.runtime import Runtime
from tests.diffusers_oracle import (diffusers_controlnet, diffusers_controlnet_pipeline, diffusers_scheduler,
                                    give_pipeline_our_noise)
from tests.metrics import FP32_END_TO_END_DB, image_psnr, psnr

SIZE = 128
STEPS = 6


@pytest.fixture(scope="module")
def runtime(controlnet_engine_dir):
    return Runtime(controlnet_engine_dir, backend="onnxruntime")


@pytest.fixture(scope="module")
def theirs(controlnet_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("cn-configs")
    return {name: diffusers_controlnet(controlnet_files[name], "sd15", root / name) for name in ("canny", "depth")}


def _control(seed: int, size=(SIZE, SIZE)):
    """An edge-map-like control image: white strokes on black."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((*size[::-1], 3), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, size[1]), rng.integers(0, size[0])
        pixels[max(0, y - 2): y + 2, :] = 255 if rng.random() < 0.5 else pixels[max(0, y - 2): y + 2, :]
        pixels[:, max(0, x - 2): x + 2] = 255 if rng.random() < 0.5 else pixels[:, max(0, x - 2): x + 2]
    return Image.fromarray(pixels)


def _latents(seed=21):
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


PROMPT, NEGATIVE = "a house by a lake, detailed", "blurry"


def _pipe(checkpoint, controlnet_engine_dir, controlnet, img2img=False):
    return diffusers_controlnet_pipeline(checkpoint, "sd15", controlnet_engine_dir / "tokenizer",
                                         diffusers_scheduler("euler", "sd15"), controlnet, img2img=img2img)


def _plain(runtime, latents, **kwargs):
    return runtime.generate(PROMPT, NEGATIVE, steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                            scheduler="euler", latents=latents, **kwargs).images[0]


CASES = {
    "one": dict(ours=dict(controlnets=[("canny", "A", 1.0)]), theirs=dict(names=["canny"], scale=1.0)),
    "two-scales": dict(ours=dict(controlnets=[("canny", "A", 0.8), ("depth", "B", 0.4)]),
                       theirs=dict(names=["canny", "depth"], scale=[0.8, 0.4])),
    "guess-mode": dict(ours=dict(controlnets=[("canny", "A", 1.0)], guess_mode=True),
                       theirs=dict(names=["canny"], scale=1.0, guess_mode=True)),
    "end-0.5": dict(ours=dict(controlnets=[("canny", "A", 1.0)], control_guidance_end=0.5),
                    theirs=dict(names=["canny"], scale=1.0, control_guidance_end=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_generation_matches_diffusers(case, runtime, controlnet_engine_dir, tiny_checkpoint, theirs):
    images = {"A": _control(1), "B": _control(2)}
    spec = CASES[case]
    controlnets = [(name, images[key], scale) for name, key, scale in spec["ours"]["controlnets"]]
    latents = _latents()
    ours = _plain(runtime, latents, **{**spec["ours"], "controlnets": controlnets})
    names = spec["theirs"]["names"]
    models = [theirs[n] for n in names]
    pipe = _pipe(tiny_checkpoint, controlnet_engine_dir, models if len(models) > 1 else models[0])
    extra = {k: v for k, v in spec["theirs"].items() if k not in ("names", "scale")}
    control = [images[k] for _, k, _ in spec["ours"]["controlnets"]]
    with torch.inference_mode():
        reference = pipe(PROMPT, image=control if len(control) > 1 else control[0], negative_prompt=NEGATIVE,
                         num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                         latents=torch.from_numpy(latents), controlnet_conditioning_scale=spec["theirs"]["scale"],
                         output_type="np", **extra).images[0]
    value = image_psnr(ours, reference)
    without = _plain(runtime, latents)
    moved = psnr(np.asarray(ours, np.float64), np.asarray(without, np.float64), peak=255.0)
    print(f"{case}: {value:.1f} dB vs diffusers; {moved:.1f} dB vs no ControlNet")
    assert value > FP32_END_TO_END_DB, f"{case}: PSNR {value:.1f} dB"
    assert moved < FP32_END_TO_END_DB - 20, f"{case}: the ControlNet barely changes the image ({moved:.1f} dB)"
    if case in ("guess-mode", "end-0.5", "two-scales"):  # the option itself moves the image, not just the ControlNet
        one = _plain(runtime, latents, controlnets=[("canny", images["A"], 1.0)])
        assert psnr(np.asarray(ours, np.float64), np.asarray(one, np.float64), peak=255.0) < FP32_END_TO_END_DB - 20


def test_img2img_with_controlnet_matches_diffusers(runtime, controlnet_engine_dir, tiny_checkpoint, theirs, monkeypatch):
    import diffusers.pipelines.controlnet.pipeline_controlnet_img2img as module

    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    control = _control(3, size=(96, 80))  # another size: resized to the output size as diffusers does
    noise = _latents(22)
    ours = runtime.generate(PROMPT, NEGATIVE, steps=10, guidance_scale=5.0, height=SIZE, width=SIZE,
                            scheduler="euler", latents=noise, image=init, strength=0.6,
                            controlnets=[("depth", control, 0.9)]).images[0]
    give_pipeline_our_noise(monkeypatch, module, noise)
    pipe = _pipe(tiny_checkpoint, controlnet_engine_dir, theirs["depth"], img2img=True)
    with torch.inference_mode():
        reference = pipe(PROMPT, image=init, control_image=control, negative_prompt=NEGATIVE, strength=0.6,
                         num_inference_steps=10, guidance_scale=5.0, height=SIZE, width=SIZE,
                         controlnet_conditioning_scale=0.9, output_type="np").images[0]
    value = image_psnr(ours, reference)
    without = runtime.generate(PROMPT, NEGATIVE, steps=10, guidance_scale=5.0, height=SIZE, width=SIZE,
                               scheduler="euler", latents=noise, image=init, strength=0.6).images[0]
    moved = psnr(np.asarray(ours, np.float64), np.asarray(without, np.float64), peak=255.0)
    print(f"img2img: {value:.1f} dB vs diffusers; {moved:.1f} dB vs no ControlNet")
    assert value > FP32_END_TO_END_DB, f"img2img + ControlNet: PSNR {value:.1f} dB"
    assert moved < FP32_END_TO_END_DB - 20


@pytest.mark.parametrize("controlnets,kwargs,match", [
    ([("sketch", np.zeros((SIZE, SIZE, 3)), 1.0)], {}, "unknown ControlNet 'sketch'; this engine directory has canny, depth"),
    ([("canny", "no-such-file.png", 1.0)], {}, "cannot read control image"),
    ([("canny", 42, 1.0)], {}, "must be a PIL image, a path or a NumPy array"),
    ([("canny", np.zeros((SIZE, SIZE)), 1.0)], {}, r"must be \(height, width, 3\)"),
    ([("canny", np.zeros((SIZE, SIZE, 3)), "strong")], {}, "conditioning scale must be a finite number"),
    ([("canny", np.zeros((SIZE, SIZE, 3)), 1.0, 2.0)], {}, r"must be \(name, image\) or \(name, image, scale\)"),
    ([("canny", np.zeros((SIZE, SIZE, 3)))], {"control_guidance_end": [0.5, 1.0]}, "has 2 values for 1 ControlNet"),
    ([("canny", np.zeros((SIZE, SIZE, 3)))], {"control_guidance_start": 0.7, "control_guidance_end": 0.5},
     "0 <= start < end <= 1"),
])
def test_bad_control_requests_fail_before_any_engine_runs(runtime, monkeypatch, controlnets, kwargs, match):
    def refuse(*args, **kw):
        raise AssertionError("an engine ran")

    for engine in runtime.engines.values():
        monkeypatch.setattr(engine, "infer", refuse)
    with pytest.raises((ValueError, TypeError), match=match):
        runtime.generate("x", steps=2, height=SIZE, width=SIZE, controlnets=controlnets, **kwargs)


def test_cli_control_flag(controlnet_engine_dir, tmp_path, capsys):
    control = tmp_path / "edges.png"
    _control(4).save(control)
    out = tmp_path / "out.png"
    argv = ["generate", str(controlnet_engine_dir), "a house", "-o", str(out), "--steps", "2", "--size", "128x128",
            "--seed", "1", "--control", f"canny={control}:0.7", "--control", f"depth={control}"]
    assert main(argv) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(argv[:-4] + ["--control", f"nope={control}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown ControlNet 'nope'" in err[0]
