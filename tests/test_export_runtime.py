"""Export -> engine directory -> ONNX Runtime engines -> Runtime.generate, on the tiny preset (issue 4).

Oracles: the PyTorch reference for per-engine parity, and diffusers' StableDiffusion pipelines (through diffusers'
own converters, tests/diffusers_oracle.py) for whole generations.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from rtsd.cli import main
from rtsd.errors import EngineDirError, NonFiniteOutputError, RtsdError
from rtsd.export.manifest import Manifest
from rtsd.export.pipeline import export
from rtsd.export.specs import COMPONENTS, ShapeRange
from rtsd.models import load_checkpoint
from rtsd.runtime import Runtime
from tests.conftest import EXPORT_RANGE
from tests.diffusers_oracle import diffusers_pipeline, diffusers_scheduler, give_pipeline_our_noise
from tests.metrics import FP32_END_TO_END_DB, FP32_MAX_REL_L2, image_psnr, rel_l2

RANGE = ShapeRange(**EXPORT_RANGE)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def engine_dir(tiny_engine_dir):
    return tiny_engine_dir


@pytest.fixture(scope="module")
def runtime(engine_dir):
    return Runtime(engine_dir, backend="onnxruntime")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_checkpoint(checkpoint, dtype=torch.float32, device="cpu")


def test_engine_dir_is_complete_and_self_describing(engine_dir, checkpoint):
    manifest = Manifest.read(engine_dir)
    manifest.check_files(engine_dir)
    assert manifest.source["sha256"] == __import__("hashlib").sha256(checkpoint.read_bytes()).hexdigest()
    assert manifest.model.family == "sd1" and manifest.shape_range == RANGE
    assert manifest.components["unet"]["profile"]["sample"]["max"] == [4, 4, 32, 32]
    for name in COMPONENTS:  # export checked what it wrote against the reference and recorded it
        parity = manifest.components[name]["parity"]
        assert parity["passed"] and parity["rel_l2"] < FP32_MAX_REL_L2 and parity["backend"] == "onnxruntime"
    assert (engine_dir / "tokenizer" / "tokenizer.json").is_file()
    assert not [p for p in engine_dir.parent.iterdir() if p.name.startswith(".")], "temporary export dirs left behind"
    import onnx

    for name in COMPONENTS:
        onnx.checker.check_model(str(engine_dir / f"{name}.onnx"))


@pytest.mark.parametrize("images,height,width", [(1, 128, 128), (2, 128, 192), (1, 256, 128), (1, 136, 200)])
def test_onnxruntime_engines_match_the_reference(runtime, reference, images, height, width):
    torch_runtime = Runtime.from_reference(reference)
    for name in COMPONENTS:
        spec = runtime.engines[name].spec
        feeds = spec.sample_inputs(images * spec.batch_factor, height, width, seed=height + width)
        ours = runtime.engines[name].infer(feeds)[spec.outputs[0].name]
        ref = torch_runtime.engines[name].to_host(torch_runtime.engines[name].infer(feeds)[spec.outputs[0].name])
        error = rel_l2(ours, ref)
        assert error < FP32_MAX_REL_L2, (name, error)
        assert float(np.std(ref)) > 1e-3, f"{name}: degenerate reference output"


@pytest.mark.parametrize("scheduler,options", [
    ("ddim", {"set_alpha_to_one": False, "clip_sample": False}),
    ("euler", {}),
    ("dpmpp_2m", {"use_karras_sigmas": True}),
])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_generate_matches_diffusers_pipeline(runtime, checkpoint, engine_dir, scheduler, options, guidance):
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 24), dtype=np.float32)
    prompt, negative = "a red fox in the snow, highly detailed", "blurry"
    ours = runtime.generate(prompt, negative, steps=8, guidance_scale=guidance, height=128, width=192,
                            scheduler=scheduler, scheduler_options=options, latents=latents).images[0]
    pipe = diffusers_pipeline(checkpoint, "sd15", engine_dir / "tokenizer", diffusers_scheduler(scheduler, "sd15", **options))
    with torch.inference_mode():
        theirs = pipe(prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=guidance, height=128,
                      width=192, latents=torch.from_numpy(latents), output_type="np").images[0]
    value = image_psnr(ours, theirs)
    assert value > FP32_END_TO_END_DB, f"{scheduler} cfg={guidance}: PSNR {value:.1f} dB"


def test_img2img_matches_diffusers_pipeline(runtime, checkpoint, engine_dir, monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img

    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    noise = np.random.default_rng(6).standard_normal((1, 4, 16, 16), dtype=np.float32)
    ours = runtime.generate("a castle", steps=10, guidance_scale=5.0, height=128, width=128, scheduler="euler",
                            latents=noise, image=init, strength=0.6).images[0]
    give_pipeline_our_noise(monkeypatch, img2img, noise)  # same noise, posterior mean
    pipe = diffusers_pipeline(checkpoint, "sd15", engine_dir / "tokenizer", diffusers_scheduler("euler", "sd15"),
                              img2img=True)
    with torch.inference_mode():
        theirs = pipe("a castle", image=init, strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                      output_type="np").images[0]
    value = image_psnr(ours, theirs)
    assert value > FP32_END_TO_END_DB, f"img2img PSNR {value:.1f} dB"


def test_same_seed_same_images_and_seed_is_reported(runtime):
    kwargs = dict(steps=3, height=128, width=128, scheduler="euler_a", seed=1234)
    first, second = runtime.generate("a boat", **kwargs), runtime.generate("a boat", **kwargs)
    assert first.seed == 1234 and np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    other = runtime.generate("a boat", **{**kwargs, "seed": 1235})
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(other.images[0]))
    assert {"text_encoder", "denoise", "vae_decode", "total"} <= set(first.timings)


def test_prompt_lists_and_num_images(runtime):
    result = runtime.generate(["a", "b"], ["x", "y"], steps=2, height=128, width=128, seed=0)
    assert len(result.images) == 2 and result.images[0].size == (128, 128)
    with pytest.raises(ValueError, match="outside the exported range 1..2"):
        runtime.generate(["a", "b"], steps=2, height=128, width=128, num_images=2)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(height=130), ValueError, "multiple of 8"),
    (dict(height=512), ValueError, r"outside the exported range 128\.\.256"),
    (dict(num_images=3), ValueError, "--max-batch 3"),
    (dict(scheduler="k_euler_fancy"), ValueError, "available schedulers are"),
    (dict(steps=0), ValueError, "steps"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), ValueError, r"latents must have shape \(1, 4, 16, 16\)"),
    (dict(image=Image.new("L", (128, 128))), ValueError, "must be RGB"),
    (dict(image=Image.new("RGB", (64, 128))), ValueError, "64x128 but the requested size is 128x128"),
    (dict(image=Image.new("RGB", (128, 128)), strength=1.5), ValueError, "strength"),
])
def test_bad_requests_fail_before_any_engine_runs(engine_dir, kwargs, error, match):
    runtime = Runtime(engine_dir, backend="onnxruntime")
    for engine in runtime.engines.values():
        engine.infer = lambda feeds: pytest.fail("an engine ran for a request that should have been refused")
    with pytest.raises(error, match=match):
        runtime.generate("a", **{"height": 128, "width": 128, "steps": 4, **kwargs})


def test_non_finite_decoder_output_is_reported_not_saved(engine_dir, tmp_path, monkeypatch, capsys):
    runtime = Runtime(engine_dir, backend="onnxruntime")
    decoder = runtime.engines["vae_decoder"]
    monkeypatch.setattr(decoder, "infer", lambda feeds: {"images": np.full((1, 3, 128, 128), np.nan, np.float32)})
    with pytest.raises(NonFiniteOutputError, match="non-finite.*--fp32-vae"):
        runtime.generate("a", steps=2, height=128, width=128)
    import rtsd.runtime as runtime_module

    monkeypatch.setattr(runtime_module.Runtime, "__init__", lambda self, *a, **k: self.__dict__.update(runtime.__dict__))
    out = tmp_path / "x.png"
    assert main(["generate", str(engine_dir), "a", "-o", str(out), "--steps", "2", "--size", "128x128"]) == 2
    assert "non-finite" in capsys.readouterr().err and not out.exists()


def test_broken_engine_dirs_are_refused(engine_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(engine_dir, broken)
    (broken / "unet.onnx").unlink()
    with pytest.raises(EngineDirError, match="missing unet.onnx"):
        Runtime(broken, backend="onnxruntime")
    data = json.loads((engine_dir / "manifest.json").read_text())
    data["format_version"] = 7
    (broken / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineDirError, match="format_version 7"):
        Runtime(broken)


def test_default_backend_falls_back_to_onnxruntime_when_tensorrt_cannot_run(engine_dir, tmp_path):
    """A directory with TensorRT plans recorded still runs here (no TensorRT/GPU) through its ONNX files."""
    import shutil

    copy = tmp_path / "with-plans"
    shutil.copytree(engine_dir, copy)
    manifest = Manifest.read(copy)
    for name in COMPONENTS:
        manifest.components[name]["engines"]["tensorrt"] = {"file": f"{name}.plan", "precision": "fp16"}
    manifest.write(copy)
    runtime = Runtime(copy)
    assert runtime.backend_name == "onnxruntime"
    assert runtime.generate("a", steps=2, height=128, width=128, seed=1).images[0].size == (128, 128)


def test_runtime_runs_with_torch_unimportable(engine_dir):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "diffusers", "onnx", "onnxscript"):
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        import rtsd
        result = rtsd.Runtime({str(engine_dir)!r}).generate("a lighthouse", steps=3, height=128, width=128, seed=7)
        assert result.images[0].size == (128, 128)
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "diffusers", "onnx")]
        print("ok", result.seed)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok 7" in done.stdout, done.stderr[-2000:]


def test_failed_export_leaves_nothing_behind(checkpoint, tmp_path, monkeypatch):
    import rtsd.export.onnx as onnx_export

    calls = []

    def fail_on_unet(models, name, *args, **kwargs):
        calls.append(name)
        if name == "unet":
            raise RuntimeError("simulated crash during the UNet export")
        return original(models, name, *args, **kwargs)

    original = onnx_export.export_component
    monkeypatch.setattr(onnx_export, "export_component", fail_on_unet)
    with pytest.raises(RuntimeError, match="simulated"):
        export(checkpoint, tmp_path / "engines", shape_range=RANGE, progress=None)
    assert calls == ["text_encoder", "unet"] and list(tmp_path.iterdir()) == []


def test_fp16_onnx_export_passes_fp16_parity(checkpoint, tmp_path):
    from rtsd.export.parity import check_engine_dir

    engines = export(checkpoint, tmp_path / "fp16", shape_range=RANGE, precision="fp16", progress=None)
    report = check_engine_dir(engines, checkpoint, backend="onnxruntime", shapes=((2, 128, 192),), steps=3)
    assert report.precision == "fp16" and report.passed, report.table()
    assert all(c.criterion.startswith(("cosine", "PSNR")) for c in report.checks)
    assert (engines.stat().st_mode & 0o777) == 0o755


def test_clip_skip_exports_the_penultimate_layer(checkpoint, tmp_path):
    """--clip-skip 2 on SD 1.x: the text encoder ONNX returns transformers' hidden_states[-2] after final_layer_norm."""
    import onnxruntime
    from transformers import CLIPTextModel

    from tests.diffusers_oracle import load_oracles

    engines = export(checkpoint, tmp_path / "skip2", shape_range=RANGE, components=("text_encoder",), clip_skip=2,
                     progress=None)
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["model"]["text_encoder"]["output_layer"] == -2
    ids = np.random.default_rng(0).integers(0, 49406, (2, 77)).astype(np.int64)
    session = onnxruntime.InferenceSession(str(engines / "text_encoder.onnx"))
    extra = np.zeros(session.get_inputs()[1].shape, np.float32)  # no textual-inversion rows used
    ours = session.run(None, {"input_ids": ids, "extra_embeddings": extra})[0]
    oracle: CLIPTextModel = load_oracles(checkpoint, "sd15").text_encoder
    with torch.inference_mode():
        hidden = oracle(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2]
        expected = oracle.final_layer_norm(hidden) if hasattr(oracle, "final_layer_norm") else \
            oracle.text_model.final_layer_norm(hidden)
    assert rel_l2(ours, expected.numpy()) < FP32_MAX_REL_L2
    with pytest.raises(ValueError, match="clip skip must be 1..12"):
        export(checkpoint, tmp_path / "bad", shape_range=RANGE, clip_skip=13, progress=None)


