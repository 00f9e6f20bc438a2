"""Device-side checks: run only where CuPy and a CUDA GPU are present (TensorRT ones also need TensorRT 10).

    pytest -m gpu tests/test_cuda_device.py

Without a GPU every test here is skipped with the reason; the CPU-side logic is covered by test_tensorrt_cpu.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from rtsd.engine.cuda import EventTimer, GraphCache, GrowOnlyBuffers, data_pointer
from rtsd.config import ModelConfig
from rtsd.export.specs import COMPONENTS, ShapeRange
from tests.optional import require
from tests.tensorrt_sim import (LOOP_REQUESTS, MODEL_LIKE, HostStandIn, SimEngine, SimTensorRT, cuda_launcher, generate_with_latents,
                                 write_sim_engine_dir)

pytestmark = pytest.mark.gpu
SD15 = ModelConfig("sd1")
SIM_RANGE = ShapeRange(min_size=64, max_size=128, opt_size=64, max_batch=2)


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


def _fused_loop(name, xp, steps=10, guidance=7.5):
    """The loop of ``_loop`` with the CFG combine + step as the runtime runs it on CuPy: one fused kernel."""
    from rtsd import schedulers
    from rtsd.engine.fused_step import FusedStep, plain_step

    sched = schedulers.create(name, num_inference_steps=steps, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    step = FusedStep(sched, xp) if xp is not np else (lambda *a: plain_step(sched, *a))
    rng = np.random.default_rng(3)
    n, shape = 2, (2, 4, 32, 32)
    x = xp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(sched.init_noise_sigma))
    for i in range(len(sched.timesteps)):
        model_in = sched.scale_model_input(x, i)
        out = xp.asarray(rng.standard_normal((2 * n,) + shape[1:], dtype=np.float32))
        out = xp.concatenate([out[:n] + 0.1 * model_in, out[n:] - 0.05 * model_in])
        noise = xp.asarray(rng.standard_normal(shape, dtype=np.float32)) if sched.stochastic else None
        x = step(out[:n], out[n:], guidance, i, x, noise)
    return x, step


@pytest.mark.parametrize("name", _names())
def test_fused_step_on_cupy_equals_numpy(cp, name):
    """The fused CFG + step kernel (rtsd/engine/fused_step.py) on the GPU: every step fused, same result as NumPy."""
    device, step = _fused_loop(name, cp)
    assert isinstance(device, cp.ndarray) and device.dtype == cp.float32
    assert step.fused_steps == len(step.sampler.timesteps), f"{name}: a step fell back to the plain path"
    host, _ = _fused_loop(name, np)
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
    """The timer reports the device time of the work queued in a section: at least what the arithmetic needs at a
    peak no GPU reaches (1 PFLOP/s fp32), at most the host's wall time until that work is done, proportional to the
    work, and summed over sections of the same label."""
    import time

    n = 4096
    flops_per_matmul = 2 * n**3
    stream = cp.cuda.Stream(non_blocking=True)
    timer = EventTimer(cp, stream)
    x = cp.ones((n, n), cp.float32) / n
    with stream:
        x @ x  # warm-up: cuBLAS handle and kernel selection outside the timed sections
        stream.synchronize()
        started = time.perf_counter()
        with timer.section("one"):
            x @ x
        for _ in range(2):
            with timer.section("eight"):
                for _ in range(4):
                    x @ x
        stream.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3
    ms = timer.milliseconds()
    assert set(ms) == {"one", "eight"}
    assert flops_per_matmul / 1e15 * 1e3 <= ms["one"], ms  # device time, not the microseconds of enqueueing
    assert 8 * flops_per_matmul / 1e15 * 1e3 <= ms["eight"] and ms["one"] + ms["eight"] <= wall_ms, (ms, wall_ms)
    assert 4 < ms["eight"] / ms["one"] < 16, ms  # 8x the work; both sections of "eight" are counted


# ---------------------------------------------------------------- the runtime loop on the GPU through TensorRTBackend
# TensorRT's own execution is replaced by the stand-in of tests/tensorrt_sim.py launched as CuPy kernels on the
# backend's real stream; everything else is rtsd's real device path: CuPy buffers and addresses, the shared activation
# block, real CUDA-graph capture and replay of the UNet call, CFG and the scheduler step on CuPy arrays.

@pytest.mark.parametrize("request_index", range(len(LOOP_REQUESTS)))
def test_runtime_loop_on_the_gpu_equals_the_host_loop(cp, monkeypatch, tmp_path, request_index):
    from rtsd.engine import tensorrt as trt_backend
    from rtsd.engine.cuda import cuda_device
    from rtsd.runtime import Runtime

    trt = SimTensorRT(SD15, SIM_RANGE, compute=MODEL_LIKE, launch=cuda_launcher(cp))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda purpose: trt)
    _, gpu, capability = cuda_device("test")
    write_sim_engine_dir(tmp_path, SD15, SIM_RANGE, gpu, capability, overflow=())
    device = Runtime(tmp_path, backend=trt_backend.TensorRTBackend())
    host = Runtime(tmp_path, backend=HostStandIn(SD15))
    request = LOOP_REQUESTS[request_index]
    latents, images, kind = generate_with_latents(device, cp.asnumpy, **request)
    expected, expected_images, _ = generate_with_latents(host, np.asarray, **request)
    rel = np.linalg.norm(latents - expected) / np.linalg.norm(expected)
    worst = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(images, expected_images))
    unet = device.engines["unet"]
    allocations, pool = unet.allocations, cp.get_default_memory_pool().total_bytes()
    generate_with_latents(device, cp.asnumpy, **request)  # again: no buffer allocated, the UNet graph replayed
    print(f"\n[{request['scheduler']} {request['height']}x{request['width']}] final latents rel {rel:.2e}, image max "
          f"diff {worst}/255, UNet runs {unet.graphs.captures} capture(s) {unet.graphs.replays} replays, "
          f"{unet.allocations} buffer allocations, pool {pool} -> {cp.get_default_memory_pool().total_bytes()} B")
    assert kind is cp.ndarray  # the latents the loop hands the callback live on the device
    assert rel < 1e-5 and worst <= 1
    assert unet.allocations == allocations and unet.last_run == "replayed" and unet.graphs.captures == 1
    assert not unet.graphs.failures
    assert device.engines["unet"]._backend.activation.size == max(SimEngine.ACTIVATION_BYTES.values())


# ---------------------------------------------------------------- the fp16 reference on CUDA (the GPU oracle)

@pytest.fixture(scope="module")
def cuda_torch():
    torch = require("torch")  # CI installs torch; only the CUDA device may be missing
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device here")
    return torch


@pytest.mark.parametrize("preset", ["tiny", "sd15"])
def test_fp16_reference_on_cuda_meets_the_fp16_thresholds(cuda_torch, preset, tmp_path_factory, monkeypatch):
    """DESIGN.md's fp16 thresholds hold for an fp16 implementation of these very models: the reference in fp16 on
    CUDA vs the reference in fp32 (TF32 off), per sub-model (cosine) and end to end (image PSNR, same latents)."""
    import os

    from rtsd.engine.torch import TorchBackend
    from tests.metrics import FP16_END_TO_END_DB, FP16_MIN_COSINE, cosine, psnr, rel_l2
    from rtsd.models import load_checkpoint
    from rtsd.models.synthetic import write_checkpoint
    from rtsd.runtime import Runtime

    torch = cuda_torch
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # a true fp32 reference; restored afterwards
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    given = os.environ.get("RTSD_SD15_CHECKPOINT") if preset == "sd15" else None
    checkpoint = given or write_checkpoint(tmp_path_factory.mktemp(preset) / "model.safetensors", preset)
    full = load_checkpoint(checkpoint, dtype=torch.float32, device="cuda")
    half = load_checkpoint(checkpoint, dtype=torch.float16, device="cuda")
    size = 256 if preset == "sd15" else 128
    engines = {"fp32": TorchBackend(full).load(), "fp16": TorchBackend(half).load()}
    lines = []
    for component, reference in engines["fp32"].items():
        feeds = reference.spec.sample_inputs(2 * reference.spec.batch_factor, size, size, seed=1)
        want = reference.to_host(next(iter(reference.infer(feeds).values())))
        got = engines["fp16"][component].to_host(next(iter(engines["fp16"][component].infer(feeds).values())))
        similarity = cosine(got, want)
        lines.append(f"{component} cosine {similarity:.6f} rel {rel_l2(got, want):.2e}")
        assert np.isfinite(got).all() and similarity > FP16_MIN_COSINE, (component, similarity)
    request = dict(prompt="a lighthouse on a cliff at dusk", negative_prompt="blurry", steps=10, height=size,
                   width=size, seed=7, scheduler="dpmpp_2m")
    images = {name: np.asarray(Runtime.from_reference(models).generate(**request).images[0], np.float32) / 255
              for name, models in (("fp32", full), ("fp16", half))}
    db = psnr(images["fp16"], images["fp32"])
    print(f"\n[{preset} fp16 on CUDA vs fp32] " + "; ".join(lines) + f"; end to end {db:.1f} dB")
    assert db > FP16_END_TO_END_DB


# ---------------------------------------------------------------- TensorRT (build + run a tiny engine directory)

@pytest.fixture(scope="module")
def tiny_trt_dir(cp, tmp_path_factory):
    pytest.importorskip("tensorrt", reason="TensorRT 10 is not installed (pip install 'rtsd[tensorrt]')")
    require("torch")
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
