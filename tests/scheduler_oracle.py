"""Test harness: run an rtsd scheduler and the diffusers scheduler of the same config over a full loop.

Both loops start from the same unit noise (each scaled by its own ``init_noise_sigma``), call the same deterministic
model function on their own scaled input and timestep, and get the same per-step noise: rtsd through ``step(...,
noise=)``, diffusers through its module's ``randn_tensor``, replaced for the duration of the loop by a function that
returns the noise of the step being taken. Every intermediate sample is kept for comparison.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from rtsd.schedulers import create

SHAPE = (2, 4, 8, 8)

# Each rtsd scheduler name and the diffusers class it must reproduce, written here rather than read from rtsd's own
# ``diffusers_class`` (a wrong mapping in rtsd would otherwise pick its own oracle). dpmpp_2m_sde is
# DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++", which the tests pass as config.
DIFFUSERS_CLASS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
}

# rtsd options that diffusers takes as arguments of step() rather than as config keys.
STEP_ARGUMENTS: dict[str, tuple[str, ...]] = {"ddim": ("eta", "use_clipped_model_output")}


def model_fn(x: np.ndarray, t: float) -> np.ndarray:
    """A fixed smooth nonlinear stand-in for the UNet: bounded output, depends on both x and t."""
    phase = np.float32(t / 1000.0)
    return (np.tanh(x) * (0.5 + 0.5 * phase) + np.float32(0.2) * np.sin(np.float32(2.0) * x + phase)).astype(np.float32)


def noise_sequence(count: int, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]


@dataclass
class LoopResult:
    timesteps: np.ndarray
    init_noise_sigma: float
    samples: list[np.ndarray] = field(default_factory=list)  # the sample after every step, last = final


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (in float64)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def _original_image(shape, seed: int) -> np.ndarray:
    # The clean sample an img2img loop starts from (only used when start_index > 0).
    return noise_sequence(1, shape, seed + 1000)[0] * np.float32(0.5)


def run_rtsd(
    name: str, num_inference_steps: int, options: dict[str, Any], *, shape=SHAPE, seed: int = 0, start_index: int = 0
) -> LoopResult:
    """The rtsd loop; start_index > 0 runs img2img: add_noise(image, noise, start_index), then steps from there."""
    s = create(name, num_inference_steps, **options)
    noises = noise_sequence(len(s.timesteps) + 1, shape, seed)
    if start_index:
        x = s.add_noise(_original_image(shape, seed), noises[0], start_index)
    else:
        x = noises[0] * s.init_noise_sigma
    result = LoopResult(np.asarray(s.timesteps), float(s.init_noise_sigma))
    for i in range(start_index, len(s.timesteps)):
        out = model_fn(s.scale_model_input(x, i), float(s.timesteps[i]))
        x = s.step(out, i, x, noise=noises[i + 1] if s.stochastic else None)
        result.samples.append(x)
    return result


@contextlib.contextmanager
def _diffusers_noise(module_name: str, noises: list[np.ndarray], current: list[int]) -> Iterator[None]:
    import torch

    module = importlib.import_module(module_name)
    original = getattr(module, "randn_tensor", None)
    if original is None:  # a deterministic scheduler module: nothing to feed
        yield
        return
    calls: dict[int, int] = {}

    def randn_tensor(shape, generator=None, device=None, dtype=None, **_):
        i = current[0]
        calls[i] = calls.get(i, 0) + 1
        assert calls[i] == 1, f"diffusers drew noise twice in step {i}; the harness feeds one noise per step"
        out = torch.from_numpy(noises[i + 1].copy())
        assert tuple(out.shape) == tuple(shape)
        return out.to(dtype) if dtype is not None else out

    module.randn_tensor = randn_tensor
    try:
        yield
    finally:
        module.randn_tensor = original


def run_diffusers(
    diffusers_class: str,
    num_inference_steps: int,
    config: dict[str, Any],
    *,
    step_kwargs: dict[str, Any] | None = None,
    shape=SHAPE,
    seed: int = 0,
    start_index: int = 0,
) -> LoopResult:
    import diffusers
    import torch

    cls = getattr(diffusers, diffusers_class)
    sched = cls(**config)
    sched.set_timesteps(num_inference_steps)
    timesteps = sched.timesteps.numpy().copy()
    noises = noise_sequence(len(timesteps) + 1, shape, seed)
    if start_index:
        # As diffusers' img2img pipelines do: fix the begin index, noise the image at that timestep.
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start_index)
        image, noise = torch.from_numpy(_original_image(shape, seed)), torch.from_numpy(noises[0].copy())
        x = sched.add_noise(image, noise, sched.timesteps[start_index : start_index + 1])
    else:
        x = torch.from_numpy(noises[0].copy()) * sched.init_noise_sigma
    result = LoopResult(timesteps, float(sched.init_noise_sigma))
    current = [0]
    with _diffusers_noise(cls.__module__, noises, current), torch.no_grad():
        for i in range(start_index, len(sched.timesteps)):
            t = sched.timesteps[i]
            current[0] = i
            model_input = sched.scale_model_input(x, t)
            out = torch.from_numpy(model_fn(model_input.numpy(), float(t)))
            x = sched.step(out, t, x, **(step_kwargs or {})).prev_sample
            result.samples.append(x.numpy().copy())
    return result


@dataclass
class Comparison:
    ours: LoopResult
    reference: LoopResult

    @property
    def fractional_timesteps(self) -> bool:
        return bool((self.reference.timesteps != np.round(self.reference.timesteps)).any())

    @property
    def step_errors(self) -> list[float]:
        return [relative_error(a, b) for a, b in zip(self.ours.samples, self.reference.samples)]

    @property
    def max_error(self) -> float:
        return max(self.step_errors)

    def assert_match(self, tol: float = 1e-5) -> None:
        if np.issubdtype(self.reference.timesteps.dtype, np.integer) or not self.fractional_timesteps:
            np.testing.assert_array_equal(self.ours.timesteps, self.reference.timesteps)
        else:
            # Karras timesteps come from sigma_to_t on the train sigmas, whose last bits follow torch's float32
            # rounding (linspace, sqrt: 1 ulp off NumPy's for some entries), amplified to ~4e-7 near t=0: allow 1e-6.
            np.testing.assert_allclose(self.ours.timesteps, self.reference.timesteps, rtol=1e-6, atol=0)
        assert self.ours.timesteps.dtype == self.reference.timesteps.dtype, (
            self.ours.timesteps.dtype,
            self.reference.timesteps.dtype,
        )
        assert len(self.ours.samples) == len(self.reference.samples)
        assert (
            abs(self.ours.init_noise_sigma - self.reference.init_noise_sigma) <= 1e-6 * self.reference.init_noise_sigma
        )
        for sample in self.ours.samples:
            assert sample.dtype == np.float32 and np.isfinite(sample).all()
        errors = self.step_errors
        worst = int(np.argmax(errors))
        assert errors[worst] < tol, f"step {worst}: relative error {errors[worst]:.3g} >= {tol:g} (all: {errors})"


def compare_loops(
    name: str,
    num_inference_steps: int,
    options: dict[str, Any],
    *,
    diffusers_config: dict[str, Any] | None = None,
    step_kwargs: dict[str, Any] | None = None,
    shape=SHAPE,
    seed: int = 0,
    start_index: int = 0,
) -> Comparison:
    """Run both loops. ``options`` go to rtsd's create(); the same keys (minus step arguments such as DDIM's eta)
    plus ``diffusers_config`` build the diffusers scheduler that DIFFUSERS_CLASS pins ``name`` to."""
    step_keys = STEP_ARGUMENTS.get(name, ())
    config = {k: v for k, v in options.items() if k not in step_keys} | (diffusers_config or {})
    step_kwargs = {k: v for k, v in options.items() if k in step_keys} | (step_kwargs or {})
    ours = run_rtsd(name, num_inference_steps, options, shape=shape, seed=seed, start_index=start_index)
    reference = run_diffusers(
        DIFFUSERS_CLASS[name],
        num_inference_steps,
        config,
        step_kwargs=step_kwargs,
        shape=shape,
        seed=seed,
        start_index=start_index,
    )
    return Comparison(ours, reference)
