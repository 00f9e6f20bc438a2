"""NumPy schedulers (part 1: ddim ddpm pndm lms euler euler_a heun lcm) against diffusers, full loops step by step.

Every loop: same unit noise, same model function, same per-step noise (tests/scheduler_oracle.py); every
intermediate sample within relative error 1e-5 of diffusers', timesteps identical.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from rtsd.schedulers import SchedulerError, available, create, create_from_diffusers_config, options_of, scheduler_class
from rtsd.schedulers import base
from rtsd.schedulers.lms import lms_coefficient
from scheduler_oracle import DIFFUSERS_CLASS, SHAPE, compare_loops, model_fn, relative_error

from tests.optional import require  # noqa: E402

diffusers = require("diffusers")
import torch  # noqa: E402

warnings.filterwarnings("ignore", module="diffusers")

ALGORITHMS = ("ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "lcm")
KARRAS = ("lms", "euler", "heun")
SPACINGS = ("leading", "trailing", "linspace")
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
# diffusers' PNDMScheduler defaults to PRK warm-up steps; rtsd implements SD's PLMS (skip_prk_steps=True) only.
REQUIRED = {"pndm": {"skip_prk_steps": True}}


def _cases(names):
    for name in names:
        for prediction_type in scheduler_class(name).prediction_types:
            for spacing in SPACINGS:
                for steps in (10, 30):
                    yield pytest.param(
                        name, prediction_type, spacing, steps, id=f"{name}-{prediction_type}-{spacing}-{steps}"
                    )


def _options(name, prediction_type, spacing, **extra):
    return SD | REQUIRED.get(name, {}) | {"prediction_type": prediction_type, "timestep_spacing": spacing} | extra


@pytest.mark.parametrize("name,prediction_type,spacing,steps", list(_cases(ALGORITHMS)))
def test_full_loop_matches_diffusers(name, prediction_type, spacing, steps):
    compare_loops(name, steps, _options(name, prediction_type, spacing)).assert_match(1e-5)


@pytest.mark.parametrize("name,prediction_type,spacing,steps", list(_cases(KARRAS)))
def test_karras_sigmas_match_diffusers(name, prediction_type, spacing, steps):
    comparison = compare_loops(name, steps, _options(name, prediction_type, spacing, use_karras_sigmas=True))
    assert comparison.fractional_timesteps
    comparison.assert_match(1e-5)


@pytest.mark.parametrize("name,prediction_type,spacing,steps", list(_cases(["ddim"])))
def test_ddim_with_eta_matches_diffusers(name, prediction_type, spacing, steps):
    comparison = compare_loops(name, steps, _options(name, prediction_type, spacing, eta=1.0))
    comparison.assert_match(1e-5)


@pytest.mark.parametrize(
    "name,options",
    [
        ("ddim", {"clip_sample": False, "set_alpha_to_one": False}),
        ("ddim", {"eta": 0.5, "use_clipped_model_output": True, "clip_sample_range": 0.8}),
        ("ddpm", {"variance_type": "fixed_large", "clip_sample": False}),
        ("ddpm", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0}),
        ("pndm", {"skip_prk_steps": True, "set_alpha_to_one": True}),
        ("euler", {"final_sigmas_type": "sigma_min"}),
        ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
        ("euler", {"beta_schedule": "squaredcos_cap_v2"}),
        ("euler_a", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("heun", {"clip_sample": True, "clip_sample_range": 2.0}),
        ("lms", {"beta_schedule": "squaredcos_cap_v2"}),
        ("lcm", {"original_inference_steps": 100, "timestep_scaling": 5.0, "set_alpha_to_one": False}),
        ("lcm", {"clip_sample": True, "prediction_type": "sample"}),
        ("ddim", {"num_train_timesteps": 500, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v}" for k, v in v.items()),
)
def test_options_match_diffusers(name, options):
    compare_loops(name, 10, SD | options).assert_match(1e-5)


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2])
def test_one_and_two_step_loops_match_diffusers(name, spacing, steps):
    compare_loops(name, steps, _options(name, "epsilon", spacing)).assert_match(1e-5)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_defaults_are_the_diffusers_class_defaults(name):
    # An option left out means what diffusers' own default means (PNDM: see REQUIRED).
    compare_loops(name, 20, REQUIRED.get(name, {})).assert_match(1e-5)


# lms deliberately differs from diffusers on img2img: see test_lms_img2img_first_step_is_euler.
@pytest.mark.parametrize("name", [name for name in ALGORITHMS if name != "lms"])
@pytest.mark.parametrize("start_index", [2, 5])
def test_img2img_loop_matches_diffusers(name, start_index):
    # diffusers' img2img pipelines start at t_start * order (Heun: the first half of a step).
    start = start_index * scheduler_class(name).order
    compare_loops(name, 10, SD | REQUIRED.get(name, {}), start_index=start).assert_match(1e-5)


def test_lms_img2img_first_step_is_euler():
    # diffusers' LMS takes order min(step_index + 1, 4) even with one stored derivative; rtsd uses the history it
    # has, so an img2img loop's first LMS step is an Euler step.
    lms, euler = create("lms", 10, **SD), create("euler", 10, **SD)
    x = np.random.default_rng(3).standard_normal(SHAPE, dtype=np.float32) * 3
    out = model_fn(lms.scale_model_input(x, 4), float(lms.timesteps[4]))
    np.testing.assert_array_equal(lms.timesteps, euler.timesteps)
    assert relative_error(lms.step(out, 4, x), euler.step(out, 4, x)) < 1e-6


# --- zero terminal SNR ------------------------------------------------------------------------------------------

ZERO_SNR = ("ddim", "ddpm", "euler", "euler_a", "lcm")


@pytest.mark.parametrize("name", ZERO_SNR)
@pytest.mark.parametrize("steps", [10, 30])
def test_zero_terminal_snr_matches_diffusers(name, steps):
    # The setting Lin et al. 2023 recommend: v-prediction, trailing spacing. Tolerance 1e-4, not 1e-5: the rescaled
    # table's smallest entries carry float32 rounding that torch and NumPy do differently (torch's float32 sqrt is
    # not correctly rounded), and the Euler family's first step from sigma = 4096 loses ~3 digits to cancellation
    # in float32 in either implementation (rtsd float32 vs float64 differ by ~1e-4 there too).
    options = SD | {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    compare_loops(name, steps, options).assert_match(1e-4)


@pytest.mark.parametrize("schedule", base.BETA_SCHEDULES)
def test_zero_snr_table_matches_diffusers(schedule):
    ours = base.TrainSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule, rescale_betas_zero_snr=True)
    ref = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule=schedule, rescale_betas_zero_snr=True
    )
    abar, ref_abar = ours.alphas_cumprod(), ref.alphas_cumprod.numpy()
    assert abar[-1] == 0 and ref_abar[-1] == 0
    np.testing.assert_allclose(abar, ref_abar, rtol=0, atol=1e-6)
    np.testing.assert_allclose(abar[:-1], ref_abar[:-1], rtol=5e-5)


# --- schedule tables --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", base.BETA_SCHEDULES)
def test_schedule_tables_match_diffusers(schedule):
    ours = base.TrainSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule)
    ref = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule)
    # torch.linspace rounds some float32 entries differently from NumPy (1 ulp); cumprod then matches to ~1e-6.
    np.testing.assert_allclose(ours.betas(), ref.betas.numpy(), rtol=4e-7)
    np.testing.assert_allclose(ours.alphas_cumprod(), ref.alphas_cumprod.numpy(), rtol=2e-6)
    assert ours.betas().dtype == np.float32 and ours.alphas_cumprod().dtype == np.float32


def test_trained_betas_give_identical_tables():
    # With the same betas, alphas_cumprod is bit-identical to diffusers (cumprod accumulates in float64 in both);
    # sigmas stay within 1 float32 ulp (torch's float32 sqrt is not always correctly rounded, NumPy's is).
    betas = diffusers.EulerDiscreteScheduler(**SD).betas.tolist()
    ref = diffusers.EulerDiscreteScheduler(trained_betas=betas, use_karras_sigmas=True)
    ref.set_timesteps(25)
    ours = create("euler", 25, trained_betas=betas, use_karras_sigmas=True)
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1.2e-7, atol=0)
    compare_loops("euler", 25, {"trained_betas": betas, "use_karras_sigmas": True}).assert_match(1e-5)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 50, 999, 1000])
def test_spaced_timesteps_match_diffusers_ddim(spacing, steps):
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(steps)
    ours = base.spaced_timesteps(spacing, steps, 1000, steps_offset=1).astype(np.int64)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_karras_sigmas_and_sigma_to_t():
    sigmas = base.karras_sigmas(0.03, 14.6, 12)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    assert np.all(np.diff(sigmas) < 0)
    train = base.sigmas_from(
        base.TrainSchedule(**{k: v for k, v in SD.items() if k != "steps_offset"}).alphas_cumprod()
    )
    log_sigmas = np.log(train)
    # A train sigma maps back to its own integer timestep; between two, linearly in log sigma.
    np.testing.assert_allclose(base.sigma_to_t(train[[0, 10, 500, 999]], log_sigmas), [0, 10, 500, 999], atol=1e-4)
    mid = np.exp((log_sigmas[100] + log_sigmas[101]) / 2)
    assert base.sigma_to_t(mid, log_sigmas) == pytest.approx(100.5, abs=1e-4)


def test_lms_coefficients_match_diffusers_quadrature():
    ref = diffusers.LMSDiscreteScheduler(**SD, use_karras_sigmas=True)
    ref.set_timesteps(20)
    ours = create("lms", 20, **SD, use_karras_sigmas=True)
    worst = 0.0
    for i in range(20):
        order = min(i + 1, 4)
        for j in range(order):
            expected = ref.get_lms_coefficient(order, i, j)
            got = lms_coefficient(ours.sigmas, i, order, j)
            worst = max(worst, abs(got - expected) / max(abs(expected), 1e-12))
    assert worst < 1e-5


# --- add_noise --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALGORITHMS)
def test_add_noise_matches_diffusers(name):
    options = SD | REQUIRED.get(name, {})
    ours = create(name, 10, **options)
    ref = getattr(diffusers, DIFFUSERS_CLASS[name])(**options)
    ref.set_timesteps(10)
    rng = np.random.default_rng(1)
    original, noise = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    for i in (0, 3, len(ours.timesteps) - 1):
        expected = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), ref.timesteps[i : i + 1]).numpy()
        got = ours.add_noise(original, noise, i)
        assert got.dtype == np.float32
        assert relative_error(got, expected) < 1e-6, (name, i)


# --- API --------------------------------------------------------------------------------------------------------


def test_available_lists_every_part1_algorithm():
    assert set(ALGORITHMS) <= set(available())


@pytest.mark.parametrize("name", ALGORITHMS)
def test_api_shape(name):
    s = create(name, 10, **SD | REQUIRED.get(name, {}))
    assert isinstance(s.timesteps, np.ndarray) and isinstance(s.init_noise_sigma, float)
    assert len(s.timesteps) == {"heun": 19, "pndm": 11}.get(name, 10)
    assert s.order == (2 if name == "heun" else 1)
    assert s.stochastic == (name in ("ddpm", "euler_a", "lcm"))
    assert create("ddim", 10, eta=0.3).stochastic


def test_float32_samples_stay_float32_and_float64_stays_float64():
    for dtype in (np.float32, np.float64):
        s = create("euler", 5, **SD)
        x = np.ones(SHAPE, dtype)
        assert s.step(s.scale_model_input(x, 0) * 0.5, 0, x).dtype == dtype


def test_create_from_diffusers_config_sd15_file():
    # SD 1.5's scheduler_config.json (a PNDMScheduler config), read for PNDM and for Euler as users do.
    config = json.loads(
        '{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, '
        '"beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000, '
        '"set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, '
        '"clip_sample": false}'
    )
    pndm = create_from_diffusers_config("PNDMScheduler", config, 20)
    ref = diffusers.PNDMScheduler.from_config(config)
    ref.set_timesteps(20)
    np.testing.assert_array_equal(pndm.timesteps, ref.timesteps.numpy())
    euler = create_from_diffusers_config("EulerDiscreteScheduler", config, 20)
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(20)
    np.testing.assert_array_equal(euler.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(euler.sigmas, ref.sigmas.numpy(), rtol=2e-6)
    assert create_from_diffusers_config("euler", config, 20).schedule == euler.schedule


def test_create_from_diffusers_config_rejects_unsupported_and_unknown_keys():
    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        create_from_diffusers_config("ddim", {"thresholding": True}, 10)
    with pytest.raises(ValueError, match="unknown diffusers scheduler config key 'warp_factor'"):
        create_from_diffusers_config("ddim", {"warp_factor": 9}, 10)
    with pytest.raises(ValueError, match="unknown scheduler 'FancyScheduler'"):
        create_from_diffusers_config("FancyScheduler", {}, 10)
    # diffusers' default (False) is fine, and so are keys of other scheduler classes
    create_from_diffusers_config("ddim", {"thresholding": False, "use_karras_sigmas": True}, 10)


def test_options_of_lists_config_keys():
    assert {"eta", "clip_sample", "set_alpha_to_one", "timestep_spacing", "prediction_type"} <= set(options_of("ddim"))
    assert "rescale_betas_zero_snr" not in options_of("pndm")  # not a PNDMScheduler key


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: create("dpm_fast", 10), r"unknown scheduler 'dpm_fast'; available schedulers are ddim, ddpm"),
        (lambda: create("ddim", 0), r"num_inference_steps must be between 1 and num_train_timesteps=1000, got 0"),
        (lambda: create("euler", 1001), r"between 1 and num_train_timesteps=1000, got 1001"),
        (lambda: create("ddim", 2.5), r"num_inference_steps must be an int"),
        (
            lambda: create("ddim", 10, etaa=0.1),
            r"unknown option\(s\) \['etaa'\] for scheduler 'ddim'; allowed options are \[.*'eta'",
        ),
        (lambda: create("pndm", 10, rescale_betas_zero_snr=True), r"unknown option.*allowed options"),
        (
            lambda: create("ddim", 10, prediction_type="x0"),
            r"prediction_type 'x0'; allowed values are 'epsilon', 'v_prediction', 'sample'",
        ),
        (
            lambda: create("euler_a", 10, prediction_type="sample"),
            r"euler_a does not support prediction_type 'sample'; allowed values are 'epsilon', 'v_prediction'",
        ),
        (
            lambda: create("ddim", 10, timestep_spacing="even"),
            r"timestep_spacing 'even'; allowed values are 'leading', 'trailing', 'linspace'",
        ),
        (
            lambda: create("ddim", 10, beta_schedule="cosine"),
            r"beta_schedule 'cosine'; allowed values are 'linear', 'scaled_linear', 'squaredcos_cap_v2'",
        ),
        (lambda: create("ddim", 10, beta_start=0.1, beta_end=0.01), r"need 0 < beta_start <= beta_end < 1"),
        (lambda: create("ddim", 10, eta=-1), r"eta must be >= 0"),
        (
            lambda: create("ddpm", 10, variance_type="learned"),
            r"variance_type 'learned'; allowed values are 'fixed_small'",
        ),
        (lambda: create("pndm", 10, skip_prk_steps=False), r"only skip_prk_steps=True"),
        (
            lambda: create("euler", 10, final_sigmas_type="one"),
            r"final_sigmas_type 'one'; allowed values are 'zero', 'sigma_min'",
        ),
        (lambda: create("lcm", 60), r"num_inference_steps=60 must be <= original_inference_steps=50"),
        (
            lambda: create("ddim", 10, trained_betas=[0.1] * 3),
            r"trained_betas must hold num_train_timesteps=1000 values",
        ),
    ],
)
def test_bad_options_raise_value_error_naming_allowed_values(call, message):
    with pytest.raises(SchedulerError, match=message) as info:
        call()
    assert isinstance(info.value, ValueError)


def test_step_argument_errors():
    x = np.zeros(SHAPE, np.float32)
    euler = create("euler", 10)
    with pytest.raises(ValueError, match=r"model_output shape \(2, 4, 8, 4\) must equal sample shape \(2, 4, 8, 8\)"):
        euler.step(np.zeros((2, 4, 8, 4), np.float32), 0, x)
    with pytest.raises(ValueError, match=r"euler is deterministic \(stochastic=False\): pass noise=None"):
        euler.step(x, 0, x, noise=x)
    with pytest.raises(ValueError, match=r"step index 10 is out of range; valid indices are 0..9"):
        euler.step(x, 10, x)
    with pytest.raises(ValueError, match=r"the step index must be an int"):
        euler.step(x, 0.0, x)
    euler_a = create("euler_a", 10)
    with pytest.raises(ValueError, match=r"euler_a is stochastic: pass noise=<array of shape \(2, 4, 8, 8\)>"):
        euler_a.step(x, 0, x)
    with pytest.raises(ValueError, match=r"noise shape \(4, 8, 8\) must equal sample shape \(2, 4, 8, 8\)"):
        euler_a.step(x, 0, x, noise=x[0])
    with pytest.raises(ValueError, match=r"add_noise: noise shape"):
        euler.add_noise(x, x[0], 0)


def test_steps_must_come_in_order():
    x = np.ones(SHAPE, np.float32)
    s = create("ddim", 10)
    s.step(x * 0.1, 3, x)  # the first step may start anywhere (img2img)
    with pytest.raises(ValueError, match=r"step index 3 called out of order; the next index is 4"):
        s.step(x * 0.1, 3, x)
    with pytest.raises(ValueError, match=r"step index 6 called out of order; the next index is 4"):
        s.scale_model_input(x, 6)
    s.step(x * 0.1, 4, x)
    heun = create("heun", 10)
    with pytest.raises(ValueError, match=r"heun: index 1 is the correction half of a step"):
        heun.step(x, 1, x)


def test_train_schedule_is_frozen_and_validated():
    schedule = base.TrainSchedule(trained_betas=[0.01] * 1000)
    assert isinstance(schedule.trained_betas, tuple)
    with pytest.raises(AttributeError):
        schedule.beta_start = 0.1  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"steps_offset must be an int >= 0"):
        base.TrainSchedule(steps_offset=-1)
    with pytest.raises(ValueError, match=r"num_train_timesteps must be >= 2"):
        base.TrainSchedule(num_train_timesteps=1)


# --- device-array readiness -------------------------------------------------------------------------------------


class OperatorOnlyArray:
    """A sample array offering only what CuPy arrays share with NumPy's: operators, .clip, .shape, .dtype.

    Any NumPy function applied to it fails (no __array__, ufuncs refused), so a loop that runs with it proves the
    step code uses the array's own operators only.
    """

    __array_ufunc__ = None

    def __init__(self, data: np.ndarray):
        self.data = data

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)

    def __array__(self, *args, **kwargs):
        raise TypeError("a NumPy function was called on a sample array")

    def clip(self, lo, hi):
        return OperatorOnlyArray(self.data.clip(lo, hi))

    def __neg__(self):
        return OperatorOnlyArray(-self.data)


def _operator(name):
    def op(self, other):
        other = other.data if isinstance(other, OperatorOnlyArray) else other
        assert isinstance(other, (int, float)) or type(other) is np.ndarray, f"{name} with {type(other)}"
        return OperatorOnlyArray(getattr(self.data, name)(other))

    return op


for _name in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "pow"):
    setattr(OperatorOnlyArray, f"__{_name}__", _operator(f"__{_name}__"))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_step_code_uses_only_array_operators(name):
    clipping = {"clip_sample": True} if name in ("ddim", "ddpm", "heun", "lcm") else {}
    options = SD | REQUIRED.get(name, {}) | clipping
    plain, wrapped = create(name, 8, **options), create(name, 8, **options)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(SHAPE, dtype=np.float32) * plain.init_noise_sigma
    y = OperatorOnlyArray(x)
    for i in range(len(plain.timesteps)):
        noise = rng.standard_normal(SHAPE, dtype=np.float32) if plain.stochastic else None
        out = model_fn(plain.scale_model_input(x, i), float(plain.timesteps[i]))
        x = plain.step(out, i, x, noise=noise)
        assert isinstance(wrapped.scale_model_input(y, i), OperatorOnlyArray)
        y = wrapped.step(OperatorOnlyArray(out), i, y, noise=None if noise is None else OperatorOnlyArray(noise))
    assert isinstance(y, OperatorOnlyArray)
    np.testing.assert_array_equal(y.data, x)


def test_every_scheduler_is_pinned_to_its_diffusers_class():
    """The oracle's name -> class table (written in tests/scheduler_oracle.py) covers every rtsd scheduler, and
    rtsd's own table, used to read diffusers scheduler configs, agrees with it."""
    assert set(DIFFUSERS_CLASS) == set(available())
    for name, cls in DIFFUSERS_CLASS.items():
        assert scheduler_class(name).diffusers_class == cls, name
        assert hasattr(diffusers, cls), cls
