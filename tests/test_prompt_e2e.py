"""Long, BREAK and weighted prompts end to end: rtsd (ONNX Runtime engines) against transformers' CLIP text model
and diffusers' StableDiffusionPipeline fed the per-chunk encodings of A1111's chunking (restated in
tests/test_prompt.py) with A1111's "Original" emphasis computed here; format-1 engine directories.

The oracle's pieces are written out literally (not parsed by rtsd), its tokenizer is transformers' CLIPTokenizer and
its scheduler is configured from SD 1.5's / SD 2.1's published scheduler_config.json values. Gates: 55 dB on the
uint8 images (their rounding alone limits the PSNR to about 59 dB; measured 59.5-59.6 dB).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rtsd.cli import main
from rtsd.errors import EngineDirError
from rtsd.export.manifest import sha256_file
from rtsd.runtime import Runtime
from tests.diffusers_oracle import diffusers_pipeline
from tests.test_prompt import LONG, a1111_chunks

STEPS, SIZE = 6, 128


def euler(prediction_type: str):
    """diffusers' EulerDiscreteScheduler with the published SD 1.5 / SD 2.1 scheduler_config.json values."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                  prediction_type=prediction_type)


PUBLISHED_FAMILY = {"sd1": "sd15", "sd2": "sd21"}  # the oracle's literal published configs (tests/diffusers_oracle)
FAMILIES = {"sd1": ("tiny_checkpoint", "tiny_engine_dir", "epsilon", 49407),
            "sd2": ("tiny_sd2_checkpoint", "tiny_sd2_engine_dir", "v_prediction", 0)}


def runtime_and_pipeline(request, name):
    """(rtsd Runtime on the family's ONNX engine dir, diffusers pipeline on the same checkpoint, pad id)."""
    checkpoint, engine_dir, prediction, pad = FAMILIES[name]
    engine_dir = request.getfixturevalue(engine_dir)
    runtime = Runtime(engine_dir, backend="onnxruntime")
    pipe = diffusers_pipeline(request.getfixturevalue(checkpoint), PUBLISHED_FAMILY[name], engine_dir / "tokenizer",
                              euler(prediction))
    return runtime, pipe, pad


# Whole generations on SD 2.x repeat the SD 1.x checks on a 24-layer text tower: `-m slow` runs them.
@pytest.fixture(scope="module", params=["sd1", pytest.param("sd2", marks=pytest.mark.slow)])
def family(request):
    return runtime_and_pipeline(request, request.param)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def both_families(request):
    return runtime_and_pipeline(request, request.param)


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def oracle_context(pipe, pieces, pad, chunks=None) -> torch.Tensor:
    """A1111: chunk the pieces, encode each chunk with the CLIP text model, weight and restore the mean per chunk,
    join along the tokens; padded with the empty prompt's chunk to ``chunks``."""
    tokenize = lambda text: pipe.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    framed = a1111_chunks(pieces, tokenize, pad=pad)
    framed += a1111_chunks([("", 1.0)], tokenize, pad=pad) * ((chunks or len(framed)) - len(framed))
    with torch.inference_mode():
        z = pipe.text_encoder(torch.tensor([ids for ids, _ in framed]))[0]
    weights = torch.tensor([w for _, w in framed], dtype=z.dtype)
    rows = []
    for row in range(z.shape[0]):
        weighted = z[row] * weights[row][:, None]
        rows.append(weighted * (z[row].mean() / weighted.mean()))
    return torch.stack(rows).reshape(1, -1, z.shape[-1])


def both_images(runtime, pipe, prompt, negative, positive_ctx, negative_ctx, seed=3):
    latents = np.random.default_rng(seed).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    ours = runtime.generate(prompt, negative, steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                            latents=latents, scheduler="euler")
    with torch.inference_mode():
        theirs = pipe(prompt_embeds=positive_ctx, negative_prompt_embeds=negative_ctx, num_inference_steps=STEPS,
                      guidance_scale=7.5, height=SIZE, width=SIZE, latents=torch.from_numpy(latents),
                      output_type="np").images[0]
    return np.asarray(ours.images[0], np.float64) / 255, theirs, ours


def our_context(runtime, prompts):
    return runtime.text.encode(runtime.engines["text_encoder"], runtime.text.prepare(prompts))


