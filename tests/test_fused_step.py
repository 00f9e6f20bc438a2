"""The fused device step: CFG combine + scheduler step traced into one elementwise kernel (rtsd/engine/fused_step.py).

On the CPU the kernel body rtsd generates is compiled by the C compiler (tests/c_elementwise.py) and run over NumPy
memory, so these tests check the exact text a GPU would compile, against the NumPy loop, for every scheduler. The
GPU run of the same kernels is tests/test_cuda_device.py (skips without CUDA).
"""

from __future__ import annotations

import numpy as np
import pytest

from rtsd.engine.fused_step import FusedStep, Untraceable, _Kernels, device_step, kernel_body, plain_step
from rtsd.schedulers import available, create, scheduler_class
from tests.c_elementwise import CompiledCPU, compiler
from tests.optional import IN_CI

SHAPE = (2, 4, 8, 8)
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
# Options that change which arithmetic the step does (its branches), per algorithm, on top of every prediction type.
VARIANTS = {
    "ddim": [{}, {"clip_sample": True}, {"eta": 0.7}],
    "ddpm": [{}, {"clip_sample": True}],
    "pndm": [{"skip_prk_steps": True}],
    "lms": [{}, {"use_karras_sigmas": True}],
    "euler": [{}, {"use_karras_sigmas": True}],
    "euler_a": [{}],
    "heun": [{}, {"clip_sample": True}],
    "dpmpp_2m": [{}, {"solver_order": 1}, {"solver_type": "heun"}, {"use_karras_sigmas": True, "euler_at_final": True}],
    "dpmpp_2m_sde": [{}, {"solver_type": "heun"}],
    "unipc": [{}, {"solver_order": 3}, {"solver_type": "bh1", "disable_corrector": [0, 1]}],
    "lcm": [{}, {"clip_sample": True}],
}
STEPS = 9

if compiler() is None:
    if IN_CI:
        raise RuntimeError("tests/test_fused_step.py needs a C compiler (cc or gcc); CI machines have one")
    pytest.skip("no C compiler to build the kernel bodies", allow_module_level=True)


def _cases():
    for name in available():
        for prediction_type in scheduler_class(name).prediction_types:
            for options in VARIANTS[name]:
                yield pytest.param(name, {**SD, **options, "prediction_type": prediction_type},
                                   id=f"{name}-{prediction_type}-{'-'.join(map(str, options.values())) or 'default'}")


def _model(x: np.ndarray, t: float, k: int) -> np.ndarray:
    """A deterministic 'UNet' whose output depends on its input and the timestep (as a real one does)."""
    return (np.tanh(x * 0.5 + np.float32(t / 1000)) * np.float32(1 + 0.1 * k)).astype(np.float32)


def _loop(name, options, stepper_for, guidance=7.5, steps=STEPS, seed=0):
    sampler = create(name, steps, **options)
    step = stepper_for(sampler)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(sampler.init_noise_sigma)).astype(np.float32)
    for i in range(len(sampler.timesteps)):
        t = float(sampler.timesteps[i])
        model_in = sampler.scale_model_input(x, i)
        out = np.concatenate([_model(model_in, t, 0), _model(model_in, t, 1)])  # one buffer, as the UNet's output
        noise = rng.standard_normal(SHAPE, dtype=np.float32) if sampler.stochastic else None
        uncond, cond = (out[:2], out[2:]) if guidance > 1 else (out[:2], None)
        x = step(uncond, cond, guidance, i, x, noise)
        out[...] = np.nan  # the engine overwrites its output buffer on the next call: nothing may keep a view of it
    return x, step


def _plain(sampler):
    return lambda u, c, g, i, x, noise: plain_step(sampler, u, c, g, i, np.ascontiguousarray(x), noise)


