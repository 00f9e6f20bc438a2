"""User paths of the ``rtsd`` command, each run through the installed console script (a subprocess), as users run it.

export: --opt-size, --precision fp16, --prediction-type, --clip-skip, --no-check, --force, and --fp32-vae (a TensorRT
option: without TensorRT the export is refused with one line). parity: non-zero exit past its thresholds, --json.
generate: --negative, --cfg, --num-images (file naming), --image/--strength, --backend tensorrt without TensorRT
(exit 2), and the seed rule of the README (the initial noise is default_rng(seed).standard_normal(...), literally).
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import pytest
from PIL import Image

from rtsd.runtime import Runtime
from tests.optional import require_console_script

TIMEOUT = 900  # exports of the tiny model take tens of seconds on 2 shared cores


def rtsd(*args, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([require_console_script("rtsd"), *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
    assert done.returncode == expect, (args, done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    return done


def one_line_error(done: subprocess.CompletedProcess) -> str:
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _onnx_float_types(path) -> set[int]:
    model = onnx.load(str(path), load_external_data=False)
    return {init.data_type for init in model.graph.initializer
            if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(init.dims) > 1}


def test_export_options_reach_the_engine_dir_and_force_replaces_it(tiny_checkpoint, tmp_path):
    out = tmp_path / "engines"
    rtsd("export", "--checkpoint", tiny_checkpoint, "--output", out, "--min-size", "128", "--max-size", "192",
         "--opt-size", "160", "--max-batch", "1", "--precision", "fp16", "--prediction-type", "v_prediction",
         "--clip-skip", "2", "--no-check")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shape_range"]["opt_size"] == 160
    assert manifest["components"]["unet"]["profile"]["sample"]["opt"] == [2, 4, 20, 20]  # CFG batch of 1 image
    assert manifest["scheduler"]["prediction_type"] == "v_prediction"
    assert manifest["model"]["text_encoder"]["output_layer"] == -2
    assert {c["onnx"]["precision"] for c in manifest["components"].values()} == {"fp16"}
    assert _onnx_float_types(out / "unet.onnx") == {onnx.TensorProto.FLOAT16}  # the weights really are fp16
    assert not any("parity" in c for c in manifest["components"].values())  # --no-check: nothing was checked

    refused = rtsd("export", "--checkpoint", tiny_checkpoint, "--output", out, "--no-check", expect=2)
    assert "pass --force" in one_line_error(refused)
    assert json.loads((out / "manifest.json").read_text()) == manifest  # untouched

    rtsd("export", "--checkpoint", tiny_checkpoint, "--output", out, "--min-size", "128", "--max-size", "128",
         "--max-batch", "1", "--force")
    replaced = json.loads((out / "manifest.json").read_text())
    assert replaced["scheduler"]["prediction_type"] == "epsilon" and replaced["shape_range"]["max_size"] == 128
    assert replaced["model"]["text_encoder"]["output_layer"] == -1
    assert _onnx_float_types(out / "unet.onnx") == {onnx.TensorProto.FLOAT}
    assert all(c["parity"]["passed"] for c in replaced["components"].values())  # checked this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # no partial directories left


def test_fp32_vae_is_a_tensorrt_export_refused_in_one_line_without_tensorrt(tiny_checkpoint, tmp_path):
    from rtsd.errors import RtsdError
    from rtsd.export.tensorrt import require_tensorrt

    try:  # CI has no usable TensorRT (tensorrt-stubs alone is not TensorRT), so this runs there
        require_tensorrt()
    except RtsdError:
        pass
    else:
        pytest.skip("TensorRT and a GPU are here: the refusal without them cannot be exercised")
    done = rtsd("export", "--checkpoint", tiny_checkpoint, "--output", tmp_path / "trt", "--backend", "tensorrt",
                "--fp32-vae", "--min-size", "128", "--max-size", "128", expect=2)
    assert "tensorrt" in one_line_error(done).lower()
    assert list(tmp_path.iterdir()) == []


def test_parity_exits_non_zero_past_its_thresholds_and_writes_json(tiny_engine_dir, tmp_path):
    """The engines of the seed-0 checkpoint checked against another checkpoint (seed 1) fail every threshold."""
    from rtsd.models.synthetic import write_checkpoint

    other = write_checkpoint(tmp_path / "other.safetensors", "tiny", seed=1)
    report_file = tmp_path / "parity.json"
    done = rtsd("parity", tiny_engine_dir, "--checkpoint", other, "--steps", "2", "--json", report_file, expect=1)
    assert "FAIL" in done.stdout
    report = json.loads(report_file.read_text())
    assert report["passed"] is False and report["precision"] == "fp32"
    per_model = [c for c in report["checks"] if not c["name"].startswith("end-to-end")]
    assert {c["name"].split()[0] for c in per_model} == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert all(not c["passed"] and c["rel_l2"] > 1e-2 for c in per_model)


@pytest.fixture(scope="module")
def runtime(tiny_engine_dir):
    return Runtime(tiny_engine_dir, backend="onnxruntime")


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


GENERATE = ["--steps", "3", "--size", "128x128", "--scheduler", "euler", "--backend", "onnxruntime"]


def test_generate_negative_cfg_and_num_images(runtime, tiny_engine_dir, tmp_path):
    rtsd("generate", tiny_engine_dir, "a red fox", "-o", tmp_path / "fox.png", "--negative", "blurry", "--cfg", "3.0",
         "--num-images", "2", "--seed", "5", *GENERATE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-0.png", "fox-1.png"]
    parameters = json.loads(Image.open(tmp_path / "fox-0.png").text["parameters"])
    assert parameters["negative_prompt"] == ["blurry", "blurry"] and parameters["guidance_scale"] == 3.0  # per image
    assert parameters["seed"] == 5
    expected = runtime.generate("a red fox", "blurry", guidance_scale=3.0, num_images=2, seed=5, steps=3,
                                height=128, width=128, scheduler="euler").images
    for index in range(2):
        np.testing.assert_array_equal(_png(tmp_path / f"fox-{index}.png"), np.asarray(expected[index]))
    assert not np.array_equal(_png(tmp_path / "fox-0.png"), _png(tmp_path / "fox-1.png"))
    # the negative prompt and the guidance scale each move the image (measured: 3.7 and 18 levels of 255 on average)
    for other in (dict(negative_prompt=None, guidance_scale=3.0), dict(negative_prompt="blurry", guidance_scale=7.5)):
        moved = runtime.generate("a red fox", num_images=2, seed=5, steps=3, height=128, width=128,
                                 scheduler="euler", **other).images[0]
        assert np.abs(np.asarray(moved, np.int16) - _png(tmp_path / "fox-0.png")).mean() > 2, other


def test_generate_img2img_with_strength(runtime, tiny_engine_dir, tmp_path):
    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    rtsd("generate", tiny_engine_dir, "a castle", "-o", tmp_path / "castle.png", "--image", tmp_path / "init.png",
         "--strength", "0.5", "--seed", "2", *GENERATE)
    parameters = json.loads(Image.open(tmp_path / "castle.png").text["parameters"])
    assert parameters["strength"] == 0.5
    expected = runtime.generate("a castle", image=init, strength=0.5, seed=2, steps=3, height=128, width=128,
                                scheduler="euler").images[0]
    np.testing.assert_array_equal(_png(tmp_path / "castle.png"), np.asarray(expected))
    txt2img = runtime.generate("a castle", seed=2, steps=3, height=128, width=128, scheduler="euler").images[0]
    assert np.abs(np.asarray(txt2img, np.int16) - np.asarray(expected, np.int16)).mean() > 2  # the image steered it


def test_generate_backend_tensorrt_without_tensorrt_exits_2(tiny_engine_dir, tmp_path):
    done = rtsd("generate", tiny_engine_dir, "a cat", "-o", tmp_path / "cat.png", "--steps", "2", "--size", "128x128",
                "--backend", "tensorrt", expect=2)
    assert "tensorrt" in one_line_error(done).lower()
    assert list(tmp_path.iterdir()) == []


def test_seed_is_default_rng_standard_normal_literally(runtime, tiny_engine_dir, tmp_path):
    """README: the initial noise is numpy.random.default_rng(seed).standard_normal((N, 4, H/8, W/8), float32)."""
    rtsd("generate", tiny_engine_dir, "a boat", "-o", tmp_path / "boat.png", "--seed", "1234", "--size", "128x192",
         "--steps", "3", "--scheduler", "euler", "--backend", "onnxruntime")
    noise = np.random.default_rng(1234).standard_normal((1, 4, 192 // 8, 128 // 8), dtype=np.float32)
    expected = runtime.generate("a boat", latents=noise, steps=3, height=192, width=128, scheduler="euler").images[0]
    np.testing.assert_array_equal(_png(tmp_path / "boat.png"), np.asarray(expected))
