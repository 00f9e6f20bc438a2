"""Reading checkpoints: every format gives the same LDM keys, shapes and tensors; bad input fails in one clear line.

The reference is a diffusers folder saved from small random-weight diffusers/transformers models: the LDM state dict
rtsd reads from it must map back, through diffusers' own LDM converters, to exactly those models' state dicts. Every
single-file format is then written from that state dict and must read back identically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.optional import require

torch = require("torch")
require("diffusers")
require("transformers")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from rtsd.checkpoint import detect_config, open_checkpoint, read_prediction_type, summarize  # noqa: E402
from rtsd.errors import CheckpointError, UnsupportedModelError  # noqa: E402

TINY_UNET = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1)
SCHEDULE_BUFFERS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
]  # fmt: skip
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _randomize(model, generator):
    # diffusers zero-initialises some layers; random values everywhere make every key's mapping observable.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def models():
    generator = torch.Generator().manual_seed(0)
    unet = _randomize(UNet2DConditionModel(**TINY_UNET), generator)
    vae = _randomize(AutoencoderKL(**TINY_VAE), generator)
    text = _randomize(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), generator)
    return unet, vae, text


def write_diffusers_folder(folder: Path, models, prediction_type: str = "epsilon") -> Path:
    unet, vae, text = models
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction_type}))
    return folder


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("diffusers"), models)


@pytest.fixture(scope="module")
def reference(folder):
    """The LDM state dict read from the diffusers folder (checked against diffusers' converters below)."""
    return open_checkpoint(folder).tensors()


def shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def assert_equal_states(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


# -------------------------------------------------------------------------------------------------- diffusers folder


def test_diffusers_folder_maps_back_exactly_through_diffusers_converters(folder, models):
    unet, vae, text = models
    checkpoint = open_checkpoint(folder)
    state = checkpoint.tensors()
    assert checkpoint.format == "diffusers"
    assert checkpoint.shapes == shapes_of(state)
    assert set(checkpoint.dtypes.values()) == {"float32"}
    assert_equal_states(sfu.convert_ldm_unet_checkpoint(state, dict(unet.config)), unet.state_dict())
    assert_equal_states(sfu.convert_ldm_vae_checkpoint(state, dict(vae.config)), vae.state_dict())
    clip = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(state).items()}
    assert_equal_states(clip, text.state_dict())
    # LDM's VAE attention is 1x1 conv: the Linear weights come back 4-D.
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)


def test_diffusers_folder_with_classic_text_model_names(tmp_path, models, reference):
    """Folders written by transformers < 5.6 prefix the text encoder with text_model. and carry position_ids."""
    folder = write_diffusers_folder(tmp_path / "classic", models)
    state = {"text_model." + k: v.contiguous() for k, v in models[2].state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, folder / "text_encoder" / "model.safetensors")
    assert_equal_states(open_checkpoint(folder).tensors(), reference)


def test_diffusers_folder_with_bin_weights_and_fp16_variant(tmp_path, models, reference):
    folder = write_diffusers_folder(tmp_path / "bin", models)
    unet_dir = folder / "unet"
    state = models[0].state_dict()
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    vae_dir = folder / "vae"
    (vae_dir / "diffusion_pytorch_model.safetensors").rename(vae_dir / "diffusion_pytorch_model.fp16.safetensors")
    assert_equal_states(open_checkpoint(folder).tensors(), reference)


# ------------------------------------------------------------------------------------------------ single-file formats


