"""Shared fixtures. Synthetic checkpoints are written once per test session (random weights, real key layout)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a ``tiny`` preset single-file checkpoint (SD 1.x layout, seed 0, fp32)."""
    from rtsd.models.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny.safetensors", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_checkpoint(tmp_path_factory):
    """Path of a ``tiny-sd2`` preset single-file checkpoint (SD 2.x layout: OpenCLIP, linear proj, 64-wide heads)."""
    from rtsd.models.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-sd2.safetensors", "tiny-sd2", seed=0)
