"""The TensorRT backend against the strict stand-in: activation-memory growth under out-of-memory (issue 17, defect
1), capture mode and error clearing, a ``tensorrt`` module that is not TensorRT, and one test per stand-in rule
(R1..R9 in tests/tensorrt_sim.py) showing that a wrong call fails."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import weakref

import numpy as np
import pytest

from rtsd.config import ModelConfig
from rtsd.control_layout import residual_names
from rtsd.engine import tensorrt as trt_backend
from rtsd.engine.cuda import THREAD_LOCAL_CAPTURE, GraphCache
from rtsd.errors import EngineDirError, MissingDependencyError
from rtsd.export.specs import COMPONENTS, ShapeRange, specs_for
from tests.tensorrt_sim import (FakeStream, SimCupy, SimEngine, SimTensorRTError,
                                cpu_launcher, install_sim, BOOKKEEPING)

SD15 = ModelConfig("sd1")
SIM_RANGE = ShapeRange(min_size=64, max_size=128, opt_size=64, max_batch=2)


@pytest.fixture
def sim(monkeypatch, tmp_path):
    return install_sim(monkeypatch, tmp_path, SD15, SIM_RANGE)


def _unet_feeds(rows=2, size=64, t=10.0, seed=0):
    rng = np.random.default_rng(seed)
    shapes = specs_for(ModelConfig("sd1"))["unet"].shapes(rows, size, size)
    return {"sample": rng.standard_normal((rows, 4, size // 8, size // 8), dtype=np.float32),
            "timestep": np.full((rows,), t, np.float32),
            "encoder_hidden_states": rng.standard_normal((rows, 77, 768), dtype=np.float32),
            **{name: np.zeros(shapes[name], np.float32) for name in residual_names(ModelConfig("sd1").unet)}}


def _check_unet(unet, seed):
    feeds = _unet_feeds(seed=seed)
    np.testing.assert_array_equal(unet.infer(feeds)["model_output"], 2 * feeds["sample"] + 10.0)
    return unet.last_run


# ---------------------------------------------------------------- defect 1: growth that runs out of memory

def test_activation_growth_out_of_memory_keeps_the_old_block_and_the_graphs(sim):
    """The fp32 VAE fallback needs a larger activation block (R4). When that allocation fails, the engines already
    loaded keep running on the old, still-live block (the UNet's captured graph included), the failing call is one
    line, and once memory is available the growth succeeds and re-points every context."""
    backend = trt_backend.TensorRTBackend()
    engines = backend.load(sim.dir, sim.manifest, ("unet", "vae_decoder"))
    unet, vae = engines["unet"], engines["vae_decoder"]
    assert [_check_unet(unet, seed) for seed in range(3)] == ["plain", "captured", "replayed"]
    activation = backend.activation
    old_ptr, old_size, old_generation = activation._block.ptr, activation.size, activation.generation
    old_block = weakref.ref(activation._block)
    assert old_size == 5000  # the UNet's need; the fp16 decoder needs 3000
    latent = {"latent": np.full((1, 4, 8, 8), 0.25, np.float32)}

    sim.cp.out_of_memory = True
    with pytest.warns(RuntimeWarning, match="switching to vae_decoder.fp32.plan"), \
            pytest.raises(trt_backend.ActivationMemoryError) as info:
        vae.infer(latent)  # the fp16 plan overflows; its fp32 fallback needs 12000 bytes
    message = str(info.value)
    assert message == ("TensorRT activation memory could not grow to 12000 bytes (SimOutOfMemoryError; keeping the "
                       "current 5000 bytes): free GPU memory, or re-export with smaller --max-size/--max-batch")
    assert (backend.activation.size, backend.activation.generation) == (old_size, old_generation)
    assert old_block() is not None and sim.cp.live[old_ptr] == old_size  # the old block was not released
    assert {c.memory for e in sim.trt.deserialized for c in e.contexts} == {(old_ptr, old_size)}
    # the next generation works on the old block: the graph captured at its address replays (R1 checks liveness)
    assert [_check_unet(unet, seed) for seed in range(3, 5)] == ["replayed", "replayed"]

    sim.cp.out_of_memory = False
    with pytest.warns(RuntimeWarning, match="switching"):
        assert np.all(vae.infer(latent)["images"] == 0.25)  # the fp32 plan, on a grown block
    assert backend.activation.size == 12000 and backend.activation.generation == old_generation + 1
    assert old_block() is None  # released after every context was re-pointed
    new_ptr = backend.activation._block.ptr
    assert {c.memory for e in sim.trt.deserialized for c in e.contexts} == {(new_ptr, 12000)}
    # the UNet's graph baked in the old address: dropped and recaptured, never replayed on freed memory
    assert [_check_unet(unet, seed) for seed in range(5, 8)] == ["plain", "captured", "replayed"]


def test_graph_cache_clear_forgets_failed_captures():
    stream, runs = FakeStream(fail_capture=True), []
    cache = GraphCache(stream)
    enqueue = lambda: stream.issue(lambda: runs.append(1))  # noqa: E731
    assert [cache.run("k", enqueue) for _ in range(3)] == ["plain"] * 3 and "k" in cache.failures
    cache.clear()  # addresses changed: the shape gets another chance
    stream.fail_capture = False
    assert not cache.failures and [cache.run("k", enqueue) for _ in range(3)] == ["plain", "captured", "replayed"]
    assert len(runs) == 6


# ---------------------------------------------------------------- capture mode and the pending error

def test_capture_is_thread_local_and_a_failed_capture_clears_the_pending_error():
    stream, events = FakeStream(fail_capture=True), []
    cache = GraphCache(stream, clear_error=lambda: events.append("clear"))
    enqueue = lambda: stream.issue(lambda: events.append("run"))  # noqa: E731
    assert [cache.run("k", enqueue) for _ in range(2)] == ["plain", "plain"]
    assert stream.capture_modes == [THREAD_LOCAL_CAPTURE] == [1]  # cudaStreamCaptureModeThreadLocal
    assert events == ["run", "clear", "run"]  # cleared before the plain rerun, once


def test_backend_graph_cache_gets_the_cuda_error_clearer(sim):
    backend = trt_backend.TensorRTBackend()
    unet = backend.load(sim.dir, sim.manifest, ("unet",))["unet"]
    assert unet.graphs.clear_error is backend.clear_cuda_error


# ---------------------------------------------------------------- a tensorrt module that is not TensorRT

def _namespace_tensorrt():
    """What ``import tensorrt`` gives with only tensorrt-stubs installed: a namespace package, nothing in it."""
    module = types.ModuleType("tensorrt")
    module.__path__ = ["/site-packages/tensorrt"]
    return module


@pytest.mark.parametrize("module", [_namespace_tensorrt(),
                                    types.SimpleNamespace(__version__="10.8.0", __file__="/x/tensorrt.py")])
def test_a_tensorrt_module_without_version_or_builder_is_not_installed(monkeypatch, module):
    from rtsd.export.tensorrt import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", module)
    with pytest.raises(MissingDependencyError) as info:
        require_tensorrt()
    message = str(info.value)
    assert "needs 'tensorrt', which is not installed ('import tensorrt' found /" in message
    assert "which is not TensorRT (only its type stubs?)" in message and "pip install 'rtsd[tensorrt]'" in message
    assert "\n" not in message


def test_cli_export_with_only_the_stubs_exits_2_with_one_line(monkeypatch, tmp_path, capsys):
    from rtsd.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", _namespace_tensorrt())
    code = main(["export", "--checkpoint", str(tmp_path / "missing.safetensors"), "--output", str(tmp_path / "out"),
                 "--backend", "tensorrt"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs 'tensorrt', which is not installed" in err
    assert not (tmp_path / "out").exists()


def test_the_installed_stubs_if_any_are_refused_like_a_missing_tensorrt():
    """Where tensorrt-stubs is installed (CI installs it for the type check), the real namespace package is refused
    in a fresh interpreter; where a real TensorRT is installed, its version is accepted instead."""
    spec = importlib.util.find_spec("tensorrt")
    code = ("import sys\nfrom rtsd.export.tensorrt import require_tensorrt\n"
            "from rtsd.errors import MissingDependencyError\n"
            "try:\n    require_tensorrt()\nexcept MissingDependencyError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if spec is None:
        assert "needs 'tensorrt', which is not installed: pip install" in out.stdout, out.stdout + out.stderr
    elif spec.origin is None:  # a namespace package: the stubs
        assert "which is not TensorRT (only its type stubs?)" in out.stdout, out.stdout + out.stderr
    else:
        assert "which is not TensorRT" not in out.stdout


# ---------------------------------------------------------------- the stand-in's rules: a wrong call fails

def _engine(name="unet", **kw):
    cp = SimCupy()
    return SimEngine(name, specs_for(SD15)[name], SIM_RANGE, BOOKKEEPING[name], cpu_launcher(), cupy=cp, **kw), cp


def test_r1_device_memory_alignment_size_and_liveness():
    engine, cp = _engine()
    context = engine.create_execution_context("USER_MANAGED")
    block = cp.cuda.alloc(5000)
    context.set_device_memory(block.ptr, 5000)
    for ptr, size, needle in ((block.ptr + 8, 5000, "not 256-byte aligned"), (block.ptr, 4864, "the engine needs"),
                              (block.ptr + 256, 5000, "not a live block")):
        with pytest.raises(SimTensorRTError, match=needle):
            context.set_device_memory(ptr, size)
    ptr = block.ptr
    del block  # freed
    with pytest.raises(SimTensorRTError, match="not a live block"):
        context.set_device_memory(ptr, 5000)


def test_r2_tensor_addresses_refuse_unknown_names_and_misalignment(sim, monkeypatch):
    engine, cp = _engine()
    context = engine.create_execution_context("USER_MANAGED")
    assert context.set_tensor_address("sample", 4096) is True
    assert context.set_tensor_address("latent", 4096) is False  # not a tensor of the UNet
    assert context.set_tensor_address("sample", 4096 + 64) is False
    unet = trt_backend.TensorRTBackend().load(sim.dir, sim.manifest, ("unet",))["unet"]
    monkeypatch.setattr(trt_backend, "data_pointer", lambda array: array.ctypes.data + 16)
    with pytest.raises(RuntimeError, match="TensorRT rejected the address of"):
        unet.infer(_unet_feeds())


def test_r3_input_shapes_refuse_unknown_names_outputs_and_out_of_profile():
    engine, _ = _engine()
    context = engine.create_execution_context("USER_MANAGED")
    assert context.set_input_shape("sample", (2, 4, 8, 8)) is True
    assert context.set_input_shape("model_output", (2, 4, 8, 8)) is False
    assert context.set_input_shape("nope", (2,)) is False
    assert context.set_input_shape("sample", (2, 4, 8)) is False
    assert context.set_input_shape("sample", (2, 4, 64, 64)) is False
    with pytest.raises(SimTensorRTError, match="no tensor named"):
        context.get_tensor_shape("nope")


def test_r4_an_fp32_plan_needs_more_activation_memory_than_its_fp16_twin():
    fp16, _ = _engine("vae_decoder")
    fp32, _ = _engine("vae_decoder", precision="fp32")
    unet, _ = _engine("unet")
    assert fp32.device_memory_size_v2 > unet.device_memory_size_v2 > fp16.device_memory_size_v2


def test_r5_capturing_the_first_run_at_new_shapes_fails_and_runs_plainly(sim):
    unet = trt_backend.TensorRTBackend().load(sim.dir, sim.manifest, ("unet",))["unet"]
    unet.graphs.warmup_calls = 0  # wrong: capture without the warm-up run TensorRT needs
    assert _check_unet(unet, 0) == "plain"
    (failure,) = unet.graphs.failures.values()
    assert "cudaErrorStreamCaptureInvalidated" in failure and "deferred updates" in failure
    assert _check_unet(unet, 1) == "plain"  # the shape stays uncaptured (until addresses change)
    unet.graphs.clear()
    assert [_check_unet(unet, seed) for seed in (2, 3)] == ["captured", "replayed"]  # flushed now: captures


def test_r6_a_failing_execute_is_one_error(sim):
    unet = trt_backend.TensorRTBackend().load(sim.dir, sim.manifest, ("unet",))["unet"]
    sim.trt.deserialized[0].fail_execute = True
    with pytest.raises(RuntimeError, match=r"^unet: TensorRT execute_async_v3 failed"):
        unet.infer(_unet_feeds())


@pytest.mark.parametrize("kind,dtype", [("bf16io", "BF16"), ("fp8io", "FP8")])
def test_r7_plans_with_io_types_numpy_cannot_hold_are_refused(sim, kind, dtype):
    (sim.dir / "unet.plan").write_text(f"unet:{kind}")
    with pytest.raises(TypeError, match="Could not resolve TensorRT datatype"):
        sim.trt.nptype(dtype)
    with pytest.raises(EngineDirError) as info:
        trt_backend.TensorRTBackend().load(sim.dir, sim.manifest, ("unet",))
    assert str(info.value) == (f"unet.plan has I/O tensors of type ['{dtype}'], which NumPy/CuPy cannot hold: "
                               f"rebuild with `rtsd export --rebuild {sim.dir} --backend tensorrt`")


def test_r8_capture_needs_a_mode_and_cannot_nest():
    stream = FakeStream()
    with pytest.raises(TypeError):
        stream.begin_capture()  # no mode: refused (trtexec captures thread-local; so does rtsd)
    stream.begin_capture(mode=THREAD_LOCAL_CAPTURE)
    with pytest.raises(RuntimeError, match="already capturing"):
        stream.begin_capture(mode=THREAD_LOCAL_CAPTURE)
    stream.end_capture()
    with pytest.raises(RuntimeError, match="not capturing"):
        stream.end_capture()


def test_sim_covers_every_component():
    assert set(SimEngine.ACTIVATION_BYTES) == set(COMPONENTS) | {"controlnet"}  # controlnet.NAME components