def _extras() -> dict:
    """What real single-file checkpoints carry beside the model: EMA copies, schedule buffers, position_ids."""
    extras = {name: torch.rand(1000) for name in SCHEDULE_BUFFERS}
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    extras["model_ema.diffusion_modelinput_blocks00weight"] = torch.rand(32, 4, 3, 3)
    extras[POSITION_IDS] = torch.arange(77)[None]
    extras["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)  # SD 2.x files carry OpenCLIP's
    return extras


def _write(kind: str, state: dict, path: Path) -> Path:
    if kind == "safetensors-fp32":
        save_file(state, path.with_suffix(".safetensors"))
    elif kind in ("safetensors-fp16", "safetensors-bf16"):
        dtype = torch.float16 if kind.endswith("fp16") else torch.bfloat16
        save_file({k: v.to(dtype) for k, v in state.items()}, path.with_suffix(".safetensors"))
    elif kind == "safetensors-ema-and-buffers":
        save_file({**state, **_extras()}, path.with_suffix(".safetensors"))
    elif kind == "safetensors-legacy-names":
        # Old CLIP naming without text_model., and VAE attention stored as Linear (2-D) by some converters.
        legacy = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
        for key in [k for k in legacy if ".mid.attn_1." in k and k.endswith(("q.weight", "proj_out.weight"))]:
            legacy[key] = legacy[key][:, :, 0, 0].contiguous()
        save_file(legacy, path.with_suffix(".safetensors"))
    elif kind == "ckpt":
        torch.save(state, path.with_suffix(".ckpt"))
    elif kind == "ckpt-state-dict-wrapper":
        wrapped = {"state_dict": {**state, **_extras()}, "global_step": 470000, "epoch": 6}
        torch.save(wrapped, path.with_suffix(".ckpt"))
    elif kind == "pt-legacy-serialization":
        torch.save(state, path.with_suffix(".pt"), _use_new_zipfile_serialization=False)
    elif kind == "pth":
        torch.save({"state_dict": state}, path.with_suffix(".pth"))
    written = [p for p in path.parent.iterdir() if p.stem == path.name]
    assert len(written) == 1
    return written[0]


FORMATS = [
    "safetensors-fp32", "safetensors-fp16", "safetensors-bf16", "safetensors-ema-and-buffers",
    "safetensors-legacy-names", "ckpt", "ckpt-state-dict-wrapper", "pt-legacy-serialization", "pth",
]  # fmt: skip


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_reads_the_same_keys_shapes_and_tensors(kind, reference, tmp_path):
    path = _write(kind, reference, tmp_path / "model")
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == ("safetensors" if path.suffix == ".safetensors" else "pickle")
    assert checkpoint.shapes == shapes_of(reference)
    stored = {"safetensors-fp16": torch.float16, "safetensors-bf16": torch.bfloat16}.get(kind, torch.float32)
    assert set(checkpoint.dtypes.values()) == {str(stored).removeprefix("torch.")}
    tensors = checkpoint.tensors()
    assert {v.dtype for v in tensors.values()} == {stored}
    assert_equal_states(tensors, {k: v.to(stored) for k, v in reference.items()})
    as_fp32 = checkpoint.tensors(dtype=torch.float32)
    assert_equal_states(as_fp32, {k: v.to(stored).float() for k, v in reference.items()})


def test_sha256_is_of_the_file_bytes(reference, folder, tmp_path, monkeypatch):
    import rtsd.checkpoint

    path = _write("safetensors-fp32", reference, tmp_path / "model")
    checkpoint = open_checkpoint(path)
    first = checkpoint.sha256()
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    # Hashed once per Checkpoint: a second call reads no file (multi-GB checkpoints are hashed by export and info).
    monkeypatch.setattr(rtsd.checkpoint, "open", lambda *a, **k: pytest.fail("sha256 read the file again"),
                        raising=False)
    assert checkpoint.sha256() == first
    monkeypatch.undo()
    weights = sorted(folder.glob("*/*.safetensors"))
    assert len(weights) == 3
    expected = hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()
    assert open_checkpoint(folder).sha256() == expected


def test_summarize_counts_match_the_diffusers_models(models, reference, tmp_path):
    unet, vae, text = models
    path = _write("safetensors-fp16", reference, tmp_path / "model")
    info = summarize(open_checkpoint(path))
    assert info["family"] == "sd1" and info["format"] == "safetensors" and not info["inpainting"]
    assert info["dtypes"] == ["float16"]
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        state = model.state_dict()
        assert info["components"][name] == {
            "parameters": sum(t.numel() for t in state.values()),
            "tensors": len(state),
        }, name
    assert info["tensors"] == len(unet.state_dict()) + len(vae.state_dict()) + len(text.state_dict())
    assert info["prediction_type"] == "epsilon" and info["prediction_type_source"].startswith("default")
    assert info["config"]["unet"]["context_dim"] == 32
    json.dumps(info)  # `rtsd info --json` prints it as is


def test_reading_shapes_needs_no_torch(reference, tmp_path):
    path = _write("safetensors-fp32", reference, tmp_path / "model")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import rtsd.checkpoint as c\n"
        f"ck = c.open_checkpoint({str(path)!r})\n"
        "print(len(ck.shapes), c.summarize(ck)['family'])\n"
        "try:\n    ck.tensors()\nexcept c.MissingDependencyError as e:\n    print('refused:', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines()[0] == f"{len(reference)} sd1"
    assert out.splitlines()[1].startswith("refused: Loading checkpoint tensors needs 'torch'")


# ------------------------------------------------------------------------------------------------------- bad input


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found") as excinfo:
        open_checkpoint(tmp_path / "nope.safetensors")
    _one_line(excinfo)


def test_directory_that_is_not_a_diffusers_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        open_checkpoint(tmp_path)


def test_diffusers_folder_missing_a_component(folder, tmp_path):
    broken = Path(shutil.copytree(folder, tmp_path / "broken"))
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="lacks vae/"):
        open_checkpoint(broken)