def test_plain_short_prompts_equal_diffusers_encode_prompt(both_families):
    runtime, pipe, _ = both_families
    prompt, negative = "a red fox in the snow, highly detailed", "blurry"
    ours = our_context(runtime, [negative, prompt])
    with torch.inference_mode():
        positive, negatives = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    assert ours.shape == (2, 77, runtime.config.text_encoder.hidden_size)
    assert rel_l2(ours, torch.cat([negatives, positive]).numpy()) < 1e-5


@pytest.mark.parametrize("case", ["long", "break"])
def test_long_and_break_prompts_equal_per_chunk_clip_encodings_and_diffusers(family, case):
    runtime, pipe, pad = family
    prompt, pieces, chunks = {
        "long": (LONG, [(LONG, 1.0)], 3),
        "break": ("a castle on a hill BREAK stormy sky, lightning", [("a castle on a hill", 1.0), ("BREAK", None),
                                                                      ("stormy sky, lightning", 1.0)], 2),
    }[case]
    positive = oracle_context(pipe, pieces, pad)
    negative = oracle_context(pipe, [("", 1.0)], pad, chunks=positive.shape[1] // 77)
    assert positive.shape[1] == 77 * chunks
    ours = our_context(runtime, ["", prompt])
    assert ours.shape[1] == 77 * chunks and rel_l2(ours, torch.cat([negative, positive]).numpy()) < 1e-5
    image, expected, result = both_images(runtime, pipe, prompt, "", positive, negative)
    value = psnr(image, expected)
    print(f"PSNR {value:.1f} dB")  # shown by pytest -rP
    assert value > 55, f"{case}: PSNR {value:.1f} dB"
    # The chunks beyond the first matter: diffusers' own truncation to 77 tokens gives a clearly different image.
    with torch.inference_mode():
        truncated = pipe(prompt, negative_prompt="", num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                         width=SIZE, latents=torch.from_numpy(np.random.default_rng(3).standard_normal(
                             (1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)), output_type="np").images[0]
    assert psnr(image, truncated) < value - 15
    assert result.parameters["prompt"] == prompt


def test_weighted_prompt_equals_the_pipeline_fed_emphasised_embeddings(family):
    runtime, pipe, pad = family
    prompt = "a (red:1.3) fox in [the] snow, ((sharp focus)), (watercolor:0.6)"
    pieces = [("a ", 1.0), ("red", 1.3), (" fox in ", 1.0), ("the", 1 / 1.1), (" snow, ", 1.0), ("sharp focus", 1.21),
              (", ", 1.0), ("watercolor", 0.6)]
    negative_prompt, negative_pieces = "[blurry], lowres", [("blurry", 1 / 1.1), (", lowres", 1.0)]
    positive, negative = oracle_context(pipe, pieces, pad), oracle_context(pipe, negative_pieces, pad)
    image, expected, _ = both_images(runtime, pipe, prompt, negative_prompt, positive, negative)
    value = psnr(image, expected)
    print(f"PSNR {value:.1f} dB")  # shown by pytest -rP
    assert value > 55, f"weighted: PSNR {value:.1f} dB"
    plain = runtime.generate(prompt, negative_prompt, steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                             scheduler="euler", prompt_syntax="plain",
                             latents=np.random.default_rng(3).standard_normal((1, 4, 16, 16), dtype=np.float32))
    assert psnr(image, np.asarray(plain.images[0], np.float64) / 255) < value - 15  # the syntax moves the image


def test_prompt_past_the_exported_length_fails_before_any_engine_runs(tiny_engine_dir, capsys):
    runtime = Runtime(tiny_engine_dir, backend="onnxruntime")
    for engine in runtime.engines.values():
        engine.infer = lambda feeds: pytest.fail("an engine ran for a prompt that should have been refused")
    too_long = "x " * 226
    with pytest.raises(ValueError, match=r"needs 4 chunks of 75 tokens, but these engines take at most 225 tokens "
                                         r"\(3 chunks\).*--max-prompt-tokens 300"):
        runtime.generate(too_long, steps=2, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="needs 4 chunks"):  # the negative prompt counts too
        runtime.generate("a", "x BREAK y BREAK z BREAK w", steps=2, height=SIZE, width=SIZE)
    assert main(["generate", str(tiny_engine_dir), too_long, "--size", "128x128", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-prompt-tokens 300" in err


def _format_1_copy(engine_dir, checkpoint, target):
    """What an rtsd of format 1 wrote: a text encoder taking token ids only, a UNet context of exactly 77 tokens,
    no prompt record. The text encoder is exported here from the reference the old way (one input)."""
    from rtsd.models import load_checkpoint
    from tests.legacy_unet import replace_with_plain_unet

    shutil.copytree(engine_dir, target)
    replace_with_plain_unet(target, checkpoint)  # formats before 4: no ControlNet residual inputs
    models = load_checkpoint(checkpoint, dtype=torch.float32, device="cpu")

    class IdsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder = models.text_encoder

        def forward(self, input_ids):
            return self.text_encoder(input_ids)

    ids = torch.randint(0, 49406, (2, 77))
    torch.onnx.export(IdsOnly().eval(), (ids,), str(target / "text_encoder.onnx"), input_names=["input_ids"],
                      output_names=["hidden_states"], dynamic_axes={"input_ids": {0: "batch"},
                                                                    "hidden_states": {0: "batch"}},
                      opset_version=17, dynamo=False)
    import onnx

    exported = onnx.load(str(target / "text_encoder.onnx"))  # the old export's clean-up fixed these output dims
    for dim, value in zip(exported.graph.output[0].type.tensor_type.shape.dim[1:],
                          (77, models.config.text_encoder.hidden_size)):
        dim.dim_value = value
    onnx.save(exported, str(target / "text_encoder.onnx"))
    unet = onnx.load(str(target / "unet.onnx"), load_external_data=False)  # weights stay in unet.onnx.data
    for tensor in unet.graph.input:
        if tensor.name == "encoder_hidden_states":
            tensor.type.tensor_type.shape.dim[1].dim_value = 77  # format 1: exactly one chunk
    onnx.save(unet, str(target / "unet.onnx"))
    data = json.loads((target / "manifest.json").read_text())
    data["format_version"] = 1
    del data["prompt"], data["shape_range"]["max_prompt_tokens"]
    te = data["components"]["text_encoder"]
    te["io"]["inputs"] = [t for t in te["io"]["inputs"] if t["name"] == "input_ids"]
    te["profile"] = {"input_ids": te["profile"]["input_ids"]}
    for name in ("text_encoder", "unet"):  # what that export recorded for its files
        data["components"][name]["onnx"]["sha256"] = sha256_file(target / f"{name}.onnx")
    for tensor in data["components"]["unet"]["io"]["inputs"]:
        if tensor["name"] == "encoder_hidden_states":
            tensor["shape"][1] = 77
    (target / "manifest.json").write_text(json.dumps(data))


def test_format_1_engine_dirs_still_run_one_chunk_and_refuse_the_rest(tiny_engine_dir, tiny_checkpoint, tmp_path):
    old = tmp_path / "format1"
    _format_1_copy(tiny_engine_dir, tiny_checkpoint, old)
    legacy, current = Runtime(old, backend="onnxruntime"), Runtime(tiny_engine_dir, backend="onnxruntime")
    assert legacy.manifest.format_version == 1 and legacy.shape_range.max_prompt_tokens == 75
    request = dict(steps=3, height=SIZE, width=SIZE, seed=5, scheduler="euler")
    for prompt in ("a red fox in the snow", "a (red:1.4) fox, [snow]", "x " * 75):
        a = np.asarray(legacy.generate(prompt, "blurry", **request).images[0], np.float64) / 255
        b = np.asarray(current.generate(prompt, "blurry", **request).images[0], np.float64) / 255
        assert psnr(a, b) > 60, prompt
    with pytest.raises(ValueError, match=r"at most 75 tokens \(1 chunk\).*re-export with `rtsd export "
                                         r"--max-prompt-tokens 150`"):
        legacy.generate("x " * 76, **request)
    with pytest.raises(EngineDirError, match=r"format 1.*re-export it with this rtsd"):
        legacy.load_textual_inversion(tmp_path / "any.pt")
    with pytest.raises(EngineDirError, match="format_version 7"):
        data = json.loads((old / "manifest.json").read_text())
        (old / "manifest.json").write_text(json.dumps({**data, "format_version": 7}))
        Runtime(old, backend="onnxruntime")
