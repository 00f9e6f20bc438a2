"""The prompt axes of the engine contract, on the CPU: the UNet context's sequence axis (77 x chunks) and the text
encoder's extra_embeddings rows, from ShapeRange.max_prompt_tokens into ONNX dynamic axes, TensorRT profiles, input
validation and the manifest; and the TensorRT backend loop (tests/tensorrt_sim.py stand-in) on a 2-chunk prompt."""

from __future__ import annotations

import pytest

from rtsd.config import ModelConfig
from rtsd.engine import tensorrt as trt_backend
from rtsd.engine.tensorrt import check_profile
from rtsd.export.manifest import Manifest
from rtsd.export.manifest import FORMAT_VERSION
from rtsd.export.specs import ShapeRange, specs_for
from rtsd.export.tensorrt import engine_profile
from rtsd.runtime import Runtime
from tests.tensorrt_sim import (MODEL_LIKE, HostStandIn, SimCupy, SimTensorRT, assert_device_equals_host,
                                write_sim_engine_dir)

SD15 = ModelConfig("sd1")


@pytest.mark.parametrize("tokens,max_batch", [(75, 1), (150, 2), (225, 4), (375, 2)])
def test_profiles_follow_max_prompt_tokens(tokens, max_batch):
    r = ShapeRange(min_size=256, max_size=512, opt_size=256, max_batch=max_batch, max_prompt_tokens=tokens)
    specs = specs_for(SD15, r)
    unet, text = engine_profile(specs["unet"], r), engine_profile(specs["text_encoder"], r)
    rows = 2 * max_batch
    assert unet["encoder_hidden_states"] == {"min": [1, 77, 768], "opt": [2, 77, 768],
                                             "max": [rows, 77 * tokens // 75, 768]}
    assert text["input_ids"] == {"min": [1, 77], "opt": [2, 77], "max": [rows, 77]}  # one chunk per call
    assert text["extra_embeddings"] == {k: [rows * 75, 768] for k in ("min", "opt", "max")}
    static = engine_profile(specs["unet"], r, static=True)
    assert static["sample"]["min"] == static["sample"]["max"] == [2, 4, 32, 32]
    assert static["encoder_hidden_states"] == {"min": [2, 77, 768], "opt": [2, 77, 768],
                                               "max": [2, 77 * tokens // 75, 768]}
    assert specs["unet"].dynamic_axes()["encoder_hidden_states"] == {0: "batch", 1: "context_length"}


def test_profile_accepts_every_exported_chunk_count_and_refuses_more():
    r = ShapeRange(min_size=256, max_size=512, max_batch=2, max_prompt_tokens=225)
    spec = specs_for(SD15, r)["unet"]
    profile = {n: {k: tuple(v) for k, v in c.items()} for n, c in engine_profile(spec, r).items()}
    for chunks in (1, 2, 3):
        shapes = spec.shapes(4, 512, 512, chunks=chunks)
        check_profile(spec, {t.name: shapes[t.name] for t in spec.inputs}, profile)
    shapes = spec.shapes(4, 512, 512, chunks=4)
    with pytest.raises(ValueError, match="outside the TensorRT engine"):
        check_profile(spec, {t.name: shapes[t.name] for t in spec.inputs}, profile)


def test_validation_wants_whole_chunks_and_consistent_rows():
    spec = specs_for(SD15)["unet"]
    feeds = spec.sample_inputs(2, 256, 256, chunks=3)
    assert feeds["encoder_hidden_states"].shape == (2, 231, 768)
    assert spec.validate(feeds)["context_length"] == 231
    feeds["encoder_hidden_states"] = feeds["encoder_hidden_states"][:, :200]
    with pytest.raises(ValueError, match=r"context_length\) must be a multiple of 77"):
        spec.validate(feeds)
    text = specs_for(SD15, ShapeRange(max_batch=1))["text_encoder"]
    feeds = text.sample_inputs(2, 256, 256)
    assert feeds["extra_embeddings"].shape == (150, 768) and (feeds["input_ids"] >= 49408).any()
    feeds["extra_embeddings"] = feeds["extra_embeddings"][:10]
    with pytest.raises(ValueError, match="axis 0 must be 150"):
        text.validate(feeds)


def test_manifest_records_the_prompt_contract(tmp_path):
    r = ShapeRange(min_size=64, max_size=128, opt_size=64, max_batch=2, max_prompt_tokens=150)
    manifest = write_sim_engine_dir(tmp_path, SD15, r, "Sim GPU", "9.0")
    data = Manifest.read(tmp_path).to_dict()
    assert data["format_version"] == FORMAT_VERSION and data["shape_range"]["max_prompt_tokens"] == 150
    prompt = data["prompt"]
    assert (prompt["max_chunks"], prompt["chunk_length"], prompt["context_axis"]) == (2, 77, "context_length")
    rows = manifest.spec("text_encoder").inputs[1].shape[0]  # what the text encoder's io declares
    assert prompt["extra_embeddings"]["first_id"] == 49408 and prompt["extra_embeddings"]["rows"] == rows
    assert manifest.spec("unet").inputs[2].shape == ("batch", "context_length", 768)
    with pytest.raises(ValueError, match="multiple of 75"):
        ShapeRange(max_prompt_tokens=100)


SIM_RANGE = ShapeRange(min_size=64, max_size=128, opt_size=64, max_batch=2)


@pytest.mark.parametrize("prompt,chunks", [("a red fox BREAK in the (snow:1.3)", 2),
                                           (", ".join(["a red fox in the snow"] * 16), 2)])
def test_sim_backend_loop_runs_a_two_chunk_prompt(monkeypatch, tmp_path, prompt, chunks):
    """Runtime.generate through TensorRTBackend with a 2-chunk prompt equals the same stand-ins in a NumPy loop,
    and the UNet's execution context was set to a 154-token context."""
    trt, cp = SimTensorRT(SD15, SIM_RANGE, compute=MODEL_LIKE), SimCupy()
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda purpose: trt)
    monkeypatch.setattr(trt_backend, "cuda_device", lambda purpose, device=0: (cp, "Sim GPU", "9.0"))
    write_sim_engine_dir(tmp_path, SD15, SIM_RANGE, "Sim GPU", "9.0", overflow=())
    device = Runtime(tmp_path, backend=trt_backend.TensorRTBackend())
    host = Runtime(tmp_path, backend=HostStandIn(SD15))
    request = dict(prompt=prompt, negative_prompt="blurry", steps=4, height=64, width=64, seed=2, scheduler="euler")
    assert device.text.prepare([prompt]).chunks == chunks
    assert_device_equals_host(device, host, request)
    unet = next(e for e in trt.deserialized if e.name == "unet")
    text = next(e for e in trt.deserialized if e.name == "text_encoder")
    assert {c.shapes["encoder_hidden_states"] for c in unet.contexts} == {(2, 77 * chunks, 768)}
    assert text.runs == chunks  # one text-encoder call per chunk position
