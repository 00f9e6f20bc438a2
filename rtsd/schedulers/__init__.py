"""NumPy schedulers (torch-free): one file per algorithm, one entry point.

    from rtsd.schedulers import create, available
    s = create("euler", num_inference_steps=20, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x = x * s.init_noise_sigma
    for i in range(len(s.timesteps)):
        eps = unet(s.scale_model_input(x, i), s.timesteps[i])
        x = s.step(eps, i, x, noise=rng.standard_normal(x.shape, dtype=x.dtype) if s.stochastic else None)

Options are diffusers' scheduler_config.json keys; an option left out takes the default of the diffusers scheduler
class of the same algorithm, so ``create_from_diffusers_config`` and diffusers' ``from_config`` agree.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any, Mapping

from rtsd.schedulers.base import Scheduler, SchedulerError, TrainSchedule

__all__ = [
    "Scheduler",
    "SchedulerError",
    "TrainSchedule",
    "available",
    "create",
    "create_from_diffusers_config",
    "options_of",
    "scheduler_class",
]

# name -> (module, class, diffusers class name)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "ddim": ("rtsd.schedulers.ddim", "DDIM", "DDIMScheduler"),
    "ddpm": ("rtsd.schedulers.ddpm", "DDPM", "DDPMScheduler"),
    "pndm": ("rtsd.schedulers.pndm", "PNDM", "PNDMScheduler"),
    "lms": ("rtsd.schedulers.lms", "LMS", "LMSDiscreteScheduler"),
    "euler": ("rtsd.schedulers.euler", "Euler", "EulerDiscreteScheduler"),
    "euler_a": ("rtsd.schedulers.euler_a", "EulerAncestral", "EulerAncestralDiscreteScheduler"),
    "heun": ("rtsd.schedulers.heun", "Heun", "HeunDiscreteScheduler"),
    "dpmpp_2m": ("rtsd.schedulers.dpmpp_2m", "DPMPP2M", "DPMSolverMultistepScheduler"),
    "dpmpp_2m_sde": ("rtsd.schedulers.dpmpp_2m_sde", "DPMPP2MSDE", "DPMSolverMultistepScheduler"),
    "unipc": ("rtsd.schedulers.unipc", "UniPC", "UniPCMultistepScheduler"),
    "lcm": ("rtsd.schedulers.lcm", "LCM", "LCMScheduler"),
}

# Keys of diffusers' scheduler configs that belong to *other* scheduler classes. diffusers' from_config ignores a
# class's foreign keys (SD 1.x ships a PNDMScheduler config that users load into Euler), and so do we.
_FOREIGN_DIFFUSERS_KEYS = frozenset(
    """
    algorithm_type clip_sample clip_sample_range disable_corrector dynamic_thresholding_ratio euler_at_final
    final_sigmas_type flow_shift interpolation_type lambda_min_clipped lower_order_final noise_sampler_seed
    original_inference_steps predict_x0 rescale_betas_zero_snr sample_max_value set_alpha_to_one sigma_max sigma_min
    skip_prk_steps solver_order solver_p solver_type steps_offset thresholding time_shift_type timestep_scaling
    timestep_spacing timestep_type use_beta_sigmas use_dynamic_shifting use_exponential_sigmas use_flow_sigmas
    use_karras_sigmas use_lu_lambdas variance_type
    """.split()
)


def available() -> tuple[str, ...]:
    """Names accepted by ``create`` (algorithms whose module is present)."""
    return tuple(name for name, (module, _, _) in _REGISTRY.items() if importlib.util.find_spec(module) is not None)


def scheduler_class(name_or_class: str) -> type[Scheduler]:
    """The Scheduler subclass for an rtsd name ("euler") or a diffusers class name ("EulerDiscreteScheduler")."""
    name = _resolve_name(name_or_class)
    module, cls_name, _ = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls_name)


def options_of(name: str) -> tuple[str, ...]:
    """Every option ``create(name, ...)`` accepts, sorted."""
    cls = scheduler_class(name)
    return tuple(sorted(_train_options(cls) | _algorithm_options(cls)))


def create(name: str, num_inference_steps: int, **options: Any) -> Scheduler:
    """A scheduler for one generation. Options: diffusers config keys of this algorithm (see ``options_of``)."""
    cls = scheduler_class(name)
    train_keys, algorithm_keys = _train_options(cls), _algorithm_options(cls)
    unknown = sorted(set(options) - train_keys - algorithm_keys)
    if unknown:
        raise SchedulerError(
            f"unknown option(s) {unknown} for scheduler {cls.name!r}; allowed options are "
            f"{sorted(train_keys | algorithm_keys)}"
        )
    schedule = cls.default_schedule(**{k: v for k, v in options.items() if k in train_keys})
    return cls(num_inference_steps, schedule, **{k: v for k, v in options.items() if k in algorithm_keys})


def create_from_diffusers_config(name_or_class: str, config: Mapping[str, Any], num_inference_steps: int) -> Scheduler:
    """Build from a diffusers scheduler_config.json dict, read for the algorithm ``name_or_class``.

    Bookkeeping keys (``_class_name``, ``_diffusers_version``, ...) and keys of other diffusers scheduler classes are
    ignored, as diffusers' ``from_config`` does; a key for a feature rtsd does not implement must hold diffusers'
    default (e.g. ``thresholding: false``); any other key is an error.
    """
    if name_or_class == "DPMSolverMultistepScheduler":
        # One diffusers class, two rtsd algorithms: its algorithm_type key tells which.
        sde = config.get("algorithm_type", "dpmsolver++") == "sde-dpmsolver++"
        name_or_class = "dpmpp_2m_sde" if sde else "dpmpp_2m"
    cls = scheduler_class(name_or_class)
    own = _train_options(cls) | _algorithm_options(cls)
    options: dict[str, Any] = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in own:
            if not (key == "trained_betas" and value is None):
                options[key] = value
        elif key in cls.fixed_diffusers_keys:
            if value != cls.fixed_diffusers_keys[key]:
                raise SchedulerError(
                    f"{cls.diffusers_class} config key {key}={value!r} is not supported by rtsd; "
                    f"only {cls.fixed_diffusers_keys[key]!r} is"
                )
        elif key in _FOREIGN_DIFFUSERS_KEYS or key == "trained_betas":
            continue
        else:
            raise SchedulerError(f"unknown diffusers scheduler config key {key!r} for {cls.diffusers_class}")
    return create(cls.name, num_inference_steps, **options)


def _resolve_name(name_or_class: str) -> str:
    names = available()
    if name_or_class in names:
        return name_or_class
    by_class = [n for n in names if _REGISTRY[n][2] == name_or_class]
    if len(by_class) == 1:
        return by_class[0]
    if len(by_class) > 1:
        raise SchedulerError(
            f"diffusers class {name_or_class!r} maps to several rtsd schedulers {by_class}; pass one of those names"
        )
    raise SchedulerError(f"unknown scheduler {name_or_class!r}; available schedulers are {', '.join(names)}")


def _train_options(cls: type[Scheduler]) -> set[str]:
    return set(TrainSchedule.field_names()) - set(cls.unsupported_train_fields)


def _algorithm_options(cls: type[Scheduler]) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
