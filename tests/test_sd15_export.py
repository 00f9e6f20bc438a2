"""Full-size SD 1.5 layout: the UNet exports with external data and its ONNX Runtime engine matches the reference at
256x256. About 2 minutes and 11 GB of RAM on 2 cores, so it runs in the default suite; the large files are deleted
as soon as the test ends.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from rtsd.export.specs import ShapeRange
from tests.metrics import FP32_MAX_REL_L2, rel_l2


@pytest.fixture
def sd15(tmp_path):
    from rtsd.models.synthetic import write_checkpoint

    # fp16 on disk halves the file; the reference and the export still run in fp32.
    path = write_checkpoint(tmp_path / "sd15.safetensors", preset="sd15", seed=0, dtype=torch.float16)
    yield path
    shutil.rmtree(tmp_path, ignore_errors=True)  # ~6 GB of checkpoint and ONNX data


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
    error = rel_l2(ours, expected)
    print(f"sd15 UNet 2x4x32x32: rel_l2 {error:.2e}")
    assert error < FP32_MAX_REL_L2, error
