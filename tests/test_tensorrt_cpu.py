"""Everything the TensorRT backend depends on that runs without TensorRT or a GPU.

Profiles derived from the specs, plan staleness, the fp32 layer policy, the ONNX graphs' operators against
TensorRT 10's parser support list, the missing-dependency errors, the grow-only buffers and CUDA-graph cache
policies, and the device-side arithmetic: the schedulers' step and the CFG combine run on an operator-only array
type (what CuPy offers) and equal the NumPy run bit for bit.
"""

from __future__ import annotations

import numbers
import subprocess
import sys
import types

import numpy as np
import pytest

from rtsd.config import ModelConfig
from rtsd.control_layout import residual_names
from rtsd.engine.cuda import GraphCache, GrowOnlyBuffers, data_pointer
from rtsd.engine.staleness import HostInfo, stale_message, stale_reasons
from rtsd.engine.tensorrt import check_profile, covering_flags, profile_ranges, request_size
from rtsd.errors import MissingDependencyError
from rtsd.export import trt_support
from rtsd.export.specs import COMPONENTS, ShapeRange, specs_for
from rtsd.export.tensorrt import LayerInfo, build_options, engine_profile, fp32_layer_names
from rtsd.runtime import Runtime
from tests.tensorrt_sim import (LOOP_REQUESTS, MODEL_LIKE, FakeStream, HostStandIn, SimCupy, SimTensorRT,
                                 assert_device_equals_host, generate_with_latents, install_sim, write_sim_engine_dir)

SD15 = ModelConfig("sd1")
SPECS = specs_for(SD15)


# ---------------------------------------------------------------- profiles from the specs

@pytest.mark.parametrize("min_size,opt_size,max_size,max_batch", [
    (256, 512, 1024, 4), (512, 512, 512, 1), (256, 768, 1536, 2), (64, 64, 128, 8)])
