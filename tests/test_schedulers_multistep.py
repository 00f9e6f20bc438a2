"""DPM-Solver++(2M), its SDE variant and UniPC against diffusers' multistep schedulers, step for step.

Every loop runs the rtsd scheduler and the diffusers scheduler of the same config on the same deterministic model
function and noise (tests/scheduler_oracle.py); timesteps must be identical and every intermediate sample within
relative error 1e-5.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scheduler_oracle import DIFFUSERS_CLASS, SHAPE, compare_loops, model_fn, noise_sequence, relative_error

from rtsd.schedulers import create, create_from_diffusers_config

from tests.optional import require  # noqa: E402

torch = require("torch")
diffusers = require("diffusers")

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SDE_CONFIG = {"algorithm_type": "sde-dpmsolver++"}  # diffusers' class for dpmpp_2m_sde needs this key
DIFFUSERS_EXTRA = {"dpmpp_2m": {}, "dpmpp_2m_sde": SDE_CONFIG, "unipc": {}}
NAMES = tuple(DIFFUSERS_EXTRA)


def assert_loop_matches(name: str, steps: int, options: dict) -> None:
    comparison = compare_loops(name, steps, options, diffusers_config=DIFFUSERS_EXTRA[name])
    comparison.assert_match(1e-5)


# --- the full matrix: algorithm x prediction type x spacing x Karras x steps ------------------------------------


@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("use_karras_sigmas", [False, True], ids=["plain", "karras"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", NAMES)
def test_full_loop_matches_diffusers(name, prediction_type, spacing, use_karras_sigmas, steps):
    options = dict(
        SD,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
        use_karras_sigmas=use_karras_sigmas,
    )
    assert_loop_matches(name, steps, options)


# --- algorithm options ---------------------------------------------------------------------------------------------

DPM_OPTION_CASES = [
    {"final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False},  # second order on the last step too
    {"final_sigmas_type": "sigma_min", "euler_at_final": True},
    {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},  # ends with a zero-length step at >= 15 steps
    {"solver_type": "heun"},
    {"solver_type": "heun", "final_sigmas_type": "sigma_min", "lower_order_final": False},
    {"solver_order": 1},
    {"lambda_min_clipped": -5.1},  # cuts the noisiest timesteps off the schedule
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "use_karras_sigmas": True},
]

UNIPC_OPTION_CASES = [
    {"solver_order": 3},
    {"solver_order": 3, "use_karras_sigmas": True},
    {"solver_order": 1},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min", "solver_order": 3},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
    {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True, "lower_order_final": False},
    {"disable_corrector": [0, 3]},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
]


def _options_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("extra", DPM_OPTION_CASES, ids=_options_id)
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_dpm_solver_options_match_diffusers(name, extra, steps):
    assert_loop_matches(name, steps, {**SD, **extra})


@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("extra", UNIPC_OPTION_CASES, ids=_options_id)
def test_unipc_options_match_diffusers(extra, steps):
    assert_loop_matches("unipc", steps, {**SD, **extra})


@pytest.mark.parametrize("name", NAMES)
def test_duplicated_first_timestep_runs_from_index_zero(name, monkeypatch):
    # Karras sigmas on the cosine schedule start 999, 999, 999 (DPM-Solver: 998 x4). diffusers finds its first step
    # by timestep value and then takes the *second* match, so its plain loop starts at index 1 and runs off the end;
    # its pipelines avoid that with set_begin_index(0), which the reference is given here.
    original = getattr(diffusers, DIFFUSERS_CLASS[name])

    class FromIndexZero(original):
        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.set_begin_index(0)

    FromIndexZero.__module__ = original.__module__  # the harness feeds noise through this module's randn_tensor
    monkeypatch.setattr(diffusers, original.__name__, FromIndexZero)
    options = {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}
    comparison = compare_loops(name, 10, options, diffusers_config=DIFFUSERS_EXTRA[name])
    assert len(set(comparison.ours.timesteps[:3].tolist())) == 1
    comparison.assert_match(1e-5)


def test_unipc_bh1_onto_sigma_zero_ends_on_the_x0_prediction():
    # diffusers returns NaN for bh1 with final_sigmas_type="zero" (it adds B(h) * 0 with B(h) = -inf on the last
    # step); rtsd returns the limit, the last x0 prediction. Every earlier step must still match diffusers.
    options = {**SD, "solver_type": "bh1"}
    comparison = compare_loops("unipc", 10, options)
    assert np.isnan(comparison.reference.samples[-1]).all()
    assert max(comparison.step_errors[:-1]) < 1e-5
    reference = diffusers.UniPCMultistepScheduler(**options)
    reference.set_timesteps(10)
    reference._step_index = 9
    x = torch.from_numpy(comparison.reference.samples[-2])
    out = torch.from_numpy(model_fn(x.numpy(), float(reference.timesteps[9])))
    expected = reference.convert_model_output(out, sample=x).numpy()
    assert relative_error(comparison.ours.samples[-1], expected) < 1e-5


# --- img2img: starting part-way, and add_noise ----------------------------------------------------------------------


@pytest.mark.parametrize("karras", [False, True], ids=["plain", "karras"])
@pytest.mark.parametrize("name", NAMES)
def test_img2img_start_and_add_noise_match_diffusers(name, karras):
    steps, start = 20, 7
    options = dict(SD, timestep_spacing="leading", steps_offset=1, use_karras_sigmas=karras)
    ours = create(name, steps, **options)
    reference = getattr(diffusers, DIFFUSERS_CLASS[name])(**options, **DIFFUSERS_EXTRA[name])
    reference.set_timesteps(steps)
    reference.set_begin_index(start)  # what diffusers' img2img pipelines do
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())

    clean, noise, *step_noises = noise_sequence(2 + steps, SHAPE, seed=3)
    t_start = reference.timesteps[start : start + 1]
    x_ref = reference.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), t_start)
    x = ours.add_noise(clean, noise, start)
    assert x.dtype == np.float32
    assert relative_error(x, x_ref.numpy()) < 1e-6

    for i in range(start, steps):
        t = reference.timesteps[i]
        sde_noise = step_noises[i] if ours.stochastic else None
        x = ours.step(model_fn(ours.scale_model_input(x, i), float(ours.timesteps[i])), i, x, noise=sde_noise)
        kwargs = {"variance_noise": torch.from_numpy(sde_noise)} if sde_noise is not None else {}
        out_ref = torch.from_numpy(model_fn(reference.scale_model_input(x_ref, t).numpy(), float(t)))
        x_ref = reference.step(out_ref, t, x_ref, **kwargs).prev_sample
        assert relative_error(x, x_ref.numpy()) < 1e-5, f"step {i}"


# --- the step code only uses array operators (so it runs on CuPy arrays too) -------------------------------------

_OPERATOR_UFUNCS = {np.add, np.subtract, np.multiply, np.true_divide, np.negative, np.positive, np.power}


class OperatorsOnly(np.ndarray):
    """An ndarray that refuses NumPy functions (np.sqrt(x), np.stack(...)): only arithmetic operators may touch it."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc not in _OPERATOR_UFUNCS or method != "__call__":
            raise AssertionError(f"np.{ufunc.__name__} called on a sample array")
        plain = [np.asarray(a) if isinstance(a, OperatorsOnly) else a for a in inputs]
        return getattr(ufunc, method)(*plain, **kwargs).view(OperatorsOnly)

    def __array_function__(self, func, types, args, kwargs):
        raise AssertionError(f"np.{func.__name__} called on a sample array")


