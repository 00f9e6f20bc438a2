"""ControlNet through the TensorRT backend, with TensorRT's execution replaced by the stand-in (tests/tensorrt_sim.py):
residuals stay on the device, several ControlNets drive one UNet graph per shape, and the ControlNet engine's
profiles come from its spec on the CPU. TensorRT itself does not run here."""

from __future__ import annotations

import numpy as np
import pytest

from rtsd.config import ModelConfig
from rtsd.control_layout import residual_names
from rtsd.engine import tensorrt as trt_backend
from rtsd.export.specs import ShapeRange, controlnet_spec
from rtsd.export.tensorrt import engine_profile
from rtsd.runtime import Runtime
from tests.tensorrt_sim import (DevArray, HostStandIn, SimCupy, SimTensorRT, controlnet_compute,
                                generate_with_latents, write_sim_engine_dir)

SD15 = ModelConfig("sd1")
RANGE = ShapeRange(min_size=64, max_size=128, opt_size=64, max_batch=2)
NAMES = ("canny", "depth")


def test_controlnet_profiles_are_computed_from_the_spec():
    spec = controlnet_spec(SD15, "controlnet.canny")
    profile = {name: {k: tuple(v) for k, v in corners.items()} for name, corners in engine_profile(
        spec, ShapeRange(min_size=256, max_size=1024, opt_size=512, max_batch=4)).items()}
    assert profile["control_image"] == {"min": (1, 3, 256, 256), "opt": (2, 3, 512, 512), "max": (8, 3, 1024, 1024)}
    assert profile["sample"]["max"] == (8, 4, 128, 128)
    assert profile["encoder_hidden_states"]["max"] == (8, 231, 768)
    assert profile["conditioning_scale"] == {k: (13,) for k in ("min", "opt", "max")}
    assert [t.name for t in spec.outputs] == residual_names(SD15.unet)
    static = engine_profile(spec, ShapeRange.fixed(2, 512, 512))
    assert list(static["control_image"]["min"]) == list(static["control_image"]["max"]) == [4, 3, 512, 512]  # CFG rows
    shapes = spec.shapes(2, 520, 520)  # 65 latent pixels: the deeper levels round up
    assert [shapes[n][2] for n in ("down_residual_0", "down_residual_3", "down_residual_6", "mid_residual")] == \
        [65, 33, 17, 9]


@pytest.fixture
def runtimes(monkeypatch, tmp_path):
    cp = SimCupy()
    compute = controlnet_compute(NAMES)
    trt = SimTensorRT(SD15, RANGE, compute=compute, cupy=cp, controlnets=NAMES)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda purpose: trt)
    monkeypatch.setattr(trt_backend, "cuda_device", lambda purpose, device=0: (cp, "Sim GPU", "9.0"))
    write_sim_engine_dir(tmp_path, SD15, RANGE, "Sim GPU", "9.0", overflow=(), controlnets=NAMES)
    device = Runtime(tmp_path, backend=trt_backend.TensorRTBackend())
    host = Runtime(tmp_path, backend=HostStandIn(SD15, compute, controlnets=NAMES))
    return device, host


def _control(seed):
    return np.random.default_rng(seed).random((64, 64, 3), dtype=np.float32)


REQUESTS = {
    "none": {},
    "one": dict(controlnets=[("canny", _control(1), 0.8)]),
    "two": dict(controlnets=[("canny", _control(1), 0.8), ("depth", _control(2), 0.5)]),
    "guess": dict(controlnets=[("canny", _control(1), 1.0), ("depth", _control(2), 0.3)], guess_mode=True,
                  control_guidance_end=[1.0, 0.5]),
}


def test_controlnet_loop_stays_on_the_device_and_equals_the_host_loop(runtimes):
    device, host = runtimes
    unet = device.engines["unet"]
    fed = []
    infer = unet.infer

    def recording(feeds):
        fed.append({n: type(feeds[n]) for n in residual_names(SD15.unet)})
        return infer(feeds)

    unet.infer = recording
    base = dict(prompt="a house", negative_prompt="blurry", steps=5, height=64, width=64, seed=3, scheduler="euler")
    results = {}
    for name, extra in REQUESTS.items():
        latents, images, kind = generate_with_latents(device, np.asarray, **base, **extra)
        expected, _, _ = generate_with_latents(host, np.asarray, **base, **extra)
        assert kind is DevArray
        np.testing.assert_array_equal(latents, expected)
        results[name] = latents
    # every residual the UNet got was a device array: summed, scaled and zero-padded on the device
    assert fed and all(kind is DevArray for step in fed for kind in step.values())
    # the ControlNets change the result, and the combinations differ from each other
    for a, b in [("none", "one"), ("one", "two"), ("two", "guess")]:
        assert np.abs(results[a] - results[b]).max() > 1e-3, (a, b)
    # one UNet graph for the shape, whatever number of ControlNets ran (0, 1 or 2): the residual inputs are fixed
    assert unet.graphs.captures == 1 and unet.last_run == "replayed"
    assert device.engines["controlnet.canny"].graphs.captures == 2  # CFG rows (4) and guess mode's conditional rows (2)


def test_sum_of_two_controlnets_is_what_the_unet_receives(runtimes):
    """Residual feeds of one step, two ControlNets: exactly scale_a * f(a) + scale_b * f(b), on the device."""
    device, _ = runtimes
    seen = []
    infer = device.engines["unet"].infer
    device.engines["unet"].infer = lambda feeds: (seen.append({k: np.array(v) for k, v in feeds.items()}),
                                                   infer(feeds))[1]
    a, b = _control(1), _control(2)
    device.generate("x", steps=1, height=64, width=64, seed=0, scheduler="euler", guidance_scale=1.0,
                    controlnets=[("canny", a, 0.8), ("depth", b, 0.5)])
    feeds = seen[0]
    sample = feeds["sample"][:, 0, 0, 0]
    expected = 0.8 * (a[0, 0, 0] + sample) + 0.5 * (b[0, 0, 0] + sample)
    np.testing.assert_allclose(feeds["mid_residual"][:, 0, 0, 0], expected, rtol=1e-6)
