"""SDXL's ensemble of experts: the base denoises the first part of the schedule, the refiner the rest.

``generate(..., denoising_end=0.8, output_type="latent")`` on the base stops before the first timestep below
(1 - 0.8) x 1000 and returns the latents; ``generate(..., latents=those, denoising_start=0.8)`` on the refiner starts
at that timestep from those latents as they are (no noise added, no VAE encode), as diffusers'
StableDiffusionXLPipeline(denoising_end) + StableDiffusionXLImg2ImgPipeline(denoising_start) do. Both calls take the
same ``steps`` and scheduler. NumPy only.
"""

from __future__ import annotations

import numpy as np


def _cutoff(fraction: float, num_train_timesteps: int, name: str) -> int:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} must be a fraction strictly between 0 and 1 (e.g. 0.8), got {fraction!r}")
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def end_index(sampler, denoising_end: float | None, num_train_timesteps: int) -> int:
    """Index after the base's last step: the timesteps at or above the cutoff run (diffusers' denoising_end)."""
    timesteps = np.asarray(sampler.timesteps)
    if denoising_end is None:
        return len(timesteps)
    count = int((timesteps >= _cutoff(denoising_end, num_train_timesteps, "denoising_end")).sum())
    if count < 1:
        raise ValueError(f"denoising_end {denoising_end} leaves no denoising step; raise it or the steps")
    return count


def start_index(sampler, denoising_start: float, num_train_timesteps: int) -> int:
    """The refiner's first step: the timesteps below the cutoff run (diffusers' denoising_start; a second-order
    sampler keeps whole steps)."""
    timesteps = np.asarray(sampler.timesteps)
    count = int((timesteps < _cutoff(denoising_start, num_train_timesteps, "denoising_start")).sum())
    if sampler.order == 2 and count % 2 == 0:
        count += 1
    if count < 1:
        raise ValueError(f"denoising_start {denoising_start} leaves no denoising step; lower it or raise the steps")
    return len(timesteps) - count
