"""Inpainting: a 9-channel UNet (tiny-inpaint) exported to ONNX and driven by Runtime.generate / `rtsd generate --mask`.

Oracle: diffusers' StableDiffusionInpaintPipeline on the same checkpoint (through diffusers' own converters,
tests/diffusers_oracle.py, imported where used so the GPU checks also run where diffusers is absent), fed the same
noise and encoding to the posterior mean, as rtsd does.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from rtsd.cli import main
from rtsd.export.manifest import Manifest
from rtsd.runtime import Runtime
from tests.metrics import FP32_END_TO_END_DB, image_psnr, psnr

HEIGHT, WIDTH = 128, 192  # non-square: 16x24 latents
DDIM = {"set_alpha_to_one": False, "clip_sample": False}


@pytest.fixture(scope="module")
def runtime(tiny_inpaint_engine_dir):
    return Runtime(tiny_inpaint_engine_dir, backend="onnxruntime")


def _init_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(5).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def _mask() -> np.ndarray:
    """uint8 mask: a rectangle whose values ramp 0..255 left to right, so binarising at 0.5 decides its left edge."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[30:100, :] = np.linspace(0, 255, WIDTH).round().astype(np.uint8)
    return mask


def test_engine_dir_records_an_inpainting_unet(tiny_inpaint_engine_dir):
    manifest = Manifest.read(tiny_inpaint_engine_dir)
    assert manifest.model.is_inpainting
    assert manifest.spec("unet").inputs[0].shape == ("batch", 9, "latent_height", "latent_width")
    assert manifest.components["unet"]["profile"]["sample"]["max"] == [4, 9, 32, 32]
    assert manifest.components["unet"]["parity"]["passed"]  # export checked the 9-channel UNet against the reference


