"""Tampered and corrupted engine directories (issue 16, defect 3): hashes verified at load (once per file, then
remembered), paths kept inside the engine directory, and the ONNX files' own I/O checked against the manifest."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from rtsd.cli import main
from rtsd.engine import verify
from rtsd.errors import EngineDirError
from rtsd.export.manifest import Manifest
from rtsd.runtime import Runtime


@pytest.fixture(autouse=True)
def _private_verify_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RTSD_CACHE_DIR", str(tmp_path / "verify-cache"))


@pytest.fixture
def engine_copy(tiny_engine_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_engine_dir, tmp_path / "engines"))


@pytest.fixture(scope="module")
def other_text_encoder(tmp_path_factory) -> Path:
    """text_encoder.onnx of another export: same family and I/O, other weights (seed 1)."""
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange
    from rtsd.models.synthetic import write_checkpoint

    work = tmp_path_factory.mktemp("other-export")
    checkpoint = write_checkpoint(work / "tiny-seed1.safetensors", "tiny", seed=1)
    out = export(checkpoint, work / "engines", shape_range=ShapeRange(min_size=128, max_size=256, opt_size=128, max_batch=2),
                 components=("text_encoder",), check=False, progress=None)
    return out / "text_encoder.onnx"


def _edit_manifest(engine_dir: Path, edit) -> None:
    path = engine_dir / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_zeroed_block_in_unet_is_refused_as_corrupted(engine_copy, capsys):
    unet = engine_copy / "unet.onnx"
    with open(unet, "r+b") as handle:
        handle.seek(unet.stat().st_size // 2)
        handle.write(b"\0" * 4096)
    with pytest.raises(EngineDirError, match=r"unet\.onnx corrupted or replaced: sha256 does not match the manifest"):
        Runtime(engine_copy, backend="onnxruntime")
    assert main(["generate", str(engine_copy), "p", "--size", "128x128", "--steps", "1", "--backend", "onnxruntime",
                 "-o", str(engine_copy.parent / "out.png")]) == 2
    err = capsys.readouterr().err
    assert "does not match the manifest" in err and "fp16" not in err and "Traceback" not in err


def test_text_encoder_from_another_export_is_refused(engine_copy, other_text_encoder):
    shutil.copyfile(other_text_encoder, engine_copy / "text_encoder.onnx")
    with pytest.raises(EngineDirError, match=r"text_encoder\.onnx corrupted or replaced"):
        Runtime(engine_copy, backend="onnxruntime")
    # The opt-out loads it: same family and I/O, so only the hash can tell.
    swapped = Runtime(engine_copy, backend="onnxruntime", verify=False)
    assert swapped.generate("a lighthouse", height=128, width=128, steps=1, seed=0).images


def test_random_bytes_onnx_says_corrupted_even_without_hash_check(engine_copy):
    decoder = engine_copy / "vae_decoder.onnx"
    decoder.write_bytes(np.random.default_rng(0).bytes(decoder.stat().st_size))
    with pytest.raises(EngineDirError, match=r"vae_decoder\.onnx corrupted or replaced"):
        Runtime(engine_copy, backend="onnxruntime")
    with pytest.raises(EngineDirError, match=r"vae_decoder\.onnx is corrupted \(not a readable ONNX model") as info:
        Runtime(engine_copy, backend="onnxruntime", verify=False)
    assert "fp16" not in str(info.value)


@pytest.mark.parametrize("where, value", [
    ("unet.onnx.file", "../unet.onnx"),
    ("unet.onnx.file", "/etc/passwd"),
    ("unet.onnx.file", "sub/../../unet.onnx"),
    ("unet.onnx.data_files", ["../../secrets.bin"]),
    ("tokenizer.directory", "/usr/share"),
    ("unet.engines", {"tensorrt": {"file": "..\\..\\x.plan"}}),
])
def test_manifest_paths_leaving_the_engine_dir_are_refused(engine_copy, where, value):
    def edit(data):
        if where == "tokenizer.directory":
            data["tokenizer"]["directory"] = value
        elif where == "unet.engines":
            data["components"]["unet"]["engines"] = value
        else:
            data["components"]["unet"]["onnx"][where.rsplit(".", 1)[1]] = value

    _edit_manifest(engine_copy, edit)
    with pytest.raises(EngineDirError, match="outside the engine directory"):
        Manifest.read(engine_copy)
    assert main(["info", str(engine_copy)]) == 2


def test_symlink_leading_out_of_the_engine_dir_is_refused(engine_copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(engine_copy / "unet.onnx", outside)
    (engine_copy / "unet.onnx").symlink_to(outside)
    with pytest.raises(EngineDirError, match="leads outside the engine directory"):
        Manifest.read(engine_copy)


def test_manifest_family_must_match_its_io_spec(engine_copy):
    def edit(data):  # claim another text width than the I/O spec (and the ONNX files) have
        data["model"]["unet"]["context_dim"] = 1024
        data["model"]["text_encoder"]["hidden_size"] = 1024

    _edit_manifest(engine_copy, edit)
    with pytest.raises(EngineDirError, match="is not what a sd1 model has"):
        Runtime(engine_copy, backend="onnxruntime", verify=False)


def test_manifest_io_must_match_the_onnx_files(engine_copy):
    width = json.loads((engine_copy / "manifest.json").read_text())["model"]["unet"]["context_dim"]

    def edit(data):  # model and I/O spec edited consistently: only the ONNX files can tell
        data["model"]["unet"]["context_dim"] = 2 * width
        data["model"]["text_encoder"]["hidden_size"] = 2 * width
        for name in ("unet", "text_encoder"):
            for tensor in data["components"][name]["io"]["inputs"] + data["components"][name]["io"]["outputs"]:
                if tensor["shape"][-1] == width:
                    tensor["shape"][-1] = 2 * width

    _edit_manifest(engine_copy, edit)
    with pytest.raises(EngineDirError, match=rf"does not match the manifest: .* axis [12] is {width} in the ONNX file, "
                                             rf"{2 * width} in the manifest"):
        Runtime(engine_copy, backend="onnxruntime", verify=False)


def test_fixed_onnx_dims_outside_the_shape_range_are_refused(engine_copy):
    onnx = pytest.importorskip("onnx")
    path = engine_copy / "vae_decoder.onnx"
    model = onnx.load(str(path))
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, 4, 8, 8)):  # a 64 px static export
        dim.dim_value = value
    onnx.save(model, str(path))
    with pytest.raises(EngineDirError, match=r"latent .* fixed to 8 in the ONNX file, outside the manifest's shape "
                                             r"range 16\.\.32"):
        Runtime(engine_copy, backend="onnxruntime", verify=False)


def test_verification_is_remembered_by_file_identity(engine_copy, monkeypatch):
    import rtsd.export.manifest

    hashed = []
    real = rtsd.export.manifest.sha256_file
    monkeypatch.setattr(rtsd.export.manifest, "sha256_file", lambda path, *a: hashed.append(Path(path).name) or real(path))
    manifest = Manifest.read(engine_copy)
    files = verify.hashed_files(manifest, "onnxruntime")
    assert {"unet.onnx", "text_encoder.onnx", "vae_decoder.onnx", "vae_encoder.onnx"} <= {Path(f).name for f, _ in files}
    assert any(f.startswith("tokenizer/") for f, _ in files)

    verify.verify_engine_dir(engine_copy, manifest, "onnxruntime")
    assert sorted(hashed) == sorted(Path(f).name for f, _ in files)  # first load: every file hashed once
    hashed.clear()
    verify.verify_engine_dir(engine_copy, manifest, "onnxruntime")
    assert hashed == []  # remembered
    assert verify.verified_files_cache().parent == Path(os.environ["RTSD_CACHE_DIR"])

    # Rewritten in place, same size, mtime set back: the ctime still tells, so it is hashed again and refused.
    unet = engine_copy / "unet.onnx"
    stat = unet.stat()
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))
    os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(EngineDirError, match=r"unet\.onnx corrupted or replaced"):
        verify.verify_engine_dir(engine_copy, manifest, "onnxruntime")
    assert hashed == ["unet.onnx"]


def test_a_broken_or_unwritable_cache_only_costs_hashing_again(engine_copy, monkeypatch, tmp_path):
    manifest = Manifest.read(engine_copy)
    cache = verify.verified_files_cache()
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    verify.verify_engine_dir(engine_copy, manifest, "onnxruntime")
    assert json.loads(cache.read_text())["version"] == verify.CACHE_VERSION
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("RTSD_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    verify.verify_engine_dir(engine_copy, manifest, "onnxruntime")


def test_tampered_tokenizer_is_refused(engine_copy):
    vocab = next(p for p in (engine_copy / "tokenizer").iterdir() if p.suffix == ".json")
    vocab.write_text(vocab.read_text().replace("a", "b", 1))
    with pytest.raises(EngineDirError, match="tokenizer/.* corrupted or replaced"):
        Runtime(engine_copy, backend="onnxruntime")


def test_a_fresh_export_is_loaded_without_hashing_again(tiny_checkpoint, tmp_path, monkeypatch):
    import rtsd.export.manifest
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange

    out = export(tiny_checkpoint, tmp_path / "fresh", shape_range=ShapeRange(min_size=128, max_size=128, opt_size=128),
                 components=("vae_decoder",), check=False, progress=None)
    hashed = []
    monkeypatch.setattr(rtsd.export.manifest, "sha256_file", lambda path, *a: hashed.append(path) or "")
    from types import SimpleNamespace

    data = json.loads((out / "manifest.json").read_text())  # one component: Manifest.read wants all four
    manifest = SimpleNamespace(components=data["components"], tokenizer=data["tokenizer"])
    verify.check_hashes(out, manifest, "onnxruntime")
    assert hashed == [] and len(verify.hashed_files(manifest, "onnxruntime")) >= 2  # the exporter hashed them


def test_non_finite_output_of_unverified_engines_names_damaged_files(tiny_engine_dir, monkeypatch):
    from rtsd.errors import NonFiniteOutputError

    for verify_files, hint in ((False, True), (True, False)):
        runtime = Runtime(tiny_engine_dir, backend="onnxruntime", verify=verify_files)
        monkeypatch.setattr(runtime.engines["vae_decoder"], "infer",
                            lambda feeds: {"images": np.full((1, 3, 128, 128), np.nan, np.float32)})
        with pytest.raises(NonFiniteOutputError) as info:
            runtime.generate("a", steps=1, height=128, width=128, seed=0)
        assert ("damaged engine files (loaded with --no-verify" in str(info.value)) is hint