def test_engine_profiles_follow_the_specs(min_size, opt_size, max_size, max_batch):
    r = ShapeRange(min_size=min_size, max_size=max_size, opt_size=opt_size, max_batch=max_batch)
    lat = {"min": min_size // 8, "opt": opt_size // 8, "max": max_size // 8}
    px = {"min": min_size, "opt": opt_size, "max": max_size}
    rows = {"min": 1, "opt": 1, "max": max_batch}
    for corner in ("min", "opt", "max"):
        cfg_rows = 1 if corner == "min" else 2 * rows[corner]  # CFG doubles the text-encoder and UNet batch
        expected = {
            "text_encoder": {"input_ids": [cfg_rows, 77]},
            "unet": {"sample": [cfg_rows, 4, lat[corner], lat[corner]], "timestep": [cfg_rows],
                     "encoder_hidden_states": [cfg_rows, 231 if corner == "max" else 77, 768]},  # 1..3 chunks
            "vae_decoder": {"latent": [rows[corner], 4, lat[corner], lat[corner]]},
            "vae_encoder": {"images": [rows[corner], 3, px[corner], px[corner]]},
        }
        for component in COMPONENTS:
            profile = engine_profile(SPECS[component], r)
            for name, shape in expected[component].items():
                assert profile[name][corner] == shape, (component, name, corner)


@pytest.mark.parametrize("range_", [ShapeRange(min_size=256, max_size=1024, opt_size=768, max_batch=4, opt_batch=2),
                                    ShapeRange.fixed(batch=2, height=512, width=512)])
def test_static_profiles_are_the_opt_shape(range_):
    for component in COMPONENTS:
        for name, corners in engine_profile(SPECS[component], range_, static=True).items():
            if name == "encoder_hidden_states":  # the prompt's length (77 x chunks) stays dynamic, nothing else
                assert corners["min"][1:2] == [77] and corners["max"][1:2] == [231], corners
                corners = {k: v[:1] + v[2:] for k, v in corners.items()}
            assert corners["min"] == corners["opt"] == corners["max"], (component, name)
    unet = engine_profile(SPECS["unet"], range_, static=True)["sample"]["opt"]
    assert unet == [2 * range_.opt_batch, 4, range_.opt_size // 8, range_.opt_size // 8]


def _profile(component, range_, static=False):
    return {n: {k: tuple(v) for k, v in c.items()} for n, c in engine_profile(SPECS[component], range_, static).items()}


@pytest.mark.parametrize("rows,size", [(1, 256), (2, 512), (8, 1024), (5, 640)])
def test_requests_inside_the_profile_pass_and_one_step_outside_fails(rows, size):
    """Inside the profile (its corners included) no axis is reported and check_profile accepts; the same request one
    latent step (8 px) past the max size, below the min size, or one row past the max batch is refused."""
    from rtsd.engine.tensorrt import outside_profile

    r = ShapeRange(min_size=256, max_size=1024, max_batch=4)
    for component in COMPONENTS:
        spec, profile = SPECS[component], _profile(component, r)
        max_rows = 4 * spec.batch_factor

        def shapes(n, px):
            return {t.name: spec.shapes(n, px, px)[t.name] for t in spec.inputs}

        inside = shapes(min(rows, max_rows), size)
        assert outside_profile(inside, profile) == [], (component, inside)
        assert check_profile(spec, inside, profile) is None
        outside = [shapes(max_rows + 1, size)]
        if component != "text_encoder":  # its only dynamic axis is the batch
            outside += [shapes(min(rows, max_rows), 1024 + 8), shapes(min(rows, max_rows), 256 - 8)]
        for request in outside:
            assert outside_profile(request, profile), (component, request)
            with pytest.raises(ValueError, match=f"^{component}: .* is outside the TensorRT engine"):
                check_profile(spec, request, profile)


def test_request_size_and_ranges_are_in_user_terms():
    spec, r = SPECS["unet"], ShapeRange(min_size=256, max_size=1024, max_batch=4)
    assert request_size(spec, {t.name: spec.shapes(6, 512, 768)[t.name] for t in spec.inputs}) == (6, 512, 768)
    assert profile_ranges(spec, _profile("unet", r)) == {"rows": (1, 8), "height": (256, 1024), "width": (256, 1024)}
    assert profile_ranges(SPECS["text_encoder"], _profile("text_encoder", r)) == {"rows": (1, 8)}


@pytest.mark.parametrize("component,rows,height,width,static,flags", [
    ("unet", 2, 1152, 1152, False, ["--max-size 1152"]),
    ("unet", 10, 512, 512, False, ["--max-batch 5"]),
    ("unet", 2, 192, 1100, False, ["--max-size 1152", "--min-size 192"]),
    ("vae_decoder", 5, 512, 512, False, ["--max-batch 5"]),
    ("unet", 1, 512, 512, True, ["without --static"]),
    ("text_encoder", 12, None, None, False, ["--max-batch 6"]),
])
def test_requests_outside_the_profile_fail_naming_the_range_and_the_flags(component, rows, height, width, static,
                                                                           flags):
    r = ShapeRange(min_size=256, max_size=1024, opt_size=512, max_batch=4, opt_batch=1)
    spec, profile = SPECS[component], _profile(component, r, static)
    shapes = {t.name: spec.shapes(rows, height or 512, width or 512)[t.name] for t in spec.inputs}
    assert covering_flags(spec, rows, height, width, profile_ranges(spec, profile), static) == flags
    with pytest.raises(ValueError) as info:
        check_profile(spec, shapes, profile, static=static)
    message = str(info.value)
    assert message.startswith(f"{component}: {rows} row") and "rtsd export" in message
    for flag in flags:
        assert flag.replace("without ", "") in message
    if static:
        assert "static engine" in message and "2..2 rows" in message and "512..512 px" in message
    elif component != "text_encoder":
        assert "256..1024 px" in message
    assert "\n" not in message


# ---------------------------------------------------------------- staleness

HOST = HostInfo("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
GOOD = {"file": "unet.plan", "sha256": "p" * 64, "precision": "fp16", "tensorrt_version": "10.8.0.43",
        "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "onnx_sha256": "a" * 64,
        "profile": {"sample": {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [8, 4, 128, 128]}}}


def _reasons(record, **kw):
    return stale_reasons(record, kw.pop("onnx", "a" * 64), HOST.tensorrt_version, HOST.gpu_name,
                         HOST.compute_capability, **kw)


def test_a_matching_plan_is_fresh():
    assert _reasons(GOOD) == []
    assert _reasons(GOOD, precision="fp16", profile={"sample": {"min": (1, 4, 32, 32), "opt": (2, 4, 64, 64),
                                                                 "max": (8, 4, 128, 128)}}) == []


@pytest.mark.parametrize("change,kw,needle", [
    ({"tensorrt_version": "10.3.0.26"}, {}, "built with TensorRT 10.3.0.26, this machine has TensorRT 10.8.0.43"),
    ({"compute_capability": "8.0", "gpu": "NVIDIA A100-SXM4-80GB"}, {}, "compute capability sm_80, this GPU is sm_90"),
    ({"gpu": "NVIDIA H800"}, {}, "built on NVIDIA H800, this GPU is NVIDIA H100 80GB HBM3"),
    ({"onnx_sha256": "b" * 64}, {}, "different ONNX export"),
    ({}, {"plan_present": False}, "unet.plan is missing"),
    ({}, {"precision": "fp32"}, "built in fp16, fp32 was requested"),
    ({}, {"profile": {"sample": {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [8, 4, 144, 144]}}},
     "optimization profile changed"),
])
def test_each_mismatch_is_one_reason(change, kw, needle):
    reasons = _reasons({**GOOD, **change}, **kw)
    assert len(reasons) == 1 and needle in reasons[0], reasons


def test_no_record_and_unknown_onnx_hash():
    assert _reasons(None) == ["no TensorRT engine has been built"]
    assert _reasons(GOOD, onnx=None) == []  # the caller does not know the ONNX hash: not judged


def test_foreign_plan_message_names_both_machines_and_the_fix():
    record = {**GOOD, "tensorrt_version": "10.3", "gpu": "NVIDIA A100", "compute_capability": "8.0"}
    host = HostInfo("10.8", "H100", "9.0")
    reasons = stale_reasons(record, "a" * 64, host.tensorrt_version, host.gpu_name, host.compute_capability)
    assert stale_message("unet", record, reasons, host, "ENGINE_DIR") == (
        "unet.plan was built for TensorRT 10.3 on NVIDIA A100 (sm_80); this machine has TensorRT 10.8 on H100 "
        "(sm_90): rebuild with `rtsd export --rebuild ENGINE_DIR --backend tensorrt`")


def test_same_machine_message_lists_the_reasons():
    reasons = _reasons(GOOD, onnx="c" * 64, plan_present=False)
    message = stale_message("unet", GOOD, reasons, HOST, "out/sd15")
    assert message.startswith("unet.plan cannot be used (unet.plan is missing; built from a different ONNX")
    assert message.endswith("rebuild with `rtsd export --rebuild out/sd15 --backend tensorrt`")
    assert "no TensorRT engine" in stale_message("vae_decoder", None, _reasons(None), HOST, "d")


def test_rebuild_keeps_the_options_a_plan_was_built_with():
    r = ShapeRange()
    assert build_options(None, "unet", r, None, None) == ("fp16", False)
    assert build_options({"precision": "fp32", "static": True}, "vae_decoder", r, None, None) == ("fp32", True)
    assert build_options({"precision": "fp32", "static": True}, "vae_decoder", r, False, ()) == ("fp16", False)
    assert build_options(None, "vae_decoder", r, None, ("vae_decoder",)) == ("fp32", False)
    assert build_options(None, "unet", ShapeRange.fixed(1, 512, 512), False, None) == ("fp16", True)


# ---------------------------------------------------------------- fp32 layer policy

def _layer(name, type_, inputs=(), outputs=None, float_outputs=True):
    return LayerInfo(name, type_, tuple(inputs), tuple(outputs or (name + ":0",)), float_outputs)


ATTENTION = [
    _layer("norm", "NORMALIZATION", ["x"]),
    _layer("shape_reduce", "REDUCE", ["s"], float_outputs=False),  # integer shape arithmetic: never pinned
    _layer("q", "MATRIX_MULTIPLY", ["norm:0", "wq"]),
    _layer("k", "MATRIX_MULTIPLY", ["norm:0", "wk"]),
    _layer("qk", "MATRIX_MULTIPLY", ["q:0", "k:0"]),
    _layer("scale_const", "CONSTANT"),
    _layer("scale", "ELEMENTWISE", ["scale_const:0", "qk:0"]),
    _layer("softmax", "SOFTMAX", ["scale:0"]),
    _layer("mean", "REDUCE", ["softmax:0"]),
]


def test_norms_and_reductions_are_left_to_tensorrt_outside_the_vae_attention():
    """TensorRT computes normalization in fp32 by default; pinning them only adds reformats (docs/tensorrt.md)."""
    assert fp32_layer_names(ATTENTION, "unet") == []
    assert fp32_layer_names(ATTENTION, "text_encoder") == []


def test_vae_decoder_pins_only_the_attention_logits_path():
    assert fp32_layer_names(ATTENTION, "vae_decoder") == ["softmax", "scale", "qk"]


def test_softmax_whose_logits_do_not_come_from_a_matmul_pins_only_itself():
    layers = [_layer("x", "CONVOLUTION"), _layer("softmax", "SOFTMAX", ["x:0"])]
    assert fp32_layer_names(layers, "vae_decoder") == ["softmax"]


# ---------------------------------------------------------------- the builder's calls, against a fake of the bindings

class _FakeBuilderTRT:
    """The TensorRT 10 builder surface _Builder calls, with the signatures and return values of its Python bindings
    (pyCore.cpp / pyGraph.cpp / pyOnnx.cpp): None from build_serialized_network on failure, -1 from
    add_optimization_profile for a rejected profile, a bool from set_timing_cache."""

    float32, float16 = "FLOAT", "HALF"
    BuilderFlag = types.SimpleNamespace(FP16="FP16", TF32="TF32",
                                        OBEY_PRECISION_CONSTRAINTS="OBEY_PRECISION_CONSTRAINTS",
                                        PREFER_PRECISION_CONSTRAINTS="PREFER_PRECISION_CONSTRAINTS")
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, min_severity: None})

    def __init__(self, layers, inputs, *, profile_index=0, plan=b"plan", readable_cache=True, no_fp32_tactic=()):
        fake = self
        self.configs, self.profiles = [], []

        class Tensor:
            def __init__(self, name, dtype="FLOAT"):
                self.name, self.dtype = name, dtype

        class Layer:
            def __init__(self, name, type_, ins, outs):
                self.name, self.type = name, types.SimpleNamespace(name=type_)
                self._in, self._out = [Tensor(n) for n in ins], [Tensor(n) for n in outs]
                self.num_inputs, self.num_outputs, self.precision, self.output_types = len(ins), len(outs), None, {}

            def get_input(self, index):
                return self._in[index]

            def get_output(self, index):
                return self._out[index]

            def set_output_type(self, index, dtype):
                self.output_types[index] = dtype

        self.layers = [Layer(*layer) for layer in layers]
        network = types.SimpleNamespace(num_inputs=len(inputs), get_input=lambda i: Tensor(inputs[i]),
                                        num_layers=len(self.layers), get_layer=lambda i: fake.layers[i])

        class Config:
            def __init__(self):
                # R9: TF32 is "Enabled by default" (BuilderFlag docs)
                self.flags, self.builder_optimization_level, self.cache = {"TF32"}, None, None
                fake.configs.append(self)

            def set_flag(self, flag):
                self.flags.add(flag)

            def clear_flag(self, flag):
                self.flags.discard(flag)

            def add_optimization_profile(self, profile):
                return profile_index

            def create_timing_cache(self, serialized_timing_cache):
                blob = bytes(serialized_timing_cache)
                return types.SimpleNamespace(serialize=lambda: blob + b"+timed") if readable_cache or not blob \
                    else None

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile(dict):
            def set_shape(self, input, min, opt, max):
                self[input] = (min, opt, max)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags=0):
                return network

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                fake.profiles.append(Profile())
                return fake.profiles[-1]

            def build_serialized_network(self, network, config):
                # R9: OBEY_PRECISION_CONSTRAINTS "Require that layers execute in specified precisions. Build fails
                # otherwise." A layer pinned to fp32 that has no fp32 implementation fails the whole build.
                if "OBEY_PRECISION_CONSTRAINTS" in config.flags and any(
                        layer.precision == fake.float32 and layer.type.name in no_fp32_tactic for layer in fake.layers):
                    return None
                return plan

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, model):
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


