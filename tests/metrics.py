"""Agreement metrics computed by the tests themselves (not rtsd.export.parity's), so that a bug in rtsd's metric
cannot hide a bug in a model. Both are a few lines of float64 NumPy.

Gates: what the arithmetic gives. An fp32 ONNX Runtime generation of the tiny models agrees with diffusers' float32
pipeline at 85-97 dB (8-bit images compared as delivered; measured 2026-12-03 on tests/test_export_runtime.py and
tests/test_sd2_runtime.py), while real errors land far lower: steps_offset 0 instead of SD's 1 gave 42.3 dB (it
passed the old 40 dB gate), "trailing" instead of "leading" timestep spacing 31.6 dB, and the audit of issue 18
measured guidance 7.0 vs 7.5 at 40.5 dB. 55 dB separates the two. fp16 keeps DESIGN.md's 30 dB end to end.
"""

from __future__ import annotations

import numpy as np

FP32_END_TO_END_DB = 55.0
FP16_END_TO_END_DB = 30.0
FP32_MAX_REL_L2 = 1e-4  # DESIGN.md: fp32 ONNX vs the reference, per sub-model
FP16_MIN_COSINE = 0.999  # DESIGN.md: fp16 engines vs the fp32 reference, per sub-model


def psnr(actual, expected, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``actual`` against ``expected`` (same shape, values in [0, peak])."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    mse = float(np.mean((actual - expected) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def image_psnr(ours, theirs) -> float:
    """PSNR of an rtsd PIL image (uint8) against a diffusers ``output_type="np"`` image (float in [0, 1]) turned
    into 8 bits as diffusers' own ``numpy_to_pil`` does: both sides as delivered, so that the 8-bit rounding
    (~59 dB between a float image and its 8-bit copy) does not cap what the comparison can see."""
    theirs8 = np.round(np.asarray(theirs, np.float64) * 255.0).astype(np.uint8)
    return psnr(np.asarray(ours, np.float64), theirs8.astype(np.float64), peak=255.0)


def rel_l2(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.isfinite(actual).all()
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def cosine(actual, expected) -> float:
    """Cosine similarity of the flattened arrays, in float64."""
    a, b = np.asarray(actual, np.float64).ravel(), np.asarray(expected, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