@pytest.mark.parametrize("name,options", list(_cases()))
def test_fused_step_equals_the_numpy_step(name, options):
    kernels = _Kernels()
    expected, _ = _loop(name, options, lambda s: (lambda u, c, g, i, x, noise: plain_step(s, u, c.copy() if c is not None else None, g, i, x, noise)))
    got, fused = _loop(name, options, lambda s: FusedStep(s, CompiledCPU, kernels))
    assert fused.fused_steps == len(fused.sampler.timesteps), "a step fell back to the plain path"
    # One kernel per branch of the algorithm (warm-up, lower-order and final steps), not one per step: a second,
    # longer generation compiles nothing new.
    compiled = len(kernels)
    assert 1 <= compiled <= 6
    _loop(name, options, lambda s: FusedStep(s, CompiledCPU, kernels), steps=2 * STEPS + 1, seed=1)
    assert len(kernels) == compiled
    assert np.abs(expected).max() > 0.1
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["pndm", "lms", "dpmpp_2m", "unipc", "heun"])
def test_history_does_not_alias_the_engine_output_without_guidance(name):
    """Without CFG the step's model output is the engine's output buffer itself; a multistep scheduler that keeps it
    in its history must keep a copy (the fused kernel writes one), or the next UNet call overwrites its history."""
    options = {**SD, **({"skip_prk_steps": True} if name == "pndm" else {})}
    got, fused = _loop(name, options, lambda s: FusedStep(s, CompiledCPU, _Kernels()), guidance=1.0)
    assert fused.fused_steps == len(fused.sampler.timesteps)
    assert np.isfinite(got).all()
    copied, _ = _loop(name, options, lambda s: (lambda u, c, g, i, x, noise: plain_step(s, u.copy(), c, g, i, x, noise)), guidance=1.0)
    np.testing.assert_array_equal(got, copied)


def test_an_untraceable_step_runs_the_plain_step_with_the_state_untouched(monkeypatch):
    sampler = create("dpmpp_2m", STEPS, **SD)
    plain_sampler = create("dpmpp_2m", STEPS, **SD)
    original = type(sampler)._step

    def step_with_a_numpy_function(self, model_output, i, x, noise):
        np.negative(model_output)  # refused by a traced array: the fused path must give up before changing state
        return original(self, model_output, i, x, noise)

    monkeypatch.setattr(type(sampler), "_step", step_with_a_numpy_function)
    fused = FusedStep(sampler, CompiledCPU, _Kernels())
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    y = x.copy()
    for i in range(3):
        u, c = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
        x = fused(u, c, 5.0, i, x, None)
        y = plain_step(plain_sampler, u, c, 5.0, i, y, None)
    assert fused.fused_steps == 0
    np.testing.assert_array_equal(x, y)


def test_kernel_body_is_value_independent_and_computes_each_value_once():
    """Two steps with different coefficients share one body (coefficients are parameters); a value used twice is
    one temporary."""
    sampler = create("euler", STEPS, **SD)
    kernels = _Kernels()
    fused = FusedStep(sampler, CompiledCPU, kernels)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    for i in range(STEPS - 1):
        x = fused(rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32), 7.0, i, x, None)
    assert len(kernels) == 1
    body = next(iter(kernels._cache))[-1]
    assert body.count("a0 ") + body.count("a0;") + body.count("a0)") >= 1 and "0.0" not in body
    assert len(body.splitlines()) == len(set(body.splitlines()))


def test_device_step_is_plain_on_numpy_and_fused_where_kernels_compile():
    sampler = create("euler", STEPS, **SD)
    assert isinstance(device_step(sampler, CompiledCPU), FusedStep)
    assert not isinstance(device_step(sampler, np), FusedStep)


def test_traced_arrays_refuse_what_a_kernel_cannot_express():
    from rtsd.engine.fused_step import _Tracer

    tracer = _Tracer(SHAPE)
    a = tracer.leaf(np.zeros(SHAPE, np.float32))
    with pytest.raises(Untraceable):
        a * np.float64(2.0)  # NumPy would promote the step to float64
    with pytest.raises(Untraceable):
        tracer.leaf(np.zeros((1, 4, 8, 8), np.float32))  # not elementwise with the sample
    with pytest.raises(Untraceable):
        a.astype(np.float16)
    with pytest.raises(TypeError):
        np.sqrt(a)
    assert kernel_body([(a * 2.0 + 1.0).clip(-1.0, 1.0).node]).count("\n") == 3


