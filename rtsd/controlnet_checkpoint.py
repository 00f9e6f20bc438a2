"""ControlNet checkpoints as users have them -> LDM ``ControlNet`` keys, a detected UNetConfig, and the family.

Accepted: LDM single files (.safetensors / .pth / .ckpt, loaded weights-only) with ``control_model.*`` keys
(control_v11p_sd15_canny.pth, or the original control_sd15_*.pth that also carry a whole SD model, which is ignored
here), the same without the prefix (e.g. thibaud's controlnet-sd21 files), and diffusers ``ControlNetModel``
folders (config.json + diffusion_pytorch_model.safetensors/.bin). Detection is a pure function of key -> shape, as
for full checkpoints (rtsd.detection); the family follows the cross-attention context width (768: SD 1.x,
1024: SD 2.x; other widths, as in the tiny test presets: Linear proj_in means SD 2.x).

Keys are named without the ``control_model.`` prefix (the attribute names of rtsd.models.controlnet).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtsd import diffusers_keys
from rtsd.config import ModelConfig, UNetConfig
from rtsd.detection import SD1_UNET_HEADS, SD2_UNET_HEAD_WIDTH
from rtsd.errors import CheckpointError, UnsupportedModelError

PREFIX = "control_model."
FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2"}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x"}
_OWN_TOP_LEVEL = ("time_embed.", "input_hint_block.", "input_blocks.", "zero_convs.", "middle_block.",
                  "middle_block_out.")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ControlNetInfo:
    """What a ControlNet file is: its encoder config, hint channels and family (detected from shapes)."""

    path: Path
    format: str  # "safetensors" | "pickle" | "diffusers"
    family: str
    unet: UNetConfig
    hint_channels: int
    shapes: Mapping[str, Shape]
    _sources: Mapping[str, tuple[Path, str]]  # LDM key (no prefix) -> (file, key in that file)
    _pickled: Mapping[Path, Mapping[str, Any]]

    def tensors(self, dtype=None) -> dict[str, Any]:
        """Every tensor under its LDM key (no prefix); needs torch."""
        from rtsd.checkpoint import _open_tensors

        out = {}
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for ldm_key, (file, key) in self._sources.items():
            by_file.setdefault(file, []).append((ldm_key, key))
        for file, entries in by_file.items():
            with _open_tensors(self._pickled, file) as get:
                for ldm_key, key in entries:
                    tensor = get(key)
                    out[ldm_key] = tensor if dtype is None else tensor.to(dtype)
        return out

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for file in sorted({file for file, _ in self._sources.values()}):
            with open(file, "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
        return digest.hexdigest()


def open_controlnet(path: str | Path) -> ControlNetInfo:
    """Read a ControlNet's key table (headers only for safetensors) and detect what it is."""
    from rtsd.checkpoint import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, _load_pickle, _require_regular_file,
                                 read_safetensors_header)

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"ControlNet not found: {path}")
    pickled: dict[Path, Mapping[str, Any]] = {}
    if path.is_dir():
        entries, fmt = _diffusers_entries(path, pickled), "diffusers"
    else:
        _require_regular_file(path, "ControlNet")
        suffix = path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            raw = {k: (path, k, shape) for k, (shape, _) in read_safetensors_header(path).items()}
            fmt = "safetensors"
        elif suffix in PICKLE_SUFFIXES:
            state = pickled[path] = _load_pickle(path)
            raw = {k: (path, k, tuple(t.shape)) for k, t in state.items()}
            fmt = "pickle"
        else:
            raise CheckpointError(f"{path}: unknown ControlNet extension '{path.suffix}'; expected .safetensors, "
                                  ".pth, .ckpt, .pt or a diffusers ControlNetModel folder")
        entries = _strip_prefix(path, raw)
    shapes = {k: shape for k, (_, _, shape) in entries.items()}
    unet, hint_channels, family = detect_controlnet(shapes, str(path))
    return ControlNetInfo(path, fmt, family, unet, hint_channels, shapes,
                          {k: (file, key) for k, (file, key, _) in entries.items()}, pickled)