_DECODER_LAYERS = [("norm", "NORMALIZATION", ["latent"], ["n"]), ("qk", "MATRIX_MULTIPLY", ["n", "n"], ["qk"]),
                   ("sq", "SQUEEZE", ["qk"], ["sq"]), ("softmax", "SOFTMAX", ["sq"], ["p"]),
                   ("conv", "CONVOLUTION", ["p"], ["images"])]


@pytest.mark.parametrize("cache_blob", [None, b"readable", b"unreadable"])
def test_builder_pins_fp32_layers_sets_the_profile_and_keeps_the_timing_cache(tmp_path, cache_blob):
    from rtsd.export.tensorrt import _Builder

    if cache_blob is not None:
        (tmp_path / "timing.cache").write_bytes(cache_blob)
    trt = _FakeBuilderTRT(_DECODER_LAYERS, ["latent"], readable_cache=cache_blob != b"unreadable")
    profile = engine_profile(SPECS["vae_decoder"], ShapeRange())
    record = _Builder(trt, tmp_path, 4, "timing.cache").build(tmp_path / "vae_decoder.onnx", SPECS["vae_decoder"],
                                                              tmp_path / "vae_decoder.plan", "vae_decoder", "fp16",
                                                              profile)
    config = trt.configs[0]
    assert config.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"} and config.builder_optimization_level == 4
    assert record["fp32_layers"] == ["softmax", "sq", "qk"]
    pinned = {layer.name: (layer.precision, layer.output_types) for layer in trt.layers}
    assert pinned["qk"] == ("FLOAT", {0: "FLOAT"}) and pinned["conv"] == (None, {}) and pinned["norm"] == (None, {})
    assert trt.profiles[0] == {"latent": tuple(tuple(profile["latent"][c]) for c in ("min", "opt", "max"))}
    assert (tmp_path / "vae_decoder.plan").read_bytes() == b"plan"
    kept = cache_blob if cache_blob == b"readable" else b""
    assert (tmp_path / "timing.cache").read_bytes() == kept + b"+timed"