@pytest.mark.parametrize(
    "name,options",
    [
        ("dpmpp_2m", {"solver_type": "heun", "final_sigmas_type": "sigma_min", "lower_order_final": False}),
        ("dpmpp_2m_sde", {"use_karras_sigmas": True}),
        ("unipc", {"solver_order": 3}),
    ],
)
def test_step_uses_only_array_operators(name, options):
    s = create(name, 6, **SD, **options)
    noises = [n.view(OperatorsOnly) for n in noise_sequence(len(s.timesteps) + 1, SHAPE)]
    x = noises[0] * s.init_noise_sigma
    for i in range(len(s.timesteps)):
        out = model_fn(np.asarray(s.scale_model_input(x, i)), float(s.timesteps[i])).view(OperatorsOnly)
        x = s.step(out, i, x, noise=noises[i + 1] if s.stochastic else None)
        assert isinstance(x, OperatorsOnly) and x.dtype == np.float32
    assert np.isfinite(np.asarray(x)).all()


# --- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_steps_out_of_order_raise(name):
    s = create(name, 5, **SD)
    x = noise_sequence(1, SHAPE)[0]
    noise = x if s.stochastic else None
    x1 = s.step(model_fn(x, float(s.timesteps[0])), 0, x, noise=noise)
    for wrong in (0, 2, 5):
        with pytest.raises(ValueError, match="index"):
            s.step(model_fn(x1, 0.0), wrong, x1, noise=noise)
    s.step(model_fn(x1, float(s.timesteps[1])), 1, x1, noise=noise)