def _strip_prefix(path: Path, raw: Mapping[str, tuple]) -> dict[str, tuple]:
    """control_model.* keys without the prefix; else the file's own top-level ControlNet keys. A file that also
    holds a full SD model (control_sd15_*.pth) keeps only its control_model.* part."""
    if any(k.startswith(PREFIX) for k in raw):
        return {k[len(PREFIX):]: v for k, v in raw.items() if k.startswith(PREFIX)}
    if "input_hint_block.0.weight" in raw:
        return {k: v for k, v in raw.items() if k.startswith(_OWN_TOP_LEVEL)}
    examples = ", ".join(f"'{k}'" for k in sorted(raw)[:3]) or "none"
    raise CheckpointError(f"{path}: not a ControlNet (no control_model.* or input_hint_block.* tensors; found "
                          f"{len(raw)} tensors such as {examples}); pass an LDM ControlNet file or a diffusers "
                          "ControlNetModel folder")


# ------------------------------------------------------------------------------------------------ diffusers folder

_COND_EMBEDDING = re.compile(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)$")
_DOWN_ZERO = re.compile(r"controlnet_down_blocks\.(\d+)\.(weight|bias)$")


def _diffusers_entries(folder: Path, pickled: dict) -> dict[str, tuple]:
    from rtsd.checkpoint import _component_weight_files, _load_pickle, _read_json, read_safetensors_header

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is a directory but not a diffusers ControlNetModel folder (no config.json)")
    config = _read_json(folder / "config.json")
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise UnsupportedModelError(f"{folder}: a diffusers {config.get('_class_name')} folder; rtsd reads "
                                    "ControlNetModel folders (SD 1.x / 2.x ControlNets)")
    raw: dict[str, tuple[Path, Shape]] = {}
    for file in _component_weight_files(folder):
        if file.suffix == ".safetensors":
            raw.update({k: (file, shape) for k, (shape, _) in read_safetensors_header(file).items()})
        else:
            state = pickled[file] = _load_pickle(file)
            raw.update({k: (file, tuple(t.shape)) for k, t in state.items()})
    own, encoder = {}, {}
    for key, (file, shape) in raw.items():
        if m := _COND_EMBEDDING.match(key):
            index = 0 if m[1] == "conv_in" else 14 if m[1] == "conv_out" else 2 + 2 * int(m[2])
            own[f"input_hint_block.{index}.{m[3]}"] = (file, key, shape)
        elif m := _DOWN_ZERO.match(key):
            own[f"zero_convs.{m[1]}.0.{m[2]}"] = (file, key, shape)
        elif key.startswith("controlnet_mid_block."):
            own[f"middle_block_out.0.{key.rsplit('.', 1)[1]}"] = (file, key, shape)
        else:
            encoder[key] = (file, shape)
    try:  # the encoder copy is named as in a UNet2DConditionModel: the UNet mapping covers it
        mapped = diffusers_keys.unet_to_ldm({k: shape for k, (_, shape) in encoder.items()})
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{folder}: not an SD 1.x/2.x ControlNet ({exc})") from None
    for ldm_key, src in mapped.items():
        own[ldm_key[len(diffusers_keys.UNET_PREFIX):]] = (encoder[src.key][0], src.key, src.shape)
    return own


# ------------------------------------------------------------------------------------------------------- detection


