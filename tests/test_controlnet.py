"""ControlNet (issue 13): loading, the reference, the ControlNet and UNet engines, and the adapter rule.

Oracles: diffusers' ControlNetModel (``from_single_file`` on the LDM file, ``from_pretrained`` on a diffusers folder
that diffusers itself wrote) and diffusers' UNet2DConditionModel with ``down_block_additional_residuals`` /
``mid_block_additional_residual``, configured from literal published configs (tests/diffusers_oracle.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rtsd.cli import main
from rtsd.control_layout import residual_layout
from rtsd.controlnet_checkpoint import detect_controlnet, load_controlnet, open_controlnet
from rtsd.errors import CheckpointError, EngineDirError, UnsupportedModelError
from rtsd.export.controlnet import add_controlnets
from rtsd.export.manifest import CONTROLNET_FORMAT, FORMAT_VERSION, Manifest
from rtsd.export.specs import controlnet_spec, specs_for
from rtsd.models import load_checkpoint
from rtsd.models.synthetic import PRESETS, controlnet_parameter_count, controlnet_specs, write_controlnet
from rtsd.runtime import Runtime
from tests.diffusers_oracle import diffusers_controlnet, load_oracles
from tests.metrics import FP32_MAX_REL_L2, rel_l2

FAMILY = {"tiny": "sd15", "tiny-sd2": "sd21"}


@pytest.fixture(scope="module")
def sd2_engine_dir(tiny_sd2_engine_dir, controlnet_files, tmp_path_factory):
    target = tmp_path_factory.mktemp("cn-engines") / "tiny-sd2"
    shutil.copytree(tiny_sd2_engine_dir, target)
    return add_controlnets(target, [("edges", controlnet_files["sd2"])], progress=None)


def _inputs(config, rows=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = size // 8
    return (torch.randn(rows, 4, lat, lat, generator=g), torch.full((rows,), 617.0),
            torch.randn(rows, 77, config.unet.context_dim, generator=g), torch.rand(rows, 3, size, size, generator=g))


def _diffusers_residuals(model, sample, t, context, image, scale, guess_mode=False):
    with torch.inference_mode():
        down, mid = model(sample, t, context, image, conditioning_scale=scale, guess_mode=guess_mode,
                          return_dict=False)
    return [d.numpy() for d in down] + [mid.numpy()]


# ------------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2"])
def test_ldm_files_with_and_without_prefix_and_pth_load_like_diffusers_from_single_file(preset, tmp_path):
    path = write_controlnet(tmp_path / "cn.safetensors", preset, seed=4)
    bare = write_controlnet(tmp_path / "bare.safetensors", preset, seed=4, prefix="")
    pth = tmp_path / "cn.pth"
    torch.save(load_file(str(path)), pth)
    theirs = diffusers_controlnet(path, FAMILY[preset], tmp_path / "config")
    config = PRESETS[preset]
    sample, t, context, image = _inputs(config)
    expected = _diffusers_residuals(theirs, sample, t, context, image, 0.8)
    for file in (path, bare, pth):
        model, info = load_controlnet(file)
        assert info.family == config.family and info.unet == config.unet
        with torch.inference_mode():
            ours = model(sample, t, context, image, torch.full((13,), 0.8))
        assert len(ours) == len(expected) == 13
        for k, (a, b) in enumerate(zip(ours, expected)):
            assert rel_l2(a.numpy(), b) < 1e-5, f"{file.name} residual {k}"
    # the control image matters (the hint path is wired): another image moves every residual
    moved = _diffusers_residuals(theirs, sample, t, context, torch.rand_like(image), 0.8)
    assert min(rel_l2(a, b) for a, b in zip(moved, expected)) > 1e-3  # 100x the tolerance above


def test_diffusers_folder_loads_like_from_pretrained(tmp_path):
    from diffusers import ControlNetModel

    path = write_controlnet(tmp_path / "cn.safetensors", "tiny-sd2", seed=5)
    diffusers_controlnet(path, "sd21", tmp_path / "config").save_pretrained(tmp_path / "folder")
    theirs = ControlNetModel.from_pretrained(tmp_path / "folder", local_files_only=True).eval()
    model, info = load_controlnet(tmp_path / "folder")
    assert info.format == "diffusers" and info.family == "sd2"
    sample, t, context, image = _inputs(PRESETS["tiny-sd2"])
    expected = _diffusers_residuals(theirs, sample, t, context, image, 1.0, guess_mode=True)
    scales = torch.logspace(-1, 0, 13)  # diffusers' guess-mode ramp, from its formula in the test
    with torch.inference_mode():
        ours = model(sample, t, context, image, scales)
    for k, (a, b) in enumerate(zip(ours, expected)):
        assert rel_l2(a.numpy(), b) < 1e-5, f"residual {k}"


@pytest.mark.parametrize("preset,family,context", [("sd15", "sd1", 768), ("sd21", "sd2", 1024)])
def test_full_size_layout_detected_from_shapes_without_weights(preset, family, context):
    shapes = {s.key.removeprefix("control_model."): s.shape for s in controlnet_specs(preset)}
    unet, hint, detected = detect_controlnet(shapes)
    assert (detected, unet.context_dim, hint) == (family, context, 3)
    assert unet == PRESETS[preset].unet
    assert len(residual_layout(unet)) == 13
    if preset == "sd15":  # lllyasviel's control_v11p_sd15_* hold 361,279,120 parameters
        assert controlnet_parameter_count("sd15") == 361_279_120


def test_not_a_controlnet_is_one_line(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not a ControlNet") as info:
        open_controlnet(tiny_checkpoint)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------------ engines


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_controlnet_engine_matches_reference_and_diffusers(which, controlnet_engine_dir, sd2_engine_dir, controlnet_files, tmp_path):
    directory, component, file, family = ((controlnet_engine_dir, "controlnet.canny", controlnet_files["canny"], "sd15") if which == "sd1"
                                          else (sd2_engine_dir, "controlnet.edges", controlnet_files["sd2"], "sd21"))
    runtime = Runtime(directory, backend="onnxruntime")
    engine = runtime.engines[component]
    spec = engine.spec
    assert [t.name for t in spec.outputs] == [r.name for r in residual_layout(runtime.config.unet)]
    feeds = spec.sample_inputs(rows=2, height=128, width=192, seed=7)
    feeds["conditioning_scale"] = np.full(13, 0.75, np.float32)
    out = engine.infer(feeds)
    reference, _ = load_controlnet(file)
    theirs = diffusers_controlnet(file, family, tmp_path / "config")
    args = [torch.from_numpy(feeds[t.name]) for t in spec.inputs]
    with torch.inference_mode():
        ref = reference(*args)
    expected = _diffusers_residuals(theirs, *args[:4], 0.75)
    for k, t in enumerate(spec.outputs):
        assert rel_l2(out[t.name], ref[k].numpy()) < FP32_MAX_REL_L2, t.name
        assert rel_l2(ref[k].numpy(), expected[k]) < 1e-5, t.name
        assert rel_l2(out[t.name], expected[k]) < FP32_MAX_REL_L2, t.name


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_unet_with_residuals_matches_diffusers_additional_residuals(which, controlnet_engine_dir, sd2_engine_dir,
                                                                     tiny_checkpoint, tiny_sd2_checkpoint):
    directory, checkpoint, family = ((controlnet_engine_dir, tiny_checkpoint, "sd15") if which == "sd1"
                                     else (sd2_engine_dir, tiny_sd2_checkpoint, "sd21"))
    runtime = Runtime(directory, backend="onnxruntime")
    unet = runtime.engines["unet"]
    feeds = unet.spec.sample_inputs(rows=2, height=128, width=136, seed=8)  # 17 latent columns: odd residual sizes
    names = [r.name for r in residual_layout(runtime.config.unet)]
    ours = unet.infer(feeds)["model_output"]
    reference = load_checkpoint(checkpoint).unet
    oracle = load_oracles(checkpoint, family).unet
    sample, t, context = (torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states"))
    residuals = [torch.from_numpy(feeds[n]) for n in names]
    with torch.inference_mode():
        ref = reference(sample, t, context, down_residuals=residuals[:-1], mid_residual=residuals[-1]).numpy()
        theirs = oracle(sample, t, context, down_block_additional_residuals=tuple(residuals[:-1]),
                        mid_block_additional_residual=residuals[-1]).sample.numpy()
        plain = oracle(sample, t, context).sample.numpy()
    assert rel_l2(ours, ref) < FP32_MAX_REL_L2
    assert rel_l2(ref, theirs) < 1e-5
    assert rel_l2(ours, theirs) < FP32_MAX_REL_L2
    assert rel_l2(plain, theirs) > 1e-2  # the residuals move the output far past the tolerance
    zeros = {**feeds, **{n: np.zeros_like(feeds[n]) for n in names}}
    assert rel_l2(unet.infer(zeros)["model_output"], plain) < FP32_MAX_REL_L2  # zeros = the plain UNet


# ---------------------------------------------------------------------------------------------- adapter rule, manifest


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir() if p.is_file()
            and p.name != "manifest.json"}


def test_add_controlnet_leaves_every_other_engine_untouched(tiny_engine_dir, controlnet_files, tmp_path, capsys):
    target = tmp_path / "engines"
    shutil.copytree(tiny_engine_dir, target)
    before, manifest_before = _digests(target), json.loads((target / "manifest.json").read_text())
    assert main(["export", "--add-controlnet", str(target), f"canny={controlnet_files['canny']}"]) == 0
    after, manifest = _digests(target), json.loads((target / "manifest.json").read_text())
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == ["controlnet.canny.onnx"]
    assert {k: v for k, v in manifest["components"].items() if k != "controlnet.canny"} == manifest_before["components"]
    record = manifest["components"]["controlnet.canny"]
    assert record["controlnet"]["family"] == "sd1" and record["parity"]["passed"]
    assert record["profile"]["control_image"]["max"] == [4, 3, 256, 256]  # max batch 2 x CFG, max size
    assert record["profile"]["conditioning_scale"]["min"] == [13]
    assert manifest["format_version"] == FORMAT_VERSION
    # the same name again is refused in one line, and exit status 2
    assert main(["export", "--add-controlnet", str(target), f"canny={controlnet_files['canny']}"]) == 2
    assert "already has ControlNet" in capsys.readouterr().err


def test_family_mismatch_is_one_line_before_anything_is_written(controlnet_engine_dir, controlnet_files, capsys):
    before = _digests(controlnet_engine_dir)
    assert main(["export", "--add-controlnet", str(controlnet_engine_dir), f"edges={controlnet_files['sd2']}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "SD 2.x ControlNet (context width 128)" in err and "model is SD 1.x" in err
    assert _digests(controlnet_engine_dir) == before
    with pytest.raises(UnsupportedModelError, match="SD 2.x ControlNet"):
        from rtsd.export.controlnet import load_for

        load_for(Manifest.read(controlnet_engine_dir).model, [("edges", controlnet_files["sd2"])])


def test_manifest_records_controlnets_and_contract(controlnet_engine_dir):
    manifest = Manifest.read(controlnet_engine_dir)
    assert manifest.format_version == CONTROLNET_FORMAT
    unet = manifest.spec("unet")
    assert [t.name for t in unet.inputs[3:]] == [r.name for r in residual_layout(manifest.model.unet)]
    assert manifest.spec("controlnet.depth").to_dict() == controlnet_spec(manifest.model, "controlnet.depth").to_dict()
    assert unet.to_dict() == specs_for(manifest.model, manifest.shape_range)["unet"].to_dict()


def test_parity_command_checks_controlnets(controlnet_engine_dir, tiny_checkpoint, controlnet_files, capsys):
    code = main(["parity", str(controlnet_engine_dir), "--checkpoint", str(tiny_checkpoint), "--steps", "1",
                 "--controlnet", f"canny={controlnet_files['canny']}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "controlnet.canny" in out and "controlnet.depth" in out  # depth: the file recorded at export


def test_format3_directory_generates_but_refuses_controlnet(tiny_engine_dir, tiny_checkpoint, controlnet_files, tmp_path):
    """An engine directory written before ControlNet (format 3: a UNet without residual inputs) still runs the plain
    path; ControlNet requests and --add-controlnet are refused in one line that says to re-export."""
    from tests.legacy_unet import replace_with_plain_unet

    target = tmp_path / "old"
    shutil.copytree(tiny_engine_dir, target)
    replace_with_plain_unet(target, tiny_checkpoint)
    data = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**data, "format_version": 3}))
    runtime = Runtime(target, backend="onnxruntime")
    image = runtime.generate("a cat", steps=2, height=128, width=128, seed=0).images[0]
    assert image.size == (128, 128)
    with pytest.raises(ValueError, match="before ControlNet support .* re-export"):
        runtime.generate("a cat", steps=2, height=128, width=128, controlnets=[("canny", np.zeros((128, 128, 3)))])
    with pytest.raises(EngineDirError, match="before ControlNet support .* re-export"):
        add_controlnets(target, [("canny", controlnet_files["canny"])], progress=None)


@pytest.mark.slow
def test_full_size_sd15_controlnet_file_matches_diffusers(tmp_path):
    """The full-size SD 1.5 ControlNet layout written to disk (1.4 GB fp32) loads in rtsd and in diffusers'
    from_single_file with the published config, and both give the same 13 residuals at 256 px."""
    path = write_controlnet(tmp_path / "control_sd15.safetensors", "sd15", seed=6)
    model, info = load_controlnet(path)
    assert sum(p.numel() for p in model.parameters()) == 361_279_120 and info.family == "sd1"
    theirs = diffusers_controlnet(path, "sd15", tmp_path / "config")
    sample, t, context, image = _inputs(PRESETS["sd15"], rows=1, size=256)
    expected = _diffusers_residuals(theirs, sample, t, context, image, 1.0)
    with torch.inference_mode():
        ours = model(sample, t, context, image, torch.ones(13))
    for k, (a, b) in enumerate(zip(ours, expected)):
        assert rel_l2(a.numpy(), b) < 1e-5, f"residual {k}"


def test_export_refuses_a_controlnet_of_another_family_before_exporting(tiny_checkpoint, controlnet_files, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--output", str(out),
                 "--controlnet", f"edges={controlnet_files['sd2']}"]) == 2
    err = capsys.readouterr()
    assert "SD 2.x ControlNet" in err.err and "exporting" not in err.out  # nothing was exported
    assert not out.exists() and not list(tmp_path.glob(".engines*"))
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--output", str(out), "--controlnet", "no-path"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_export_with_controlnets_writes_checked_engines(tiny_checkpoint, controlnet_files, tmp_path):
    out = tmp_path / "engines"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--output", str(out), "--min-size", "128",
                 "--max-size", "256", "--opt-size", "128", "--max-batch", "2", "--controlnet", f"canny={controlnet_files['canny']}",
                 "--controlnet", f"depth={controlnet_files['depth']}"]) == 0
    manifest = Manifest.read(out)
    for name in ("controlnet.canny", "controlnet.depth"):
        assert manifest.components[name]["parity"]["passed"]
    runtime = Runtime(out, backend="onnxruntime")
    image = np.zeros((128, 128, 3), np.uint8)
    runtime.generate("a", steps=2, height=128, width=128, controlnets=[("canny", image), ("depth", image, 0.5)])


def test_original_full_model_controlnet_file_uses_only_its_control_model(tiny_checkpoint, tmp_path):
    """control_sd15_*.pth (the first release) hold a whole SD model beside control_model.*: only the latter is read."""
    from safetensors.torch import save_file

    cn = write_controlnet(tmp_path / "cn.safetensors", "tiny", seed=9)
    merged = {**load_file(str(tiny_checkpoint)), **load_file(str(cn))}
    save_file(merged, tmp_path / "control_sd15_tiny.safetensors")
    model, info = load_controlnet(tmp_path / "control_sd15_tiny.safetensors")
    alone, _ = load_controlnet(cn)
    assert info.family == "sd1" and len(info.shapes) == len(alone.state_dict())
    for key, value in alone.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