def test_sde_requires_noise_of_the_sample_shape():
    s = create("dpmpp_2m_sde", 5, **SD)
    x = noise_sequence(1, SHAPE)[0]
    with pytest.raises(ValueError, match="noise"):
        s.step(model_fn(x, 999.0), 0, x)
    with pytest.raises(ValueError, match="noise shape"):
        s.step(model_fn(x, 999.0), 0, x, noise=x[:1])
    assert s.stochastic and not create("dpmpp_2m", 5).stochastic and not create("unipc", 5).stochastic


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("dpmpp_2m", {"solver_order": 3}, "solver_order=3; allowed values are 2, 1"),
        ("dpmpp_2m", {"solver_type": "bogus"}, "solver_type='bogus'; allowed values are 'midpoint', 'heun'"),
        ("dpmpp_2m_sde", {"final_sigmas_type": "max"}, "'max'; allowed values are 'zero', 'sigma_min'"),
        ("dpmpp_2m", {"use_karras_sigmas": "yes"}, "use_karras_sigmas='yes'; allowed values are True, False"),
        ("unipc", {"solver_order": 4}, "solver_order=4; allowed values are 2, 1, 3"),
        ("unipc", {"solver_type": "bh3"}, "solver_type='bh3'; allowed values are 'bh2', 'bh1'"),
        ("unipc", {"lower_order_final": False}, "needs lower_order_final=True"),
        ("unipc", {"disable_corrector": ["first"]}, "disable_corrector must be a list of step indices"),
        ("unipc", {"algorithm_type": "dpmsolver++"}, "unknown option"),
    ],
)
def test_bad_options_raise_value_error_naming_allowed_values(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        create(name, 10, **SD, **options)


# --- diffusers scheduler_config.json -------------------------------------------------------------------------------


def test_from_diffusers_config_picks_the_algorithm_and_matches():
    reference = diffusers.DPMSolverMultistepScheduler(
        **SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1
    )
    config = dict(reference.config)
    s = create_from_diffusers_config("DPMSolverMultistepScheduler", config, 25)
    assert s.name == "dpmpp_2m_sde" and s.stochastic
    reference.set_timesteps(25)
    np.testing.assert_array_equal(s.timesteps, reference.timesteps.numpy())
    np.testing.assert_allclose(s.sigmas, reference.sigmas.numpy(), rtol=1e-6)

    unipc_config = dict(diffusers.UniPCMultistepScheduler(**SD).config)
    assert create_from_diffusers_config("UniPCMultistepScheduler", unipc_config, 20).name == "unipc"
    with pytest.raises(ValueError, match="thresholding"):
        create_from_diffusers_config("dpmpp_2m", {**config, "algorithm_type": "dpmsolver++", "thresholding": True}, 20)
    with pytest.raises(ValueError, match="predict_x0"):
        create_from_diffusers_config("unipc", {**unipc_config, "predict_x0": False}, 20)


def test_default_options_equal_diffusers_defaults():
    # Unset options take the diffusers class defaults (linear betas 1e-4..0.02, linspace spacing, final sigma 0).
    for name in NAMES:
        s = create(name, 12)
        reference = getattr(diffusers, DIFFUSERS_CLASS[name])(**DIFFUSERS_EXTRA[name])
        reference.set_timesteps(12)
        np.testing.assert_array_equal(s.timesteps, reference.timesteps.numpy())
        assert s.sigmas[-1] == 0.0 and s.init_noise_sigma == 1.0
        assert math.isclose(float(s.sigmas[0]), float(reference.sigmas[0]), rel_tol=1e-6)