def detect_controlnet(shapes: Mapping[str, Shape], where: str = "ControlNet") -> tuple[UNetConfig, int, str]:
    """(encoder UNetConfig, hint channels, family) from LDM ControlNet key -> shape (no prefix)."""
    what = f"{where}: ControlNet"

    def need(key: str) -> Shape:
        if key not in shapes:
            raise UnsupportedModelError(f"{what} tensor '{key}' is missing; not an SD 1.x/2.x ControlNet layout")
        return tuple(shapes[key])

    model_channels, in_channels = need("input_blocks.0.0.weight")[:2]
    hint_channels = need("input_hint_block.0.weight")[1]
    inputs = _indices(shapes, r"input_blocks\.(\d+)\.")
    downsamples = _indices(shapes, r"input_blocks\.(\d+)\.0\.op\.")
    levels = len(downsamples) + 1
    res_blocks, rest = divmod(len(inputs) - 1 - len(downsamples), levels)
    step = res_blocks + 1
    if (res_blocks < 1 or rest or inputs != list(range(len(inputs)))
            or downsamples != [1 + level * step + res_blocks for level in range(levels - 1)]):
        raise UnsupportedModelError(f"{what}: input blocks {len(inputs)} with downsamples at {downsamples} do not "
                                    "form equal levels")
    zero_convs = _indices(shapes, r"zero_convs\.(\d+)\.")
    if zero_convs != inputs:
        raise UnsupportedModelError(f"{what}: {len(zero_convs)} zero convs for {len(inputs)} input blocks")
    channel_mult, attention_levels = [], []
    for level in range(levels):
        first = 1 + level * step
        width = need(f"input_blocks.{first}.0.out_layers.3.weight")[0]
        if width % model_channels:
            raise UnsupportedModelError(f"{what}: level {level} width {width} is not a multiple of {model_channels}")
        channel_mult.append(width // model_channels)
        attention = {f"input_blocks.{first + i}.1.proj_in.weight" in shapes for i in range(res_blocks)}
        if len(attention) != 1:
            raise UnsupportedModelError(f"{what}: level {level} has attention in some blocks but not others")
        if attention.pop():
            attention_levels.append(level)
    contexts = {shapes[k][1] for k in shapes if k.endswith(".attn2.to_k.weight")}
    if len(contexts) != 1 or not attention_levels:
        raise UnsupportedModelError(f"{what}: cross-attention context widths {sorted(contexts)}; not an SD 1.x/2.x "
                                    "ControlNet")
    context = contexts.pop()
    first_attention = f"input_blocks.{1 + attention_levels[0] * step}.1"
    linear = len(need(f"{first_attention}.proj_in.weight")) == 2
    depth = len(_indices(shapes, re.escape(first_attention) + r"\.transformer_blocks\.(\d+)\."))
    family = FAMILY_BY_CONTEXT.get(context, "sd2" if linear else "sd1")
    heads = ({"num_heads": -1, "num_head_channels": SD2_UNET_HEAD_WIDTH} if family == "sd2"
             else {"num_heads": SD1_UNET_HEADS, "num_head_channels": -1})
    config = UNetConfig(in_channels=in_channels, out_channels=in_channels, model_channels=model_channels,
                        channel_mult=tuple(channel_mult), num_res_blocks=res_blocks,
                        attention_resolutions=tuple(sorted((2**lv for lv in attention_levels), reverse=True)),
                        transformer_depth=depth, context_dim=context, use_linear_in_transformer=linear, **heads)
    return config, hint_channels, family


def _indices(shapes: Mapping[str, Shape], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := regex.match(k))})


# ------------------------------------------------------------------------------------------------ family matching

_MATCHED_FIELDS = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
                   "num_head_channels", "transformer_depth", "context_dim", "use_linear_in_transformer")


def check_matches(info: ControlNetInfo, model: ModelConfig, name: str) -> None:
    """One line when the ControlNet was not made for this model's UNet (another family or another encoder)."""
    label = f"ControlNet '{name}' ({info.path.name})"
    if info.family != model.family or info.unet.context_dim != model.unet.context_dim:
        raise UnsupportedModelError(
            f"{label} is an {FAMILY_NAMES.get(info.family, info.family)} ControlNet (context width "
            f"{info.unet.context_dim}) but the model is {FAMILY_NAMES.get(model.family, model.family)} (context width "
            f"{model.unet.context_dim}); use a ControlNet trained for {FAMILY_NAMES.get(model.family, model.family)}")
    different = [f for f in _MATCHED_FIELDS if getattr(info.unet, f) != getattr(model.unet, f)]
    if different:
        field = different[0]
        raise UnsupportedModelError(
            f"{label} does not fit this model's UNet ({field} {getattr(info.unet, field)} vs "
            f"{getattr(model.unet, field)}); use a ControlNet trained for this base model")
    if model.unet.in_channels != info.unet.in_channels:
        raise UnsupportedModelError(f"{label} takes {info.unet.in_channels}-channel latents but this UNet takes "
                                    f"{model.unet.in_channels} (inpainting UNets are not supported with ControlNet)")


def load_controlnet(path: str | Path, dtype=None, device: str = "cpu"):
    """The reference ControlNet (rtsd.models.controlnet) of the file at ``path``, strictly loaded; needs torch."""
    import torch

    from rtsd.models.controlnet import ControlNetModel

    info = open_controlnet(path)
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = ControlNetModel(info.unet, info.hint_channels)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - info.shapes.keys())
    unexpected = sorted(info.shapes.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & info.shapes.keys() if tuple(info.shapes[k]) != expected[k])
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: does not fit the detected ControlNet ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(wrong)} wrong-shape tensors, e.g. "
                              f"{(missing + unexpected + wrong)[0]})")
    model.load_state_dict(info.tensors(dtype=dtype), strict=True, assign=True)
    return model.to(device=device).eval().requires_grad_(False), info