def test_export_refuses_engines_that_fail_parity(checkpoint, tmp_path, monkeypatch):
    """An engine that disagrees with the reference is never delivered: simulate a broken UNet graph."""
    import rtsd.engine.onnxruntime as ort_backend

    original = ort_backend.OnnxRuntimeEngine.infer

    def off_by_a_bit(self, feeds):
        out = original(self, feeds)
        return {k: v * 1.01 for k, v in out.items()} if self.name == "unet" else out

    monkeypatch.setattr(ort_backend.OnnxRuntimeEngine, "infer", off_by_a_bit)
    with pytest.raises(RtsdError, match=r"unet 2x4x16x16: rel_l2 < 1e-04 not met .*no engine directory was written"):
        export(checkpoint, tmp_path / "engines", shape_range=RANGE, progress=None)
    assert list(tmp_path.iterdir()) == []


def test_cli_generate_writes_png_with_parameters(engine_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(["generate", str(engine_dir), "a cat", "-o", str(out), "--steps", "3", "--size", "128x192",
                 "--seed", "9", "--scheduler", "ddim", "--backend", "onnxruntime"])
    assert code == 0
    image = Image.open(out)
    assert image.size == (128, 192)
    parameters = json.loads(image.text["parameters"])
    assert parameters["seed"] == 9 and parameters["prompt"] == "a cat" and parameters["scheduler"] == "ddim"


@pytest.mark.parametrize("argv,match", [
    (["generate", "{engines}", "x", "--size", "100x100"], "multiple of 8"),
    (["generate", "{engines}", "x", "--size", "big"], "--size must look like"),
    (["generate", "{engines}", "x", "--scheduler", "nope", "--size", "128x128"], "available schedulers are"),
    (["generate", "{missing}", "x"], "does not exist"),
    (["export", "--checkpoint", "{missing}", "--output", "{tmp}/e"], "missing"),
    (["export", "--checkpoint", "{ckpt}", "--output", "{engines}"], "not empty; pass --force"),
    (["export", "--checkpoint", "{ckpt}", "--output", "{tmp}/e", "--min-size", "100"], "multiple of 8"),
    (["info", "{missing}"], "missing"),
])
def test_cli_user_errors_exit_2_with_one_line(engine_dir, checkpoint, tmp_path, capsys, argv, match):
    subs = {"engines": str(engine_dir), "missing": str(tmp_path / "missing"), "tmp": str(tmp_path), "ckpt": str(checkpoint)}
    assert main([a.format(**subs) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(match, err, flags=re.I), err


def test_parity_command_passes_for_fp32_onnx(engine_dir, checkpoint, capsys):
    assert main(["parity", str(engine_dir), "--checkpoint", str(checkpoint), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "end-to-end" in out
