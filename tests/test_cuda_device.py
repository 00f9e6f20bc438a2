"""Device-side checks: run only where CuPy and a CUDA GPU are present (TensorRT ones also need TensorRT 10).

    pytest -m gpu tests/test_cuda_device.py

Without a GPU every test here is skipped with the reason; the CPU-side logic is covered by test_tensorrt_cpu.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from rtsd.engine.cuda import EventTimer, GraphCache, GrowOnlyBuffers, data_pointer
from rtsd.export.specs import COMPONENTS, ShapeRange

pytestmark = pytest.mark.gpu


def _cupy_or_skip():
    try:
        import cupy
    except ImportError:
        pytest.skip("CuPy is not installed (pip install 'rtsd[tensorrt]')")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver
        pytest.skip(f"no usable CUDA device: {type(exc).__name__}: {exc}")
    if count == 0:
        pytest.skip("no CUDA device")
    return cupy


@pytest.fixture(scope="module")
def cp():
    return _cupy_or_skip()


def _loop(name, xp, steps=10, guidance=7.5):
    """The runtime's per-step device work for one scheduler: scale, CFG combine, step; host-made noise and
    stand-in model outputs, identical for both array modules."""
    from rtsd import schedulers

    sched = schedulers.create(name, num_inference_steps=steps, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    rng = np.random.default_rng(3)
    n, shape = 2, (2, 4, 32, 32)
    x = xp.asarray(rng.standard_normal(shape, dtype=np.float32)) * sched.init_noise_sigma
    for i in range(len(sched.timesteps)):
        model_in = sched.scale_model_input(x, i)
        out = xp.asarray(rng.standard_normal((2 * n,) + shape[1:], dtype=np.float32))
        uncond, cond = out[:n] + 0.1 * model_in, out[n:] - 0.05 * model_in
        guided = uncond + guidance * (cond - uncond)
        noise = xp.asarray(rng.standard_normal(shape, dtype=np.float32)) if sched.stochastic else None
        x = sched.step(guided, i, x, noise=noise)
    return x


def _names():
    from rtsd import schedulers

    return schedulers.available()


@pytest.mark.parametrize("name", _names())
def test_cfg_and_scheduler_step_on_cupy_equal_numpy(cp, name):
    device = _loop(name, cp)
    assert isinstance(device, cp.ndarray) and device.dtype == cp.float32
    host = _loop(name, np)
    rel = np.linalg.norm(cp.asnumpy(device) - host) / np.linalg.norm(host)
    assert rel < 1e-6, f"{name}: relative error {rel:.2e}"


def test_buffers_are_reused_across_calls(cp):
    buffers = GrowOnlyBuffers(cp)
    pointers = set()
    for step in range(20):
        view = buffers.view("sample", (2, 4, 64, 64), np.float32)
        view[...] = step
        pointers.add(data_pointer(view))
    assert buffers.allocations == 1 and len(pointers) == 1
    assert float(buffers.view("sample", (1, 4, 32, 32), np.float32)[0, 0, 0, 0]) == 19.0


def test_cuda_graph_replay_equals_the_plain_call(cp):
    stream = cp.cuda.Stream(non_blocking=True)
    a = cp.zeros((256, 256), cp.float32)
    b = cp.zeros((256, 256), cp.float32)
    tmp, out = cp.empty_like(a), cp.empty_like(a)

    def enqueue():  # in-place work on fixed buffers: no allocation while capturing
        cp.multiply(a, 2.0, out=tmp)
        cp.add(tmp, b, out=out)
        cp.sqrt(cp.abs(out, out=out), out=out)

    cache = GraphCache(stream)
    rng = np.random.default_rng(0)
    with stream:
        for expected_mode in ("plain", "captured", "replayed", "replayed"):
            a.set(rng.standard_normal((256, 256), dtype=np.float32), stream=stream)
            b.set(rng.standard_normal((256, 256), dtype=np.float32), stream=stream)
            assert cache.run("k", enqueue) == expected_mode
            got = out.get(stream=stream)
            enqueue()  # the plain call on the same inputs
            np.testing.assert_array_equal(got, out.get(stream=stream))
    assert cache.captures == 1 and cache.replays == 2 and not cache.failures


def test_event_timer_measures_device_time(cp):
    stream = cp.cuda.Stream(non_blocking=True)
    timer = EventTimer(cp, stream)
    x = cp.ones((1024, 1024), cp.float32)
    with stream:
        with timer.section("matmul"):
            for _ in range(3):
                x = x @ x / 1024
    assert timer.milliseconds()["matmul"] > 0


# ---------------------------------------------------------------- TensorRT (build + run a tiny engine directory)

@pytest.fixture(scope="module")
def tiny_trt_dir(cp, tmp_path_factory):
    pytest.importorskip("tensorrt", reason="TensorRT 10 is not installed (pip install 'rtsd[tensorrt]')")
    pytest.importorskip("torch")
    from rtsd.export.manifest import Manifest
    from rtsd.export.pipeline import export
    from rtsd.export.tensorrt import build_engines
    from rtsd.models.synthetic import write_checkpoint

    work = tmp_path_factory.mktemp("tiny_trt")
    checkpoint = write_checkpoint(work / "tiny.safetensors", "tiny")
    out = export(checkpoint, work / "engines", shape_range=ShapeRange(min_size=64, max_size=256, opt_size=128,
                                                                       max_batch=2), progress=None)
    build_engines(out, Manifest.read(out), optimization_level=2)
    return out


@pytest.mark.tensorrt
def test_tensorrt_engines_match_onnx_runtime_and_replay_graphs(tiny_trt_dir, cp):
    from rtsd.engine.onnxruntime import OnnxRuntimeBackend
    from rtsd.engine.tensorrt import TensorRTBackend
    from rtsd.export.manifest import Manifest

    manifest = Manifest.read(tiny_trt_dir)
    backend = TensorRTBackend()
    trt_engines = backend.load(tiny_trt_dir, manifest, COMPONENTS)
    ort_engines = OnnxRuntimeBackend().load(tiny_trt_dir, manifest, COMPONENTS)
    for component in COMPONENTS:
        spec = manifest.spec(component)
        for rows, size in ((spec.batch_factor, 128), (1, 64), (2 * spec.batch_factor, 256)):
            feeds = spec.sample_inputs(rows, size, size, seed=rows)
            expected = ort_engines[component].infer(feeds)
            for run in range(3):  # plain, captured, replayed for the UNet
                got = trt_engines[component].infer({k: cp.asarray(v) for k, v in feeds.items()})
                for name, ref in expected.items():
                    value = cp.asnumpy(got[name]).ravel().astype(np.float64)
                    cosine = value @ ref.ravel() / (np.linalg.norm(value) * np.linalg.norm(ref) + 1e-30)
                    assert cosine > 0.999, (component, rows, size, run, cosine)
    unet = trt_engines["unet"]
    assert unet.graphs.captures >= 1 and unet.last_run == "replayed", unet.graphs.failures
    # one activation block for all four engines, sized to the largest need
    assert backend.activation.size == max(e.activation_bytes for e in trt_engines.values())


@pytest.mark.tensorrt
def test_tensorrt_refuses_a_plan_built_elsewhere(tiny_trt_dir, cp):
    from rtsd.engine.tensorrt import TensorRTBackend
    from rtsd.errors import EngineDirError
    from rtsd.export.manifest import Manifest

    manifest = Manifest.read(tiny_trt_dir)
    manifest.components["unet"]["engines"]["tensorrt"]["tensorrt_version"] = "9.0.0"
    with pytest.raises(EngineDirError, match="rebuild with `rtsd export --rebuild"):
        TensorRTBackend().load(tiny_trt_dir, manifest, COMPONENTS)
