"""Full-size SD 1.5 layout: export with external data and UNet parity at 256x256 (slow: ~10+ min on 2 cores).

Run with: python -m pytest -m slow tests/test_sd15_export.py
"""

from __future__ import annotations

import pytest
import torch

from rtsd.export.parity import FP32_MAX_REL_L2, compare
from rtsd.export.specs import ShapeRange

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from rtsd.models.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("sd15") / "sd15.safetensors", preset="sd15", seed=0)


def test_sd15_unet_exports_with_external_data_and_matches_reference(sd15, tmp_path):
    import onnx

    from rtsd.engine.onnxruntime import OnnxRuntimeEngine
    from rtsd.engine.torch import TorchBackend
    from rtsd.export.onnx import export_component
    from rtsd.models import load_checkpoint

    models = load_checkpoint(sd15, dtype=torch.float32, device="cpu")
    files = export_component(models, "unet", tmp_path / "unet.onnx", ShapeRange())
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"]
    assert files[1].stat().st_size > 3_000_000_000  # 859.5M fp32 parameters live in the external file
    onnx.checker.check_model(str(files[0]))

    reference = TorchBackend(models).load(components=("unet",))["unet"]
    engine = OnnxRuntimeEngine("unet", files[0], reference.spec, ["CPUExecutionProvider"])
    feeds = reference.spec.sample_inputs(rows=2, height=256, width=256, seed=0)
    ours = engine.infer(feeds)["model_output"]
    expected = reference.to_host(reference.infer(feeds)["model_output"])
    metrics = compare(ours, expected)
    print(f"sd15 UNet 2x4x32x32: {metrics}")
    assert metrics.rel_l2 < FP32_MAX_REL_L2, metrics