def test_diffusers_config_disagreeing_with_weights(folder, tmp_path):
    broken = Path(shutil.copytree(folder, tmp_path / "broken"))
    config = json.loads((broken / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps(dict(config, in_channels=9)))
    with pytest.raises(CheckpointError, match="config.json says in_channels=9 but the weights have 4"):
        open_checkpoint(broken)


def test_sdxl_and_sd2_diffusers_folders_are_named(folder, tmp_path):
    sdxl = Path(shutil.copytree(folder, tmp_path / "sdxl"))
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UnsupportedModelError, match="SDXL diffusers folder"):
        open_checkpoint(sdxl)
    sd2 = Path(shutil.copytree(folder, tmp_path / "sd2"))
    config = json.loads((sd2 / "text_encoder" / "config.json").read_text())
    (sd2 / "text_encoder" / "config.json").write_text(json.dumps(dict(config, hidden_act="gelu")))
    opened = open_checkpoint(sd2)  # gelu = OpenCLIP: SD 2.x, read as such (tests/test_sd2_diffusers_folder.py)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in opened.shapes
    with pytest.raises(UnsupportedModelError, match="SD 2.x heads are 64 wide"):  # this tiny UNet is SD 1.x's
        detect_config(opened.shapes)
    (sd2 / "text_encoder" / "config.json").write_text(json.dumps(dict(config, hidden_act="relu")))
    with pytest.raises(UnsupportedModelError, match="hidden_act 'relu' is neither"):
        open_checkpoint(sd2)


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "content, message",
    [
        (b"abc", r"truncated safetensors file \(3 bytes"),
        (struct.pack("<Q", 10**9) + b"{}", "header length 1000000000 bytes runs past the end of the file"),
        (struct.pack("<Q", 6) + b"\xff{not}", "header is not valid JSON"),
        (struct.pack("<Q", 6) + b"[1, 2]", "header is not a JSON object"),
        (
            _safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            r"truncated safetensors file: tensor 'a' ends at byte",
        ),
        (
            _safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 16),
            r"tensor 'a' \(F32 \[4\]\) has data offsets \[0, 8\] that do not match its size",
        ),
        (
            _safetensors_bytes({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
            "bad header entry for 'a'",
        ),
    ],
    ids=["tiny", "header-past-eof", "bad-json", "not-object", "data-past-eof", "offsets-mismatch", "unknown-dtype"],
)
def test_corrupt_safetensors(content, message, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as excinfo:
        open_checkpoint(path)
    _one_line(excinfo)


def test_truncated_real_safetensors(reference, tmp_path):
    path = _write("safetensors-fp32", reference, tmp_path / "model")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated safetensors file: tensor"):
        open_checkpoint(path)


def test_truncated_ckpt(reference, tmp_path):
    path = _write("ckpt", reference, tmp_path / "model")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated checkpoint") as excinfo:
        open_checkpoint(path)
    _one_line(excinfo)


def test_unknown_extension(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"unknown checkpoint extension '\.onnx'"):
        open_checkpoint(path)


class _Exploit:
    """Unpickling this calls os.makedirs(marker): proof that arbitrary code would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}, "x": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="non-tensor Python objects.*convert it to .safetensors") as excinfo:
        open_checkpoint(path)
    _one_line(excinfo)
    assert not marker.exists()


def test_pickle_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        open_checkpoint(path)


def test_file_with_no_model_keys(tmp_path, models):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2), "bias": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"no Stable Diffusion model tensors .* found 2 tensors such as 'bias'"):
        open_checkpoint(path)
    component = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in models[0].state_dict().items()}, component)
    with pytest.raises(CheckpointError, match="looks like one diffusers component"):
        open_checkpoint(component)


# ------------------------------------------------------------------------------------------------- prediction type


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ('model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n',
         "v_prediction"),
        ("model:\n  params:\n    parameterization: eps\n    linear_start: 0.00085\n", "epsilon"),
        ("model:\n  params:\n    linear_start: 0.00085\n", "epsilon"),
    ],
    ids=["v", "eps", "absent"],
)  # fmt: skip
@pytest.mark.parametrize("with_pyyaml", [True, False], ids=["pyyaml", "minimal"])
def test_prediction_type_from_yaml_beside_the_checkpoint(yaml_text, expected, with_pyyaml, tmp_path, monkeypatch):
    if not with_pyyaml:
        monkeypatch.setitem(sys.modules, "yaml", None)
    checkpoint = tmp_path / "v2-1_768-ema-pruned.safetensors"
    checkpoint.write_bytes(b"")
    assert read_prediction_type(checkpoint) is None
    (tmp_path / "v2-1_768-ema-pruned.yaml").write_text(yaml_text)
    assert read_prediction_type(checkpoint) == expected


def test_prediction_type_x0_is_refused(tmp_path):
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: x0\n")
    with pytest.raises(UnsupportedModelError, match="parameterization 'x0'"):
        read_prediction_type(tmp_path / "m.ckpt")


def test_prediction_type_of_a_diffusers_folder(models, tmp_path):
    folder = write_diffusers_folder(tmp_path / "v", models, prediction_type="v_prediction")
    assert read_prediction_type(folder) == "v_prediction"
    info = summarize(open_checkpoint(folder))
    assert info["prediction_type"] == "v_prediction"
    assert info["config"]["scheduler"]["prediction_type"] == "v_prediction"
    shutil.rmtree(folder / "scheduler")
    assert read_prediction_type(folder) is None


def test_sdxl_single_file_is_named_not_mistaken_for_incomplete(reference, tmp_path):
    state = {k: v for k, v in reference.items() if not k.startswith("cond_stage_model.")}
    state["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)
    path = tmp_path / "sdxl.safetensors"
    save_file(state, path)
    with pytest.raises(UnsupportedModelError, match=r"SDXL checkpoint \(conditioner\.embedders\.\* keys\)"):
        summarize(open_checkpoint(path))