@pytest.mark.parametrize("failure, needle", [({"profile_index": -1}, "rejected the optimization profile"),
                                             ({"plan": None}, "failed to build vae_decoder.plan")])
def test_builder_failures_are_engine_build_errors(tmp_path, failure, needle):
    from rtsd.export.tensorrt import EngineBuildError, _Builder

    trt = _FakeBuilderTRT(_DECODER_LAYERS, ["latent"], **failure)
    with pytest.raises(EngineBuildError, match=needle):
        _Builder(trt, tmp_path, 3, None).build(tmp_path / "vae_decoder.onnx", SPECS["vae_decoder"],
                                               tmp_path / "vae_decoder.plan", "vae_decoder", "fp16",
                                               engine_profile(SPECS["vae_decoder"], ShapeRange()))
    assert not (tmp_path / "vae_decoder.plan").exists()


def _build(tmp_path, trt, component="vae_decoder"):
    from rtsd.export.tensorrt import _Builder

    return _Builder(trt, tmp_path, 3, None).build(tmp_path / f"{component}.onnx", SPECS[component],
                                                  tmp_path / f"{component}.plan", component, "fp16",
                                                  engine_profile(SPECS[component], ShapeRange()))


def test_r9_obey_fails_the_build_when_a_pinned_layer_has_no_fp32_tactic(tmp_path):
    """The fake is strict (OBEY: "Build fails otherwise"): pinning a layer without an fp32 implementation fails."""
    from rtsd.export.tensorrt import EngineBuildError

    with pytest.raises(EngineBuildError, match="failed to build vae_decoder.plan"):
        _build(tmp_path, _FakeBuilderTRT(_DECODER_LAYERS, ["latent"], no_fp32_tactic=("SOFTMAX",)))


def test_normalization_layers_are_not_pinned_so_they_cannot_fail_an_obey_build(tmp_path):
    """Under the old policy a GroupNorm without an fp32 tactic would have failed the VAE build; now it is not pinned,
    TF32 is cleared where layers are pinned for accuracy, and a UNet (nothing pinned) keeps TensorRT's defaults."""
    trt = _FakeBuilderTRT(_DECODER_LAYERS, ["latent"], no_fp32_tactic=("NORMALIZATION",))
    assert _build(tmp_path, trt)["fp32_layers"] == ["softmax", "sq", "qk"]
    assert "TF32" not in trt.configs[0].flags and "OBEY_PRECISION_CONSTRAINTS" in trt.configs[0].flags
    unet_layers = [("norm", "NORMALIZATION", ["sample"], ["n"]), ("qk", "MATRIX_MULTIPLY", ["n", "n"], ["qk"]),
                   ("softmax", "SOFTMAX", ["qk"], ["model_output"])]
    trt = _FakeBuilderTRT(unet_layers, [t.name for t in SPECS["unet"].inputs])  # with the ControlNet residuals
    assert _build(tmp_path, trt, "unet")["fp32_layers"] == []
    assert trt.configs[0].flags == {"FP16", "TF32"} and all(layer.precision is None for layer in trt.layers)


# ---------------------------------------------------------------- the exported ONNX graphs vs TensorRT 10's parser

def test_support_lists_are_consistent():
    assert not trt_support.SUPPORTED & trt_support.UNSUPPORTED
    assert trt_support.OPSET_23_PLUS <= trt_support.SUPPORTED
    assert {"Conv", "InstanceNormalization", "LayerNormalization", "GroupNormalization", "Resize"} <= \
        trt_support.SUPPORTED_ANY_TRT10


