"""The TensorRT refit path end to end through the stand-in: weights map -> merged weights in the plan's layout ->
Refitter calls -> captured CUDA graphs dropped; ``{}`` refits the base values back; a non-refittable plan asks for
--refittable. Expected values come from the exported ONNX file itself (read with the onnx package) plus the LoRA
formula written here, so a wrong map entry, layout or name fails."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from safetensors.numpy import save_file

from rtsd.engine import tensorrt as trt_backend
from rtsd.errors import EngineDirError
from rtsd.export.manifest import Manifest
from rtsd.export.specs import ShapeRange
from rtsd.runtime import Runtime
from tests.conftest import EXPORT_RANGE
from tests.tensorrt_refit_sim import add_refit
from tests.tensorrt_sim import SimCupy, SimTensorRT, cpu_launcher, write_sim_engine_dir

GPU, CAPABILITY = "Sim GPU", "9.0"
# kohya names -> (LDM key, shape (out, in)) of a linear and a 1x1-conv target in the tiny SD 1.x UNet, and a text one
MODULES = {
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":
        "unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_down_blocks_1_attentions_0_proj_in": "unet.input_blocks.4.1.proj_in.weight",
    "lora_te_text_model_encoder_layers_3_mlp_fc1": "text_encoder.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
}


@pytest.fixture()
def onnx_weights(tiny_engine_dir):
    """initializer name -> value, straight from the exported ONNX files."""
    out = {}
    for component in ("unet", "text_encoder"):
        model = onnx.load(str(tiny_engine_dir / f"{component}.onnx"), load_external_data=True)
        out.update({t.name: numpy_helper.to_array(t) for t in model.graph.initializer})
    return out


def _sim_dir(tmp_path, tiny_engine_dir, monkeypatch, refittable=True, linked=()):
    """A TensorRT engine dir on the stand-in that carries the real export's weights maps and data files."""
    manifest = Manifest.read(tiny_engine_dir)
    write_sim_engine_dir(tmp_path, manifest.model, ShapeRange(**EXPORT_RANGE), GPU, CAPABILITY, overflow=())
    sim = Manifest.read(tmp_path)
    refit = {}
    for component in ("unet", "text_encoder"):
        weights_map = manifest.components[component]["weights_map"]
        sim.components[component]["weights_map"] = weights_map
        shutil.copy(tiny_engine_dir / weights_map["data_file"], tmp_path / weights_map["data_file"])
        sim.components[component]["engines"]["tensorrt"]["refittable"] = refittable
        if refittable:
            refit[component] = {e["initializer"]: (tuple(e["shape"]), e["dtype"]) for e in weights_map["weights"].values()}
    sim.write(tmp_path)
    trt = add_refit(SimTensorRT(manifest.model, ShapeRange(**EXPORT_RANGE), launch=cpu_launcher()), refit, linked)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda purpose: trt)
    monkeypatch.setattr(trt_backend, "cuda_device", lambda purpose, device=0: (SimCupy(), GPU, CAPABILITY))
    return Runtime(tmp_path, backend=trt_backend.TensorRTBackend()), trt


def _lora(tmp_path, onnx_weights):
    rng = np.random.default_rng(0)
    state, deltas = {}, {}
    for module, name in MODULES.items():
        value = onnx_weights[name]
        # the checkpoint layout is (out, in[, 1, 1]); MatMul initializers hold it transposed
        out, inp = (value.shape[1], value.shape[0]) if value.ndim == 2 else value.shape[:2]
        down, up = rng.standard_normal((4, inp), dtype=np.float32), rng.standard_normal((out, 4), dtype=np.float32)
        state.update({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                      f"{module}.alpha": np.array(2.0, np.float32)})
        delta = (up @ down) * 0.5
        deltas[name] = delta.T if value.ndim == 2 else delta.reshape(value.shape)
    save_file(state, str(tmp_path / "style.safetensors"))
    return tmp_path / "style.safetensors", deltas


def _engine(trt, name):
    return next(e for e in trt.deserialized if e.name == name)


def test_refit_sends_the_merged_weights_and_drops_captured_graphs(tmp_path, tiny_engine_dir, monkeypatch,
                                                                   onnx_weights):
    runtime, trt = _sim_dir(tmp_path / "engines", tiny_engine_dir, monkeypatch)
    lora, deltas = _lora(tmp_path, onnx_weights)
    request = dict(prompt="a fox", steps=3, height=128, width=128, seed=1, scheduler="euler")
    runtime.generate(**request)
    graphs = runtime.engines["unet"].graphs
    assert graphs.captures == 1 and graphs._graphs  # the UNet call was captured into a CUDA graph

    result = runtime.generate(**request, loras={lora: 0.7})
    unet, text = _engine(trt, "unet"), _engine(trt, "text_encoder")
    assert unet.refits == [sorted(n for n in MODULES.values() if n.startswith("unet."))]
    assert text.refits == [[MODULES["lora_te_text_model_encoder_layers_3_mlp_fc1"]]]
    for name, delta in deltas.items():
        engine = unet if name.startswith("unet.") else text
        np.testing.assert_allclose(engine.weights[name], onnx_weights[name] + np.float32(0.7) * delta,
                                   rtol=1e-6, atol=1e-6)
        assert np.abs(0.7 * delta).max() > 1e-2  # the update is real
    assert graphs.captures == 2  # the old graph was dropped and the refitted engine captured afresh
    assert [r["name"] for r in result.parameters["loras"]] == ["style.safetensors"]

    runtime.set_loras({})  # back to base: the changed weights get the file's values again, exactly
    for name in MODULES.values():
        engine = unet if name.startswith("unet.") else text
        np.testing.assert_array_equal(engine.weights[name], onnx_weights[name])
    assert not graphs._graphs


def test_weights_tensorrt_needs_together_are_one_clear_error(tmp_path, tiny_engine_dir, monkeypatch, onnx_weights):
    linked = [("unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
               "unet.middle_block.1.transformer_blocks.0.attn2.to_v.weight")]
    runtime, _ = _sim_dir(tmp_path / "engines", tiny_engine_dir, monkeypatch, linked=linked)
    lora, _ = _lora(tmp_path, onnx_weights)
    with pytest.raises(EngineDirError, match=r"needs 1 more weight\(s\) to refit \(unet.middle_block.1.*to_v"):
        runtime.set_loras({lora: 1.0})


def test_a_plan_built_without_refit_asks_for_refittable(tmp_path, tiny_engine_dir, monkeypatch, onnx_weights):
    runtime, _ = _sim_dir(tmp_path / "engines", tiny_engine_dir, monkeypatch, refittable=False)
    lora, _ = _lora(tmp_path, onnx_weights)
    with pytest.raises(EngineDirError, match="--refittable") as info:
        runtime.set_loras({lora: 1.0})
    assert "\n" not in str(info.value)
