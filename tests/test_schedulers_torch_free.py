"""rtsd.schedulers must import and run with torch (and diffusers, which needs it) unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = ("torch", "diffusers", "transformers", "scipy")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())

    import numpy as np
    from rtsd.schedulers import available, create

    names = available()
    assert {"ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "lcm"} <= set(names), names
    rng = np.random.default_rng(0)
    for name in names:
        s = create(name, 6, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32) * s.init_noise_sigma
        for i in range(len(s.timesteps)):
            eps = np.tanh(s.scale_model_input(x, i))
            noise = rng.standard_normal(x.shape, dtype=np.float32) if s.stochastic else None
            x = s.step(eps, i, x, noise=noise)
        assert x.dtype == np.float32 and np.isfinite(x).all(), name
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ran", len(names), "schedulers")
    """
)


def test_schedulers_run_without_torch():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr
    assert "ran" in result.stdout
