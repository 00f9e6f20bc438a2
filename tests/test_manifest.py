"""The engine-directory manifest: round trip, refusal of unknown format versions and incomplete directories."""

import json

import pytest

from rtsd.config import ModelConfig
from rtsd.errors import EngineDirError
from rtsd.export.manifest import FORMAT_VERSION, Manifest
from rtsd.export.specs import ShapeRange, specs_for


def _manifest() -> Manifest:
    config = ModelConfig("sd1")
    components = {name: {"onnx": {"file": f"{name}.onnx", "data_files": [], "sha256": "0" * 64, "precision": "fp32"},
                         "io": spec.to_dict(), "profile": {}, "engines": {}}
                  for name, spec in specs_for(config).items()}
    return Manifest(model=config, shape_range=ShapeRange(), source={"checkpoint": "x.safetensors", "sha256": "ab"},
                    tokenizer={"directory": "tokenizer", "max_length": 77, "pad_token_id": 49407}, components=components)


def test_round_trip(tmp_path):
    _manifest().write(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format_version"] == FORMAT_VERSION and data["scheduler"]["beta_schedule"] == "scaled_linear"
    back = Manifest.read(tmp_path)
    assert back.model == ModelConfig("sd1") and back.shape_range == ShapeRange()
    assert back.spec("unet") == specs_for(ModelConfig("sd1"))["unet"]


def test_unknown_format_version_is_refused_with_the_fix(tmp_path):
    _manifest().write(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineDirError, match="format_version 99.*re-export"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON"), ('{"format_version": 1}', "incomplete")])
def test_corrupt_manifest(tmp_path, content, match):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(EngineDirError, match=match):
        Manifest.read(tmp_path)


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(EngineDirError, match="does not exist.*rtsd export"):
        Manifest.read(tmp_path / "nope")
    with pytest.raises(EngineDirError, match="no manifest.json"):
        Manifest.read(tmp_path)


def test_missing_files_are_listed(tmp_path):
    manifest = _manifest()
    manifest.write(tmp_path)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "unet.onnx").write_bytes(b"")
    with pytest.raises(EngineDirError, match="missing text_encoder.onnx, vae_decoder.onnx, vae_encoder.onnx"):
        manifest.check_files(tmp_path)