@pytest.mark.parametrize("scheduler,options,strength,guidance,images,as_arrays", [
    ("ddim", DDIM, 1.0, 7.5, 1, False),
    ("ddim", DDIM, 0.6, 7.5, 1, False),
    ("euler", {}, 1.0, 7.5, 1, False),
    ("euler", {}, 0.6, 7.5, 1, False),
    # Two images without CFG, image and mask passed as arrays (diffusers gets the same pixels as PIL images).
    ("euler", {}, 0.75, 1.0, 2, True),
])
def test_inpainting_matches_diffusers_pipeline(runtime, tiny_inpaint_checkpoint, tiny_inpaint_engine_dir, monkeypatch,
                                               scheduler, options, strength, guidance, images, as_arrays):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint

    from tests.diffusers_oracle import diffusers_inpaint_pipeline, diffusers_scheduler, give_pipeline_our_noise

    init, mask = _init_image(), _mask()
    noise = np.random.default_rng(6).standard_normal((images, 4, HEIGHT // 8, WIDTH // 8), dtype=np.float32)
    prompt, negative = "a cat sleeping on a red sofa", "blurry"
    ours = runtime.generate(prompt, negative, steps=8, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
                            scheduler=scheduler, scheduler_options=options, latents=noise, num_images=images,
                            image=np.asarray(init) if as_arrays else init,
                            mask_image=mask / 255.0 if as_arrays else Image.fromarray(mask), strength=strength)
    assert ours.parameters["inpainting"] and ours.parameters["strength"] == strength

    give_pipeline_our_noise(monkeypatch, inpaint, noise)  # same noise, posterior mean
    pipe = diffusers_inpaint_pipeline(tiny_inpaint_checkpoint, "sd15", tiny_inpaint_engine_dir / "tokenizer",
                                      diffusers_scheduler(scheduler, "sd15", **options))
    with torch.inference_mode():
        theirs = pipe(prompt, negative_prompt=negative, image=init, mask_image=Image.fromarray(mask),
                      strength=strength, num_inference_steps=8, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
                      num_images_per_prompt=images, output_type="np").images
    for index in range(images):
        value = image_psnr(ours.images[index], theirs[index])
        assert value > FP32_END_TO_END_DB, f"{scheduler} strength={strength} cfg={guidance} image {index}: PSNR {value:.1f} dB"


def test_parity_checks_an_inpainting_engine_dir_end_to_end(tiny_inpaint_engine_dir, tiny_inpaint_checkpoint):
    """`rtsd parity` generates through both loops with a picture and a mask (the reference loop concatenates the
    extra UNet channels on torch tensors)."""
    from rtsd.export.parity import check_engine_dir

    report = check_engine_dir(tiny_inpaint_engine_dir, tiny_inpaint_checkpoint, backend="onnxruntime",
                              shapes=((1, 64, 64),), steps=3)
    end_to_end = [c for c in report.checks if c.name.startswith("end-to-end")]
    assert report.passed and len(end_to_end) == 1 and end_to_end[0].metrics.psnr > FP32_END_TO_END_DB, report.table()


def test_the_mask_and_the_image_steer_the_result(runtime):
    """The extra channels reach the UNet: another mask or another image gives a clearly different picture."""
    kwargs = dict(steps=4, height=HEIGHT, width=WIDTH, scheduler="euler", seed=3)
    init, mask = _init_image(), _mask()

    def pixels(image, mask_array):
        result = runtime.generate("a boat", image=image, mask_image=Image.fromarray(mask_array), **kwargs)
        return np.asarray(result.images[0], np.float64) / 255

    base = pixels(init, mask)
    assert psnr(pixels(init, 255 - mask), base) < 30
    assert psnr(pixels(Image.fromarray(255 - np.asarray(init)), mask), base) < 35


def _refuse_engine_calls(runtime: Runtime) -> None:
    for engine in runtime.engines.values():
        engine.infer = lambda feeds: pytest.fail("an engine ran for a request that should have been refused")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(), ValueError, r"inpainting UNet \(9 input channels\): pass both an image and a mask"),
    (dict(image="init"), ValueError, "pass both an image and a mask"),
    (dict(mask_image="mask"), ValueError, "pass both an image and a mask"),
    (dict(image="init", mask_image=Image.new("L", (64, 128))), ValueError,
     "mask image is 64x128 but the requested size is 192x128"),
    (dict(image="init", mask_image=Image.new("RGBA", (WIDTH, HEIGHT))), ValueError,
     r"mask image must be greyscale .* got mode 'RGBA'; convert it with mask.convert\('L'\)"),
    (dict(image="init", mask_image=Image.new("I;16", (WIDTH, HEIGHT))), ValueError, "got mode 'I;16'"),
    (dict(image="init", mask_image=np.zeros((HEIGHT, WIDTH, 3), np.uint8)), ValueError,
     r"mask array must be \(height, width\) greyscale"),
    (dict(image="init", mask_image=np.full((HEIGHT, WIDTH), 2.0)), ValueError, r"values in \[0, 1\]"),
    (dict(image="init", mask_image=np.zeros((HEIGHT, WIDTH), np.int32)), TypeError, "uint8"),
    (dict(image="init", mask_image="no/such/mask.png"), ValueError, "cannot read mask image"),
    (dict(image=Image.new("RGB", (WIDTH, 64)), mask_image="mask"), ValueError, "init image is 192x64"),
    (dict(image="init", mask_image="mask", strength=0.0), ValueError, "strength"),
])
def test_bad_inpainting_requests_fail_before_any_engine_runs(tiny_inpaint_engine_dir, kwargs, error, match):
    runtime = Runtime(tiny_inpaint_engine_dir, backend="onnxruntime")
    _refuse_engine_calls(runtime)
    named = {"init": _init_image(), "mask": Image.fromarray(_mask())}
    kwargs = {k: named.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        runtime.generate("a", height=HEIGHT, width=WIDTH, steps=4, **kwargs)


def test_a_mask_for_a_text_to_image_engine_dir_is_refused(tiny_engine_dir):
    runtime = Runtime(tiny_engine_dir, backend="onnxruntime")
    _refuse_engine_calls(runtime)
    with pytest.raises(ValueError, match="a mask needs an inpainting engine directory"):
        runtime.generate("a", height=HEIGHT, width=WIDTH, steps=4, image=_init_image(),
                         mask_image=Image.fromarray(_mask()))


@pytest.fixture()
def image_files(tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    _init_image().save(init)
    Image.fromarray(_mask()).save(mask)
    Image.new("L", (64, 64)).save(tmp_path / "small-mask.png")
    return {"init": str(init), "mask": str(mask), "small": str(tmp_path / "small-mask.png"),
            "missing": str(tmp_path / "missing.png")}


def test_cli_generate_with_mask_writes_an_inpainted_png(tiny_inpaint_engine_dir, image_files, tmp_path, capsys):
    out = tmp_path / "inpainted.png"
    code = main(["generate", str(tiny_inpaint_engine_dir), "a cat", "--image", image_files["init"], "--mask",
                 image_files["mask"], "-o", str(out), "--steps", "2", "--seed", "4", "--scheduler", "ddim",
                 "--backend", "onnxruntime"])
    assert code == 0, capsys.readouterr().err
    image = Image.open(out)
    assert image.size == (WIDTH, HEIGHT)  # the size comes from --image
    parameters = json.loads(image.text["parameters"])
    assert parameters["inpainting"] and parameters["strength"] == 1.0 and parameters["seed"] == 4


@pytest.mark.parametrize("engines,argv,match", [
    ("inpaint", ["--mask", "{mask}"], "--mask needs --image"),
    ("inpaint", ["--image", "{init}"], "pass both an image and a mask"),
    ("inpaint", ["--image", "{init}", "--mask", "{small}"], "mask image is 64x64 but the requested size is 192x128"),
    ("inpaint", ["--image", "{init}", "--mask", "{missing}"], "cannot read mask image"),
    ("tiny", ["--image", "{init}", "--mask", "{mask}"], "a mask needs an inpainting engine directory"),
])
def test_cli_mask_errors_exit_2_with_one_line(tiny_inpaint_engine_dir, tiny_engine_dir, image_files, tmp_path, capsys,
                                              engines, argv, match):
    engine_dir = {"inpaint": tiny_inpaint_engine_dir, "tiny": tiny_engine_dir}[engines]
    out = tmp_path / "x.png"
    code = main(["generate", str(engine_dir), "a", "-o", str(out), "--steps", "2", "--backend", "onnxruntime",
                 *[a.format(**image_files) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(match, err), err


def _inpaint_unet(xp, inputs, outputs, overflow=False):
    """Stand-in 9-channel UNet plan: every extra channel moves the output, so a dropped or misplaced one shows.
    In place, no temporaries: under CUDA-graph capture (tests/tensorrt_sim.py's cuda launcher) nothing may allocate."""
    sample, out = inputs["sample"], outputs["model_output"]
    xp.multiply(sample[:, 5:9], -0.25, out=out)
    out += sample[:, 4:5]
    out += sample[:, :4]
    out += inputs["encoder_hidden_states"][:, 1:5, 0][:, :, None, None]


def _sim_inpainting(monkeypatch, tmp_path, cupy, launch, gpu: str, capability: str):
    """(Runtime through TensorRTBackend on the simulated TensorRT, Runtime on the same stand-ins in NumPy, request)."""
    from rtsd.config import ModelConfig, UNetConfig
    from rtsd.engine import tensorrt as trt_backend
    from rtsd.export.specs import ShapeRange
    from tests.tensorrt_sim import MODEL_LIKE, HostStandIn, SimTensorRT, write_sim_engine_dir

    config, shape_range = ModelConfig("sd1", unet=UNetConfig(in_channels=9)), ShapeRange(64, 128, 64, max_batch=2)
    compute = {**MODEL_LIKE, "unet": _inpaint_unet}
    trt = SimTensorRT(config, shape_range, compute=compute, launch=launch)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda purpose: trt)
    monkeypatch.setattr(trt_backend, "cuda_device", lambda purpose, device=0: (cupy, gpu, capability))
    write_sim_engine_dir(tmp_path, config, shape_range, gpu, capability, overflow=())
    mask = np.zeros((64, 128), np.uint8)
    mask[16:48, 40:100] = 255
    image = Image.fromarray(np.linspace(0, 255, 64 * 128 * 3).reshape(64, 128, 3).astype(np.uint8))
    request = dict(prompt=["a red fox", "a lighthouse"], negative_prompt="blurry", steps=6, height=64, width=128,
                   seed=3, scheduler="euler", image=image, mask_image=Image.fromarray(mask))
    return (Runtime(tmp_path, backend=trt_backend.TensorRTBackend()),
            Runtime(tmp_path, backend=HostStandIn(config, compute=compute)), request)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_loop_stays_on_the_device_through_the_tensorrt_backend(monkeypatch, tmp_path, strength):
    """Through TensorRTBackend (simulated TensorRT + CuPy on host memory, tests/tensorrt_sim.py) the latents are
    device arrays every step and the result equals the same stand-in functions run in a plain NumPy loop."""
    from tests.tensorrt_sim import SimCupy, assert_device_equals_host, cpu_launcher, generate_with_latents

    device, host, request = _sim_inpainting(monkeypatch, tmp_path, SimCupy(), cpu_launcher(), "Sim GPU", "9.0")
    request["strength"] = strength
    expected = assert_device_equals_host(device, host, request)
    inverted = {**request, "mask_image": Image.fromarray(255 - np.asarray(request["mask_image"]))}
    assert np.abs(generate_with_latents(host, np.asarray, **inverted)[0] - expected).max() > 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_loop_on_the_gpu_equals_the_host_loop(monkeypatch, tmp_path, strength):
    """The same on real CuPy device memory, the stand-in plans launched as CuPy kernels on the backend's stream
    (captured into CUDA graphs): the extra channels are concatenated on the GPU."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'rtsd[tensorrt]')")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception as exc:  # no driver
        pytest.skip(f"no usable CUDA device: {type(exc).__name__}: {exc}")
    from rtsd.engine.cuda import cuda_device
    from tests.tensorrt_sim import cuda_launcher, generate_with_latents

    _, gpu, capability = cuda_device("test")
    device, host, request = _sim_inpainting(monkeypatch, tmp_path, cupy, cuda_launcher(cupy), gpu, capability)
    request["strength"] = strength
    latents, images, kind = generate_with_latents(device, cupy.asnumpy, **request)
    expected, expected_images, _ = generate_with_latents(host, np.asarray, **request)
    rel = np.linalg.norm(latents - expected) / np.linalg.norm(expected)
    worst = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(images, expected_images))
    unet = device.engines["unet"]
    print(f"\n[inpainting strength {strength}] final latents rel {rel:.2e}, image max diff {worst}/255, UNet "
          f"{unet.graphs.captures} capture(s) {unet.graphs.replays} replays")
    assert kind is cupy.ndarray and rel < 1e-5 and worst <= 1
    assert unet.graphs.captures == 1 and not unet.graphs.failures