def test_check_graph_reports_what_the_parser_would_reject():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="uniq"),
        helper.make_node("Resize", ["x", "", "scales"], ["r"], name="up", mode="cubic"),
        helper.make_node("Resize", ["x", "", "scales"], ["r2"], name="aa", mode="linear", antialias=1),
        helper.make_node("Shape", ["x"], ["axes"], name="dyn_axes"),
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], name="sum"),
        helper.make_node("ReduceSum", ["x", "const_axes"], ["s2"], name="sum_ok"),
        helper.make_node("Relu", ["x"], ["y"], name="custom", domain="com.microsoft"),
        helper.make_node("Attention", ["x", "x", "x"], ["att"], name="attn"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                               for n in ("u", "r", "r2", "s", "s2", "y", "att")],
                              initializer=[helper.make_tensor("scales", TensorProto.FLOAT, [2], [1.0, 2.0]),
                                           helper.make_tensor("const_axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    problems = trt_support.check_graph(model)
    assert len(problems) == 6, problems
    for needle in ("Unique node uniq: not supported", "up: mode 'cubic'", "aa: antialiased", "sum: axes input 'axes'",
                   "custom domain 'com.microsoft'", "Attention node attn: not supported"):
        assert any(needle in p for p in problems), (needle, problems)
    assert trt_support.check_graph(model, supported=trt_support.SUPPORTED) == [p for p in problems if "attn" not in p]
    model.opset_import[0].version = 25
    assert any("opset 25 is outside" in p for p in trt_support.check_graph(model))


@pytest.fixture(scope="module", params=["tiny", "tiny-sd2"])
def tiny_onnx(request):
    """The four sub-models of the tiny SD 1.x / SD 2.x checkpoints, exported with the project's exporter."""
    onnx = pytest.importorskip("onnx")
    engine_dir = request.getfixturevalue({"tiny": "tiny_engine_dir", "tiny-sd2": "tiny_sd2_engine_dir"}[request.param])
    return {component: onnx.load(str(engine_dir / f"{component}.onnx"), load_external_data=False)
            for component in COMPONENTS}


@pytest.mark.parametrize("component", COMPONENTS)
def test_exported_graphs_use_only_operators_tensorrt_10_parses(tiny_onnx, component):
    model = tiny_onnx[component]
    unsupported = trt_support.op_types(model) - trt_support.SUPPORTED_ANY_TRT10
    assert not unsupported, f"{component}: {sorted(unsupported)} are not parsed by TensorRT 10"
    assert trt_support.check_graph(model) == []


# How TensorRT's ONNX parser turns these node types into layers (the parser maps nodes to layers one to one before
# the builder fuses anything); enough to run the fp32 policy on the real graphs.
_ONNX_TO_LAYER = {"InstanceNormalization": "NORMALIZATION", "LayerNormalization": "NORMALIZATION",
                  "GroupNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY",
                  "Mul": "ELEMENTWISE", "Div": "ELEMENTWISE", "Add": "ELEMENTWISE", "Sub": "ELEMENTWISE",
                  "Reshape": "SHUFFLE", "Transpose": "SHUFFLE", "Cast": "CAST", "Sqrt": "UNARY", "Conv": "CONVOLUTION",
                  "Constant": "CONSTANT", "ReduceMean": "REDUCE"}


def _onnx_layers(model):
    init = {i.name for i in model.graph.initializer}
    return [LayerInfo(node.name, _ONNX_TO_LAYER.get(node.op_type, node.op_type.upper()),
                      tuple(i for i in node.input if i and i not in init), tuple(node.output), True)
            for node in model.graph.node]


def test_vae_decoder_attention_logits_path_is_found_in_the_real_graph(tiny_onnx):
    layers = _onnx_layers(tiny_onnx["vae_decoder"])
    by_name = {layer.name: layer for layer in layers}
    pinned = fp32_layer_names(layers, "vae_decoder")
    softmaxes = [layer for layer in layers if layer.type == "SOFTMAX"]
    assert softmaxes
    assert sum(by_name[name].type == "MATRIX_MULTIPLY" for name in pinned) == len(softmaxes)
    # only the logits path: no normalization (30 of them in the tiny decoder) and no convolution is pinned
    assert {by_name[name].type for name in pinned} <= {"SOFTMAX", "MATRIX_MULTIPLY", *_SCORE_PATH}
    assert sum(layer.type == "NORMALIZATION" for layer in layers) > 0
    unet = _onnx_layers(tiny_onnx["unet"])
    assert sum(layer.type == "SOFTMAX" for layer in unet) > 0 and fp32_layer_names(unet, "unet") == []


_SCORE_PATH = ("ELEMENTWISE", "SCALE", "SHUFFLE", "SQUEEZE", "UNSQUEEZE", "CAST", "UNARY")


# ---------------------------------------------------------------- without TensorRT / CuPy / a GPU

def _fake_module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _fake_tensorrt(version):
    """A module that looks like TensorRT's at import (version, Builder, Runtime, Logger) and does nothing else."""
    return _fake_module("tensorrt", __version__=version, Builder=object, Runtime=object, Logger=object)


def _manifest():
    from rtsd.export.manifest import Manifest

    return Manifest(model=SD15, shape_range=ShapeRange(), source={}, tokenizer={},
                    components={c: {"io": SPECS[c].to_dict()} for c in COMPONENTS})


def test_missing_tensorrt_is_one_line_with_the_install_hint(monkeypatch, tmp_path):
    from rtsd.engine import get_backend
    from rtsd.engine.tensorrt import TensorRTBackend
    from rtsd.export.tensorrt import build_engines, require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, installed or not
    for make in (TensorRTBackend, lambda: get_backend("tensorrt"), require_tensorrt,
                 lambda: build_engines(tmp_path, _manifest())):
        with pytest.raises(MissingDependencyError) as info:
            make()
        message = str(info.value)
        assert "'tensorrt', which is not installed" in message and "pip install 'rtsd[tensorrt]'" in message
        assert "NVIDIA GPU" in message and "\n" not in message


def test_missing_cupy_old_tensorrt_and_no_gpu_are_named(monkeypatch):
    from rtsd.engine.tensorrt import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.8.0.43"))
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(MissingDependencyError, match=r"needs 'cupy-cuda12x', which is not installed: pip install"):
        TensorRTBackend()

    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    runtime = types.SimpleNamespace(getDeviceCount=no_driver)
    monkeypatch.setitem(sys.modules, "cupy", _fake_module("cupy", cuda=types.SimpleNamespace(runtime=runtime)))
    with pytest.raises(MissingDependencyError, match=r"needs an NVIDIA GPU with a working CUDA driver .*"
                                                     r"cudaErrorInsufficientDriver.*--backend onnxruntime"):
        TensorRTBackend()

    for version in ("8.6.1", "11.4.0"):
        monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(version))
        expected = rf"needs tensorrt>=10.1,<11, this machine has TensorRT {version}: pip install 'tensorrt>=10.1,<11'$"
        with pytest.raises(MissingDependencyError, match=expected):
            TensorRTBackend()


def test_importing_the_gpu_modules_imports_neither_tensorrt_nor_cupy():
    code = ("import sys, rtsd, rtsd.engine.tensorrt, rtsd.engine.cuda, rtsd.engine.staleness, rtsd.export.tensorrt, "
            "rtsd.export.trt_support; "
            "print(sorted(m for m in ('tensorrt', 'cupy', 'cuda', 'polygraphy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------- buffers and the CUDA-graph cache policy

def test_buffers_grow_only_and_are_reused():
    buffers = GrowOnlyBuffers(np)
    a = buffers.view("sample", (2, 4, 64, 64), np.float32)
    assert buffers.allocations == 1 and a.shape == (2, 4, 64, 64) and a.dtype == np.float32
    address = data_pointer(a)
    for shape in [(2, 4, 64, 64), (1, 4, 32, 32), (2, 4, 48, 64)]:  # not larger: same memory, no allocation
        view = buffers.view("sample", shape, np.float32)
        assert data_pointer(view) == address and view.shape == shape
    assert buffers.allocations == 1 and buffers.generation == 1
    buffers.view("sample", (2, 4, 128, 128), np.float32)  # larger: one reallocation, a new generation
    assert buffers.allocations == 2 and buffers.generation == 2
    buffers.view("timestep", (2,), np.float32)
    assert buffers.allocations == 3 and buffers.nbytes % GrowOnlyBuffers.ALIGN == 0
    half = buffers.view("sample", (2, 4, 64, 64), np.float16)  # another dtype reuses the same bytes
    half[...] = 1.5
    assert buffers.allocations == 3
    assert float(buffers.view("sample", (2, 4, 64, 64), np.float16).sum()) == 1.5 * half.size


def test_graph_cache_warms_up_captures_once_then_replays_per_shape():
    stream, runs = FakeStream(), []
    cache = GraphCache(stream, warmup_calls=1)
    enqueue = lambda tag: (lambda: stream.issue(lambda: runs.append(tag)))  # noqa: E731
    modes = [cache.run((2, 64), enqueue("a")) for _ in range(4)]
    assert modes == ["plain", "captured", "replayed", "replayed"] and runs == ["a"] * 4
    assert cache.run((2, 96), enqueue("b")) == "plain" and cache.run((2, 96), enqueue("b")) == "captured"
    assert cache.captures == 2 and len(cache) == 2 and stream.launched == 4
    cache.drop((2, 64))
    assert cache.run((2, 64), enqueue("a")) == "plain" and len(cache) == 1
    cache.clear()
    assert len(cache) == 0 and cache.run((2, 96), enqueue("b")) == "plain"


def test_graph_cache_falls_back_to_plain_runs_when_capture_fails():
    stream, runs = FakeStream(fail_capture=True), []
    cache = GraphCache(stream)
    enqueue = lambda: stream.issue(lambda: runs.append(1))  # noqa: E731
    assert [cache.run("k", enqueue) for _ in range(3)] == ["plain", "plain", "plain"]
    assert len(runs) == 3 and not stream.capturing and "not permitted" in cache.failures["k"]


# ---------------------------------------------------------------- device-side arithmetic on an operator-only array

class OpArray:
    """An array offering only what CuPy arrays share with NumPy for the loop: operators, slicing, shape, dtype,
    .clip/.astype. NumPy functions and host arrays are refused, so code that passes here runs on CuPy unchanged."""

    __array_ufunc__ = None  # numpy ufuncs (np.sqrt(x), ndarray + OpArray) raise TypeError
    __slots__ = ("a",)

    def __init__(self, a):
        assert isinstance(a, np.ndarray)
        object.__setattr__(self, "a", a)

    def __array__(self, *args, **kwargs):
        raise TypeError("host conversion of a device array (np.asarray) would not work on CuPy")

    def __array_function__(self, *args, **kwargs):
        raise TypeError("a NumPy function was called on a device array")

    @staticmethod
    def _raw(other):
        if isinstance(other, OpArray):
            return other.a
        if isinstance(other, numbers.Number) and not isinstance(other, np.ndarray):
            return other
        raise TypeError(f"device arithmetic with {type(other).__name__} (a host array?)")

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)
    ndim = property(lambda self: self.a.ndim)

    def clip(self, lo, hi):
        return OpArray(self.a.clip(lo, hi))

    def astype(self, dtype):
        return OpArray(self.a.astype(dtype))

    def __getitem__(self, key):
        if not all(isinstance(k, (slice, int, type(Ellipsis))) for k in (key if isinstance(key, tuple) else (key,))):
            raise TypeError("only basic slicing is used on device arrays")
        return OpArray(self.a[key])

    def __neg__(self):
        return OpArray(-self.a)

    def __abs__(self):
        return OpArray(abs(self.a))


for _name in ("add", "sub", "mul", "truediv", "pow"):
    def _forward(self, other, op=f"__{_name}__"):
        return OpArray(getattr(self.a, op)(OpArray._raw(other)))

    def _reverse(self, other, op=f"__r{_name}__"):
        return OpArray(getattr(self.a, op)(OpArray._raw(other)))
    setattr(OpArray, f"__{_name}__", _forward)
    setattr(OpArray, f"__r{_name}__", _reverse)


def _run_loop(name, wrap, steps=8, img2img=False, prediction_type="epsilon", **options):
    """The runtime's per-step device work: scale the input, CFG-combine, step; model outputs and noise from the
    host, as the engines and the seeded generator would deliver them."""
    from rtsd import schedulers

    sched = schedulers.create(name, num_inference_steps=steps, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=prediction_type, **options)
    rng = np.random.default_rng(7)
    n, shape = 2, (2, 4, 8, 8)
    start = 0
    if img2img:
        start = len(sched.timesteps) // 2
        x = sched.add_noise(wrap(rng.standard_normal(shape, dtype=np.float32)),
                            wrap(rng.standard_normal(shape, dtype=np.float32)), start)
    else:
        x = wrap(rng.standard_normal(shape, dtype=np.float32)) * sched.init_noise_sigma
    for i in range(start, len(sched.timesteps)):
        model_in = sched.scale_model_input(x, i)
        # a deterministic stand-in for the UNet: depends on its input and the step, rows = [uncond; cond]
        eps = wrap(rng.standard_normal((2 * n,) + shape[1:], dtype=np.float32))
        uncond, cond = eps[:n, ...] + model_in * 0.1, eps[n:, ...] - model_in * 0.05
        guided = uncond + 7.5 * (cond - uncond)
        noise = wrap(rng.standard_normal(shape, dtype=np.float32)) if sched.stochastic else None
        x = sched.step(guided, i, x, noise=noise)
    return x


def _scheduler_names():
    from rtsd import schedulers

    return schedulers.available()


@pytest.mark.parametrize("name", _scheduler_names())
def test_scheduler_step_and_cfg_run_on_operator_only_arrays_and_equal_numpy(name):
    expected = _run_loop(name, lambda a: a)
    device = _run_loop(name, OpArray)
    assert isinstance(device, OpArray), f"{name}: the step returned {type(device).__name__}, not the device type"
    assert device.dtype == expected.dtype == np.float32
    np.testing.assert_array_equal(device.a, expected)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_and_v_prediction_paths_stay_on_the_device(name):
    if name not in _scheduler_names():
        pytest.skip(f"scheduler {name} is not available yet")
    for kw in ({"img2img": True}, {"prediction_type": "v_prediction"}):
        np.testing.assert_array_equal(_run_loop(name, OpArray, **kw).a, _run_loop(name, lambda a: a, **kw))


def test_operator_only_array_refuses_numpy_functions_and_host_arrays():
    x = OpArray(np.ones(3, np.float32))
    for bad in (lambda: np.sqrt(x), lambda: np.where(x.a > 0, x, x), lambda: x + np.ones(3, np.float32),
                lambda: np.asarray(x)):
        with pytest.raises(TypeError):
            bad()


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmpp_2m", "lms", "unipc"])
def test_scheduler_step_on_array_api_strict_equals_numpy(name):
    xp = pytest.importorskip("array_api_strict")
    if name not in _scheduler_names():
        pytest.skip(f"scheduler {name} is not available yet")
    # .clip (DDIM's clip_sample, on by default in diffusers, off in SD's configs) is a CuPy/NumPy method outside the
    # Array API standard: the operator-only test above covers it.
    options = {"clip_sample": False} if name == "ddim" else {}
    device = _run_loop(name, lambda a: xp.asarray(a), **options)
    np.testing.assert_array_equal(np.asarray(device), _run_loop(name, lambda a: a, **options))


# ---------------------------------------------------------------- the backend against a simulated TensorRT
#
# A stand-in for TensorRT + CuPy on the CPU: "device" buffers are NumPy memory; a context reads its inputs from and
# writes its outputs to the raw addresses bound with set_tensor_address (so a stale binding gives wrong numbers);
# work issued on a capturing stream runs only when the graph is launched, as on CUDA. The arithmetic is simple and
# known (unet: 2 * sample + timestep), the point is the backend's bookkeeping: refusal before deserializing, one shared
# activation block, buffers reused, graphs per shape, profile checks before running, the fp32 fallback.

import warnings  # noqa: E402

from rtsd.engine import tensorrt as trt_backend  # noqa: E402
from rtsd.errors import EngineDirError  # noqa: E402

SIM_RANGE = ShapeRange(min_size=64, max_size=128, opt_size=64, max_batch=2)


@pytest.fixture
def sim(monkeypatch, tmp_path):
    """A simulated TensorRT + CuPy and an engine directory whose plans name what the simulator builds."""
    return install_sim(monkeypatch, tmp_path, SD15, SIM_RANGE)


def _unet_feeds(rows, size, t=10.0, seed=0, width=None):
    rng = np.random.default_rng(seed)
    shapes = specs_for(SD15, SIM_RANGE)["unet"].shapes(rows, size, width or size)
    residuals = {name: np.zeros(shapes[name], np.float32) for name in residual_names(SD15.unet)}  # no ControlNet
    return {"sample": rng.standard_normal((rows, 4, size // 8, (width or size) // 8), dtype=np.float32),
            "timestep": np.full((rows,), t, np.float32),
            "encoder_hidden_states": rng.standard_normal((rows, 77, 768), dtype=np.float32), **residuals}


def test_sim_loads_all_engines_on_one_shared_activation_block(sim):
    backend = trt_backend.TensorRTBackend()
    engines = backend.load(sim.dir, sim.manifest, COMPONENTS)
    assert backend.host == HostInfo("10.8.0.43", "Sim GPU", "9.0") and backend.xp is sim.cp
    assert len(sim.cp.blocks) == 1 and backend.activation.size == 5000  # the largest engine's need, once
    rows = sim.manifest.spec("text_encoder").inputs[1].shape[0]  # sized by the manifest's shape range at export
    engines["text_encoder"].infer({"input_ids": np.ones((2, 77), np.int64),
                                   "extra_embeddings": np.zeros((rows, 768), np.float32)})
    engines["unet"].infer(_unet_feeds(2, 64))
    engines["vae_decoder"].to_host(engines["vae_encoder"].infer({"images": np.ones((1, 3, 64, 64), np.float32)})[
        "latent"])
    contexts = [c for e in sim.trt.deserialized for c in e.contexts]
    assert len(contexts) == 3 and {c.memory for c in contexts} == {(sim.cp.blocks[0]().ptr, 5000)}


def test_sim_unet_steps_reuse_buffers_and_replay_one_graph_per_shape(sim):
    unet = trt_backend.TensorRTBackend().load(sim.dir, sim.manifest, ("unet",))["unet"]
    engine = sim.trt.deserialized[0]
    modes, outputs = [], []
    for step in range(5):
        feeds = _unet_feeds(2, 64, t=float(step), seed=step)
        out = unet.infer(feeds)["model_output"]
        np.testing.assert_array_equal(out, 2 * feeds["sample"] + step)
        modes.append(unet.last_run)
        outputs.append(out)
        if step == 0:
            allocations = unet.allocations
    assert modes == ["plain", "captured", "replayed", "replayed", "replayed"]
    assert unet.allocations == allocations == 4 + 13  # three inputs + 13 residuals, one output: none per step
    np.testing.assert_array_equal(outputs[0], 2 * _unet_feeds(2, 64, seed=0)["sample"])  # a copy, not a view
    assert engine.launches == 2 and engine.runs == 5  # warm-up + capture enqueued; replays launch the graph
    # a second shape gets its own context and graph; a larger one regrows the buffers and recaptures
    for size in (64, 128, 128, 128, 64, 64):
        feeds = _unet_feeds(1, size, t=3.0)
        np.testing.assert_array_equal(unet.infer(feeds)["model_output"], 2 * feeds["sample"] + 3.0)
    # 128 px regrew sample, the 13 residuals and model_output (timestep and context fit): graphs were dropped and
    # recaptured
    assert len(engine.contexts) == 3 and unet.allocations == 17 + 15 and len(unet.graphs) == 2


def test_sim_evicting_a_shape_waits_for_queued_work_first(sim):
    """Past MAX_GRAPH_SHAPES the oldest shape's context and graph go; the stream is synchronized before that."""
    backend = trt_backend.TensorRTBackend()
    unet = backend.load(sim.dir, sim.manifest, ("unet",))["unet"]
    sizes = [(h, w) for h in (64, 72, 80) for w in (64, 72, 80)][: trt_backend.MAX_GRAPH_SHAPES + 1]
    for h, w in sizes[:-1]:
        unet.infer({**_unet_feeds(1, h, width=w), "sample": np.zeros((1, 4, h // 8, w // 8), np.float32)})
    syncs = backend.stream.syncs
    h, w = sizes[-1]
    feeds = {**_unet_feeds(1, h, width=w), "sample": np.ones((1, 4, h // 8, w // 8), np.float32)}
    np.testing.assert_array_equal(unet.infer(feeds)["model_output"], 2 + feeds["timestep"][0])
    assert backend.stream.syncs == syncs + 1 and len(unet._slots) == trt_backend.MAX_GRAPH_SHAPES


def test_sim_request_outside_the_profile_fails_before_running(sim):
    unet = trt_backend.TensorRTBackend().load(sim.dir, sim.manifest, ("unet",))["unet"]
    with pytest.raises(ValueError, match=r"unet: 2 rows at 192x192 px is outside .* --max-size 192"):
        unet.infer(_unet_feeds(2, 192))
    with pytest.raises(ValueError, match="--max-batch 3"):
        unet.infer(_unet_feeds(6, 64))
    with pytest.raises(TypeError, match="expected dtype float32"):
        unet.infer({**_unet_feeds(2, 64), "timestep": np.zeros(2, np.float64)})
    assert sim.trt.deserialized[0].launches == 0 and not sim.trt.deserialized[0].contexts


def test_sim_stale_or_foreign_plans_are_refused_before_deserializing(sim):
    sim.manifest.components["unet"]["engines"]["tensorrt"].update(tensorrt_version="10.3.0.26", gpu="NVIDIA A100",
                                                                 compute_capability="8.0")
    (sim.dir / "vae_encoder.plan").unlink()
    with pytest.raises(EngineDirError) as info:
        trt_backend.TensorRTBackend().load(sim.dir, sim.manifest, COMPONENTS)
    assert str(info.value) == (
        f"unet.plan was built for TensorRT 10.3.0.26 on NVIDIA A100 (sm_80); this machine has TensorRT 10.8.0.43 on "
        f"Sim GPU (sm_90): rebuild with `rtsd export --rebuild {sim.dir} --backend tensorrt` (and 1 more plan(s))")
    assert sim.trt.deserialized == []
    sim.manifest.components["unet"]["engines"]["tensorrt"].update(tensorrt_version="10.8.0.43", gpu="Sim GPU",
                                                                 compute_capability="9.0")
    (sim.dir / "unet.plan").write_text("unet:corrupt")
    with pytest.raises(EngineDirError, match="could not load unet.plan .* rebuild with"):
        trt_backend.TensorRTBackend().load(sim.dir, sim.manifest, ("unet",))


def test_sim_non_finite_vae_output_switches_to_the_fp32_plan(sim):
    backend = trt_backend.TensorRTBackend()
    vae = backend.load(sim.dir, sim.manifest, ("vae_decoder",))["vae_decoder"]
    latent = np.full((1, 4, 8, 8), 0.25, np.float32)
    with pytest.warns(RuntimeWarning, match="switching to vae_decoder.fp32.plan"):
        images = vae.infer({"latent": latent})["images"]
    assert images.shape == (1, 3, 64, 64) and np.all(images == 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(vae.infer({"latent": latent})["images"] == 0.25)  # stays on the fp32 plan, no new warning
    del sim.manifest.components["vae_decoder"]["engines"]["tensorrt"]["fallback"]
    vae = trt_backend.TensorRTBackend().load(sim.dir, sim.manifest, ("vae_decoder",))["vae_decoder"]
    with pytest.raises(trt_backend.NonFiniteOutputError, match=r"vae_decoder \(fp16\) produced non-finite .*fp32-vae"):
        vae.infer({"latent": latent})


@pytest.mark.parametrize("request_index", range(len(LOOP_REQUESTS)))
def test_sim_runtime_loop_through_the_backend_equals_the_host_loop(monkeypatch, tmp_path, request_index):
    """Runtime.generate through TensorRTBackend (buffers, addresses, graphs, the device-side step) gives exactly what
    the same stand-in functions give when called directly in a NumPy loop."""
    cp = SimCupy()
    trt = SimTensorRT(SD15, SIM_RANGE, compute=MODEL_LIKE, cupy=cp)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda purpose: trt)
    monkeypatch.setattr(trt_backend, "cuda_device", lambda purpose, device=0: (cp, "Sim GPU", "9.0"))
    write_sim_engine_dir(tmp_path, SD15, SIM_RANGE, "Sim GPU", "9.0", overflow=())
    device = Runtime(tmp_path, backend=trt_backend.TensorRTBackend())
    host = Runtime(tmp_path, backend=HostStandIn(SD15))
    request = LOOP_REQUESTS[request_index]
    assert_device_equals_host(device, host, request)
    unet = device.engines["unet"]
    allocations = unet.allocations
    generate_with_latents(device, np.asarray, **request)  # the same request again: nothing allocated, graph replayed
    assert unet.allocations == allocations and unet.last_run == "replayed" and unet.graphs.captures == 1
