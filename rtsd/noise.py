"""Where a generation's random numbers come from: one generator for the whole request (``seed=``), or one per image
(``seeds=``), so that image i of a request equals the same prompt generated alone with ``seed=seeds[i]``.

Per-image seeds are what lets a server run several requests in one UNet call (each keeps its own seed's noise) and
what A1111 clients expect ("image i uses seed + i"). Both the initial noise and a stochastic sampler's per-step noise
are drawn image by image from that image's generator, in the same order a single-image generation draws them.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import numpy as np


class SeededNoise:
    def __init__(self, seed: int | None, seeds: Sequence[int] | None, n: int):
        if seeds is None:
            self.seed = secrets.randbelow(2**32) if seed is None else int(seed)
            self.seeds = None
            self._generators = [np.random.default_rng(self.seed)]
            return
        if seed is not None:
            raise ValueError("pass either seed= (one generator for all images) or seeds= (one per image), not both")
        seeds = [int(s) for s in seeds]
        if len(seeds) != n or any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be {n} non-negative integers, one per image, got {len(seeds)}")
        self.seed, self.seeds = seeds[0], seeds
        self._generators = [np.random.default_rng(s) for s in seeds]

    def draw(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 noise of ``shape`` (images first)."""
        if len(self._generators) == 1:
            return self._generators[0].standard_normal(shape, dtype=np.float32)
        return np.concatenate([g.standard_normal((1, *shape[1:]), dtype=np.float32) for g in self._generators])
