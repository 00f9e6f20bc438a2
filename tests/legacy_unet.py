"""Engine directories as rtsd wrote them before ControlNet (formats 1-3): a UNet without residual inputs.

Fixtures that turn a current export into an older format call ``replace_with_plain_unet`` first: it re-exports the
UNet from the reference without the residual inputs (one .onnx, no weights map, as those formats had) and records it
in manifest.json the way those exports did.
"""

from __future__ import annotations

import json
from pathlib import Path


def replace_with_plain_unet(directory: Path, checkpoint: Path) -> None:
    from rtsd.export.manifest import Manifest, sha256_file
    from rtsd.export.onnx import component_module, export_module
    from rtsd.export.specs import specs_for
    from rtsd.models import load_checkpoint

    manifest = Manifest.read(directory)
    spec = specs_for(manifest.model, manifest.shape_range, control_residuals=False)["unet"]
    for name in ("unet.onnx", "unet.onnx.data"):
        (directory / name).unlink(missing_ok=True)
    export_module(component_module(load_checkpoint(checkpoint), "unet"), spec, directory / "unet.onnx",
                  manifest.shape_range)
    data = json.loads((directory / "manifest.json").read_text())
    record = data["components"]["unet"]
    record.pop("weights_map", None)
    record["onnx"].update(file="unet.onnx", data_files=[], sha256=sha256_file(directory / "unet.onnx"),
                          data_sha256={})
    record["io"] = spec.to_dict()
    record["profile"] = {name: {k: list(v) for k, v in corners.items()}
                         for name, corners in spec.profile(manifest.shape_range).items()}
    (directory / "manifest.json").write_text(json.dumps(data, indent=2))
