"""Shared fixtures. Synthetic checkpoints are written once per test session (random weights, real key layout)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def verification_cache(tmp_path_factory):
    """Engine verification remembers hashed files in the user's cache; tests keep that record in their own folder
    (subprocesses started by tests inherit it), never in the home directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RTSD_CACHE_DIR", str(tmp_path_factory.mktemp("rtsd-cache")))
    yield
    mp.undo()


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


# One export per family per session: ONNX export of the tiny models takes tens of seconds on 2 cores.
EXPORT_RANGE = dict(min_size=128, max_size=256, opt_size=128, max_batch=2)


@pytest.fixture(scope="session")
def tiny_engine_dir(tiny_checkpoint, tmp_path_factory):
    """An fp32 ONNX engine directory of the tiny SD 1.x checkpoint (sizes 128..256, up to 2 images per call)."""
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange

    return export(tiny_checkpoint, tmp_path_factory.mktemp("engines") / "tiny", shape_range=ShapeRange(**EXPORT_RANGE),
                  progress=None)


@pytest.fixture(scope="session")
def tiny_sd2_engine_dir(tiny_sd2_checkpoint, tmp_path_factory):
    """The same for tiny-sd2, exported as a v-prediction model (what SD 2.x 768-v checkpoints are)."""
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange

    return export(tiny_sd2_checkpoint, tmp_path_factory.mktemp("engines") / "tiny-sd2",
                  shape_range=ShapeRange(**EXPORT_RANGE), prediction_type="v_prediction", progress=None)


@pytest.fixture(scope="session")
def controlnet_files(tmp_path_factory):
    """Tiny random-weight ControlNets in the LDM layout: "canny" and "depth" (SD 1.x), "sd2" (SD 2.x)."""
    from rtsd.models.synthetic import write_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {"canny": write_controlnet(root / "canny.safetensors", "tiny", seed=1),
            "depth": write_controlnet(root / "depth.safetensors", "tiny", seed=2),
            "sd2": write_controlnet(root / "sd2.safetensors", "tiny-sd2", seed=3)}


@pytest.fixture(scope="session")
def controlnet_engine_dir(tiny_engine_dir, controlnet_files, tmp_path_factory):
    """A copy of the tiny engine directory with the canny and depth ControlNets added (the adapter path); tests only
    read it."""
    import shutil

    from rtsd.export.controlnet import add_controlnets

    target = tmp_path_factory.mktemp("cn-engines") / "tiny"
    shutil.copytree(tiny_engine_dir, target)
    return add_controlnets(target, [(name, controlnet_files[name]) for name in ("canny", "depth")], progress=None)


@pytest.fixture(scope="session")
def tiny_inpaint_checkpoint(tmp_path_factory):
    """Path of a ``tiny-inpaint`` preset checkpoint: ``tiny`` with a 9-input-channel (inpainting) UNet."""
    from rtsd.models.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-inpaint.safetensors", "tiny-inpaint", seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint_engine_dir(tiny_inpaint_checkpoint, tmp_path_factory):
    """An fp32 ONNX engine directory of the tiny inpainting checkpoint (same range as ``tiny_engine_dir``)."""
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange

    return export(tiny_inpaint_checkpoint, tmp_path_factory.mktemp("engines") / "tiny-inpaint",
                  shape_range=ShapeRange(**EXPORT_RANGE), progress=None)
