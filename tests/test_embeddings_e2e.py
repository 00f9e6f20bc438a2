"""Textual inversion end to end, SD 1.x and SD 2.x (tiny presets): rtsd's engines, given an A1111 .pt, a multi-vector
emb_params .safetensors and a diffusers learned_embeds .bin, against diffusers' load_textual_inversion + pipeline;
a negative embedding in the negative prompt; a weighted embedding against A1111's emphasis computed in the test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rtsd.cli import main
from rtsd.runtime import Runtime
from tests.test_embeddings import a1111_pt, diffusers_bin, emb_params
from tests.test_prompt_e2e import SIZE, STEPS, oracle_context, psnr, runtime_and_pipeline

PROMPT, NEGATIVE = "a photo of mystyle riding a horse, multivec, detailed", "easyneg, blurry"


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def loaded_all(request, tmp_path_factory):
    return _load(request, tmp_path_factory)


# The weighted and CLI checks on SD 2.x repeat SD 1.x's on a 24-layer text tower: `-m slow` runs them.
@pytest.fixture(scope="module", params=["sd1", pytest.param("sd2", marks=pytest.mark.slow)])
def loaded(request, tmp_path_factory):
    return _load(request, tmp_path_factory)


def _load(request, tmp_path_factory):
    """A fresh runtime and diffusers pipeline of one family, both given the same three embedding files."""
    runtime, pipe, pad = runtime_and_pipeline(request, request.param)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    scale = 4 * float(table.std())  # well away from any vocabulary token, so the embeddings visibly matter
    rng, width, folder = np.random.default_rng(7), table.shape[1], tmp_path_factory.mktemp("embeddings")
    vectors = {name: (rng.standard_normal((n, width)) * scale).astype(np.float32)
               for name, n in (("mystyle", 2), ("multivec", 3), ("easyneg", 1))}
    files = {"mystyle": a1111_pt(folder / "mystyle.pt", vectors["mystyle"]),
             "multivec": emb_params(folder / "multivec.safetensors", vectors["multivec"]),
             "easyneg": diffusers_bin(folder / "easyneg.bin", vectors["easyneg"], key="<easy-neg>")}
    for path in files.values():
        assert runtime.load_textual_inversion(path) == path.stem  # the file's stem, as A1111 names them
    pipe.load_textual_inversion(str(files["mystyle"]), token="mystyle")
    pipe.load_textual_inversion(torch.from_numpy(vectors["multivec"]), token="multivec")  # diffusers has no emb_params
    pipe.load_textual_inversion(str(files["easyneg"]), token="easyneg")
    return runtime, pipe, pad, files


def _latents(seed=4):
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def _ours(runtime, prompt, negative, **kw):
    return runtime.generate(prompt, negative, steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                            latents=_latents(), scheduler="euler", **kw)


def test_three_formats_equal_diffusers_load_textual_inversion(loaded_all):
    runtime, pipe, _, files = loaded_all
    result = _ours(runtime, PROMPT, NEGATIVE)
    with torch.inference_mode():
        theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                      width=SIZE, latents=torch.from_numpy(_latents()), output_type="np").images[0]
    image = np.asarray(result.images[0], np.float64) / 255
    value = psnr(image, theirs)
    print(f"PSNR {value:.1f} dB")  # shown by pytest -rP
    assert value > 55, f"textual inversion: PSNR {value:.1f} dB"
    used = result.parameters["embeddings"]
    assert [(e["token"], e["vectors"], e["file"]) for e in used] == [
        ("easyneg", 1, "easyneg.bin"), ("mystyle", 2, "mystyle.pt"), ("multivec", 3, "multivec.safetensors")]
    assert result.parameters["prompt"] == PROMPT and result.parameters["negative_prompt"] == NEGATIVE
    # The embeddings move the image: without them the names are ordinary words.
    plain = Runtime(runtime.engine_dir, backend="onnxruntime")
    without = np.asarray(_ours(plain, PROMPT, NEGATIVE).images[0], np.float64) / 255
    assert psnr(image, without) < value - 15
    # The negative embedding alone moves it too.
    no_negative = np.asarray(_ours(runtime, PROMPT, "blurry").images[0], np.float64) / 255
    assert psnr(image, no_negative) < value - 15


def test_weighted_embedding_equals_a1111_emphasis(loaded):
    runtime, pipe, pad, _ = loaded
    prompt, negative = "a photo of (mystyle:1.3) riding [easyneg]", "easyneg"
    # diffusers' tokenizer knows the embeddings as added tokens: mystyle's two vectors are "mystyle mystyle_1".
    pieces = [("a photo of ", 1.0), ("mystyle mystyle_1", 1.3), (" riding ", 1.0), ("easyneg", 1 / 1.1)]
    positive, negative_ctx = oracle_context(pipe, pieces, pad), oracle_context(pipe, [("easyneg", 1.0)], pad)
    result = _ours(runtime, prompt, negative)
    with torch.inference_mode():
        theirs = pipe(prompt_embeds=positive, negative_prompt_embeds=negative_ctx, num_inference_steps=STEPS,
                      guidance_scale=7.5, height=SIZE, width=SIZE, latents=torch.from_numpy(_latents()),
                      output_type="np").images[0]
    value = psnr(np.asarray(result.images[0], np.float64) / 255, theirs)
    print(f"PSNR {value:.1f} dB")  # shown by pytest -rP
    assert value > 55, f"weighted embedding: PSNR {value:.1f} dB"


def test_cli_embedding_flags_and_png_metadata(loaded, tmp_path):
    runtime, _, _, files = loaded
    out = tmp_path / "ti.png"
    folder = files["mystyle"].parent
    code = main(["generate", str(runtime.engine_dir), PROMPT, "--negative", NEGATIVE, "-o", str(out), "--steps", "2",
                 "--size", "128x128", "--seed", "1", "--embeddings-dir", str(folder), "--embedding",
                 str(files["mystyle"]), "--backend", "onnxruntime"])
    assert code == 0
    parameters = json.loads(Image.open(out).text["parameters"])
    assert parameters["prompt"] == PROMPT and parameters["prompt_syntax"] == "a1111"
    assert {e["token"] for e in parameters["embeddings"]} == {"easyneg", "mystyle", "multivec"}
    assert main(["generate", str(runtime.engine_dir), "(a:1.2) cat", "-o", str(out), "--steps", "2", "--size",
                 "128x128", "--plain-prompt", "--backend", "onnxruntime"]) == 0
    assert json.loads(Image.open(out).text["parameters"])["prompt_syntax"] == "plain"