def test_every_traced_operation_compiles_to_what_numpy_computes():
    """Each operator the tracer records, reflected forms and clip included, against NumPy on the same values."""
    from rtsd.engine.fused_step import _Tracer

    rng = np.random.default_rng(4)
    a_value = rng.uniform(0.5, 2.0, SHAPE).astype(np.float32)
    b_value = rng.standard_normal(SHAPE, dtype=np.float32)
    expressions = {
        "reflected": lambda a, b: (2.5 - a) / (3.0 / (a + 4)) - 1.5 * b,
        "power": lambda a, b: a**0.5 + (a * 0.25) ** 3 - (-b),
        "clip": lambda a, b: (b * 3.0).clip(-1.25, a * 0.0 + 0.75) + a / b,
    }
    for label, expression in expressions.items():
        tracer = _Tracer(SHAPE)
        traced = expression(tracer.leaf(a_value), tracer.leaf(b_value))
        kernel = _Kernels().get(CompiledCPU, 2, len(tracer.params), 1, kernel_body([traced.node]))
        got = kernel(a_value, b_value, *[np.float32(p) for p in tracer.params])
        want = expression(a_value, b_value)
        # powf and NumPy's float32 power may differ in the last bit; everything else rounds identically.
        np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.spacing(np.abs(want).max()), err_msg=label)


# ---------------------------------------------------------------- through the runtime's TensorRT loop (stand-in)



@pytest.mark.parametrize("request_index", [0, 1, 2])
def test_runtime_loop_with_fused_steps_equals_the_host_loop(monkeypatch, tmp_path, request_index):
    """Runtime.generate through TensorRTBackend with a CuPy that compiles elementwise kernels runs every step as one
    kernel and gives exactly the host loop's latents and images (dpmpp_2m with CFG, euler_a with noise, ddim img2img)."""
    from rtsd.config import ModelConfig
    from rtsd.engine import fused_step, tensorrt as trt_backend
    from rtsd.export.specs import ShapeRange
    from rtsd.runtime import Runtime
    from tests.c_elementwise import ElementwiseKernel
    from tests.tensorrt_sim import (LOOP_REQUESTS, MODEL_LIKE, DevArray, HostStandIn, SimCupy, SimTensorRT,
                                    assert_device_equals_host, write_sim_engine_dir)

    class DeviceKernel(ElementwiseKernel):
        def __call__(self, *args):
            out = super().__call__(*args)
            return tuple(o.view(DevArray) for o in out) if isinstance(out, tuple) else out.view(DevArray)

    sd15, sim_range = ModelConfig("sd1"), ShapeRange(min_size=64, max_size=128, opt_size=64, max_batch=2)
    cp = SimCupy()
    cp.ElementwiseKernel = DeviceKernel
    trt = SimTensorRT(sd15, sim_range, compute=MODEL_LIKE, cupy=cp)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda purpose: trt)
    monkeypatch.setattr(trt_backend, "cuda_device", lambda purpose, device=0: (cp, "Sim GPU", "9.0"))
    steps_run = []
    real_call = fused_step.FusedStep.__call__

    def counting_call(self, *args):
        before = self.fused_steps
        result = real_call(self, *args)
        steps_run.append(self.fused_steps - before)
        return result

    monkeypatch.setattr(fused_step.FusedStep, "__call__", counting_call)
    write_sim_engine_dir(tmp_path, sd15, sim_range, "Sim GPU", "9.0", overflow=())
    device = Runtime(tmp_path, backend=trt_backend.TensorRTBackend())
    host = Runtime(tmp_path, backend=HostStandIn(sd15))
    request = LOOP_REQUESTS[request_index]
    assert_device_equals_host(device, host, request)
    assert steps_run and all(n == 1 for n in steps_run), "every step ran as one fused kernel"
