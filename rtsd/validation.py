"""Checks of a generation request's plain arguments, before any engine runs: each bad value fails with one line naming
the argument and the fix, instead of a raw TypeError from deep inside, a silently coerced value, or an allocation
sized by a hostile number.

NumPy-only (the torch-free runtime imports it). ``Runtime.generate`` calls ``check_request`` once, in its step 1.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

SEED_LIMIT = 2**64  # numpy.random.default_rng takes any non-negative int; PNG metadata and other tools want 64 bits
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0  # diffusers' UIs stop at 20-30; far beyond, the fp16 UNet output overflows
# Training schedules: SD's is 1000 steps with betas ~1e-3..1e-2. The bounds are generous sanity limits that stop a
# hostile value (num_train_timesteps=10**8 allocates GBs) before any array is made.
MAX_TRAIN_TIMESTEPS = 10_000
_FLOAT_OPTION_RANGES = {"beta_start": (0.0, 1.0), "beta_end": (0.0, 1.0)}


def check_request(*, prompt, negative_prompt, steps, guidance_scale, height, width, seed, num_images, strength,
                  image, scheduler, scheduler_options) -> dict[str, Any]:
    """Validate the plain arguments of ``Runtime.generate``; returns the normalised ones (seed, guidance as float)."""
    _check_texts("prompt", prompt, allow_none=False)
    _check_texts("negative_prompt", negative_prompt, allow_none=True)
    whole_number("steps", steps, low=1, high=MAX_STEPS)
    whole_number("height", height, low=8)
    whole_number("width", width, low=8)
    whole_number("num_images", num_images, low=1)
    if seed is not None:
        whole_number("seed", seed, low=0, high=SEED_LIMIT - 1)
    guidance = real_number("guidance_scale", guidance_scale, low=0.0, high=MAX_GUIDANCE)
    if strength is not None:
        if image is None:
            raise ValueError("strength only applies to img2img and inpainting: pass an init image (image=..., CLI "
                             "--image) or drop strength")
        real_number("strength", strength, low=0.0, high=1.0)
    if not isinstance(scheduler, str):
        raise TypeError(f"scheduler must be a scheduler name such as 'dpmpp_2m', got {type(scheduler).__name__}")
    check_scheduler_options(scheduler_options, steps)
    return {"seed": None if seed is None else int(seed), "guidance_scale": guidance}


def whole_number(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """An int (bool and floats such as 1.9 refused, not truncated) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number (int), got {type(value).__name__} {value!r:.40}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def real_number(name: str, value, *, low: float, high: float) -> float:
    """A finite int or float within [low, high] (NaN, infinity, strings and bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value}")
    return value


def check_scheduler_options(options: Mapping[str, Any] | None, steps: int) -> None:
    """Bound the training-schedule options a caller may override; the scheduler checks names and other options."""
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise TypeError(f"scheduler_options must be a dict of scheduler config keys, got {type(options).__name__}")
    if "num_train_timesteps" in options:
        total = whole_number("scheduler_options['num_train_timesteps']", options["num_train_timesteps"], low=1,
                             high=MAX_TRAIN_TIMESTEPS)
        if steps > total:
            raise ValueError(f"steps={steps} is more than num_train_timesteps={total}; use fewer steps")
    for key, (low, high) in _FLOAT_OPTION_RANGES.items():
        if key in options:
            real_number(f"scheduler_options[{key!r}]", options[key], low=low, high=high)
    if "trained_betas" in options and options["trained_betas"] is not None:
        betas = options["trained_betas"]
        if not hasattr(betas, "__len__") or len(betas) > MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"scheduler_options['trained_betas'] must be a list of at most {MAX_TRAIN_TIMESTEPS} "
                             "betas")


def _check_texts(name: str, value, *, allow_none: bool) -> None:
    """A str or a non-empty list of str, each encodable as UTF-8; errors name the argument as the caller wrote it."""
    if value is None and allow_none:
        return
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, (list, tuple)) or not texts:
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}")
    for i, text in enumerate(texts):
        where = name if isinstance(value, str) else f"{name}[{i}]"
        if not isinstance(text, str):
            raise TypeError(f"{where} must be a string, got {type(text).__name__} {text!r:.40}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{where} is not valid Unicode text ({err.reason} at index {err.start}); decode it "
                             "with errors='replace' first") from None
