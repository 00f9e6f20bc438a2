"""Diffusers-folder key names -> LDM single-file key names, as pure functions of (key -> shape) tables.

The inverse of diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / CLIP prefixing, so that a
diffusers folder (``unet/``, ``vae/``, ``text_encoder/``) reads as the same LDM state dict a single-file checkpoint
has. Nothing here loads a tensor: each LDM key gets a ``KeySource`` that names the diffusers tensor(s) it comes from
and the shape it has in the LDM layout, so ``Checkpoint.shapes`` works from file headers alone.

Text encoders: an SD 1.x folder holds OpenAI CLIP (``cond_stage_model.transformer.*``, the same names); an SD 2.x
folder holds OpenCLIP ViT-H/14 converted to a transformers ``CLIPTextModel`` (``cond_stage_model.model.*``, packed
q/k/v), without its last layer: diffusers' converter drops resblock 23, which SD 2.x never runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

from rtsd.errors import UnsupportedModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

Shape = tuple[int, ...]


class KeySource(NamedTuple):
    """Where one LDM tensor comes from: a diffusers tensor, viewed as ``shape`` (differs only for VAE attention).

    ``parts``, when set, names several diffusers tensors concatenated along dim 0 (OpenCLIP's packed q/k/v); ``key``
    is then the first of them.
    """

    key: str
    shape: Shape
    parts: tuple[str, ...] = ()
    transpose: bool = False  # a 2-D tensor stored transposed (SDXL's text_projection: Linear weight vs x @ P)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every diffusers tensor this LDM tensor is made of, in concatenation order."""
        return self.parts or (self.key,)


def _same(key: str, shape: Shape) -> KeySource:
    return KeySource(key, tuple(shape))


# ----------------------------------------------------------------------------------------------------------- UNet

_UNET_DIRECT = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's added conditions (addition_embed_type "text_time")
    "add_embedding.linear_2": "label_emb.0.2",
}
# diffusers ResnetBlock2D attribute -> LDM ResBlock attribute
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_DOWN_RESNET = re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$")
_DOWN_ATTN = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_DOWN_SAMPLE = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$")
_MID_RESNET = re.compile(r"mid_block\.resnets\.([01])\.(\w+)\.(\w+)$")
_MID_ATTN = re.compile(r"mid_block\.attentions\.0\.(.+)$")
_UP_RESNET = re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$")
_UP_ATTN = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_UP_SAMPLE = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$")


def _count_indices(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _resnet(attr: str, param: str, key: str) -> str:
    if attr not in _UNET_RESNET:
        raise UnsupportedModelError(f"diffusers UNet: unexpected resnet tensor '{key}'")
    return f"{_UNET_RESNET[attr]}.{param}"


def unet_to_ldm(shapes: Mapping[str, Shape]) -> dict[str, KeySource]:
    """Map a diffusers ``UNet2DConditionModel`` state dict (SD 1.x/2.x blocks) to ``model.diffusion_model.*``."""
    # Blocks per level (LDM numbers input/output blocks flat, diffusers nests them per level).
    layers = _count_indices(shapes, r"down_blocks\.0\.resnets\.(\d+)\.")
    if layers == 0:
        raise UnsupportedModelError("diffusers UNet: no down_blocks.0.resnets.* tensors; not an SD UNet")
    step = layers + 1
    up_levels_with_attention = {int(m.group(1)) for k in shapes if (m := _UP_ATTN.match(k))}

    out: dict[str, KeySource] = {}
    for key, shape in shapes.items():
        param = key.rsplit(".", 1)[-1]
        module = key[: -len(param) - 1]
        if module in _UNET_DIRECT:
            ldm = f"{_UNET_DIRECT[module]}.{param}"
        elif m := _DOWN_RESNET.match(key):
            level, index, attr, param = int(m[1]), int(m[2]), m[3], m[4]
            ldm = f"input_blocks.{1 + level * step + index}.0.{_resnet(attr, param, key)}"
        elif m := _DOWN_ATTN.match(key):
            ldm = f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1.{m[3]}"
        elif m := _DOWN_SAMPLE.match(key):
            ldm = f"input_blocks.{1 + int(m[1]) * step + layers}.0.op.{m[2]}"
        elif m := _MID_RESNET.match(key):
            ldm = f"middle_block.{2 * int(m[1])}.{_resnet(m[2], m[3], key)}"
        elif m := _MID_ATTN.match(key):
            ldm = f"middle_block.1.{m[1]}"
        elif m := _UP_RESNET.match(key):
            level, index, attr, param = int(m[1]), int(m[2]), m[3], m[4]
            ldm = f"output_blocks.{level * step + index}.0.{_resnet(attr, param, key)}"
        elif m := _UP_ATTN.match(key):
            ldm = f"output_blocks.{int(m[1]) * step + int(m[2])}.1.{m[3]}"
        elif m := _UP_SAMPLE.match(key):
            # LDM puts the upsampler after the resnet (.1) or after resnet + attention (.2).
            slot = 2 if int(m[1]) in up_levels_with_attention else 1
            ldm = f"output_blocks.{int(m[1]) * step + layers}.{slot}.conv.{m[2]}"
        else:
            raise UnsupportedModelError(
                f"diffusers UNet: tensor '{key}' has no SD 1.x/2.x single-file equivalent "
                "(class/addition embeddings, SDXL or other UNet variants are not supported)"
            )
        out[UNET_PREFIX + ldm] = _same(key, shape)
    return out


# ------------------------------------------------------------------------------------------------------------ VAE

_VAE_DIRECT = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
# diffusers Attention (current and pre-0.14 names) -> LDM AttnBlock (1x1 convs)
_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_ENC_RESNET = re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_ENC_SAMPLE = re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$")
_DEC_RESNET = re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_DEC_SAMPLE = re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$")
_VAE_MID_RESNET = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$")
_VAE_MID_ATTN = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$")


def vae_to_ldm(shapes: Mapping[str, Shape]) -> dict[str, KeySource]:
    """Map a diffusers ``AutoencoderKL`` state dict to ``first_stage_model.*`` (attention Linear -> 1x1 conv)."""
    # diffusers numbers decoder levels from the bottleneck up, LDM from full resolution down.
    levels = _count_indices(shapes, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, KeySource] = {}
    for key, shape in shapes.items():
        param = key.rsplit(".", 1)[-1]
        module = key[: -len(param) - 1]
        shape = tuple(shape)
        if module in _VAE_DIRECT:
            ldm = f"{_VAE_DIRECT[module]}.{param}"
        elif m := _ENC_RESNET.match(key):
            ldm = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := _ENC_SAMPLE.match(key):
            ldm = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := _DEC_RESNET.match(key):
            ldm = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := _DEC_SAMPLE.match(key):
            ldm = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := _VAE_MID_RESNET.match(key):
            ldm = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif (m := _VAE_MID_ATTN.match(key)) and m[2] in _VAE_ATTN:
            ldm = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm" and len(shape) == 2:
                shape = (*shape, 1, 1)
        else:
            raise UnsupportedModelError(f"diffusers VAE: tensor '{key}' has no SD single-file AutoencoderKL equivalent")
        out[VAE_PREFIX + ldm] = KeySource(key, shape)
    return out


# ---------------------------------------------------------------------------------------------------- text encoder

_CLIP_IGNORED = {"embeddings.position_ids"}  # a buffer, not a weight; real checkpoints disagree on carrying it


def _clip_names(shapes: Mapping[str, Shape], projection: bool = False) -> dict[str, str]:
    """CLIPTextModel tensor name without the ``text_model.`` level -> stored key, minus the ignored buffer.

    Accepts both the classic ``text_model.*`` names and the flattened names transformers >= 5.6 writes.
    """
    names = {}
    for key in shapes:
        name = key.removeprefix("text_model.")
        if name in _CLIP_IGNORED:
            continue
        if projection and name == "text_projection.weight":
            names[name] = key
            continue
        if not name.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
            raise UnsupportedModelError(
                f"diffusers text encoder: tensor '{key}' is not part of a CLIPTextModel "
                "(projection heads and other text encoders are not supported)"
            )
        names[name] = key
    return names


def clip_to_ldm(shapes: Mapping[str, Shape]) -> dict[str, KeySource]:
    """Map a transformers ``CLIPTextModel`` state dict (OpenAI CLIP, SD 1.x) to ``cond_stage_model.transformer.*``."""
    return {CLIP_PREFIX + name: _same(key, shapes[key]) for name, key in _clip_names(shapes).items()}


_OPEN_CLIP_DIRECT = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# CLIPEncoderLayer attribute -> OpenCLIP ResidualAttentionBlock attribute (q/k/v are packed separately)
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def open_clip_to_ldm(shapes: Mapping[str, Shape], projection: bool = False) -> dict[str, KeySource]:
    """Map a ``CLIPTextModel`` converted from OpenCLIP (SD 2.x folders) back to ``cond_stage_model.model.*``.

    The inverse of diffusers' ``convert_open_clip_checkpoint``: q/k/v projections pack into ``attn.in_proj_*``
    (q, k, v stacked on dim 0, as ``nn.MultiheadAttention`` stores them). Layers are mapped as stored; the one
    diffusers dropped stays absent (detection and the reference account for it).
    """
    names = _clip_names(shapes, projection)
    out: dict[str, KeySource] = {}
    for name, key in names.items():
        if name == "text_projection.weight":  # CLIPTextModelWithProjection (SDXL's bigG): Linear weight = P.T
            out[OPEN_CLIP_PREFIX + "text_projection"] = KeySource(key, tuple(shapes[key])[::-1], transpose=True)
            continue
        if name in _OPEN_CLIP_DIRECT:
            out[OPEN_CLIP_PREFIX + _OPEN_CLIP_DIRECT[name]] = _same(key, shapes[key])
            continue
        m = _CLIP_LAYER.match(name)
        if m is None or (m[2] not in _OPEN_CLIP_LAYER and m[2] not in _QKV):
            raise UnsupportedModelError(f"diffusers text encoder: tensor '{key}' has no OpenCLIP equivalent")
        layer, module, param = m[1], m[2], m[3]
        block = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}."
        if module in _OPEN_CLIP_LAYER:
            out[block + f"{_OPEN_CLIP_LAYER[module]}.{param}"] = _same(key, shapes[key])
        else:  # q, k and v each lead to the same packed tensor (so a missing one is named, whichever it is)
            out[block + f"attn.in_proj_{param}"] = _packed_qkv(names, shapes, f"encoder.layers.{layer}.", param)
    return out


def _packed_qkv(names: Mapping[str, str], shapes: Mapping[str, Shape], layer: str, param: str) -> KeySource:
    parts = []
    for module in _QKV:
        name = f"{layer}{module}.{param}"
        if name not in names:
            raise UnsupportedModelError(f"diffusers text encoder: '{name}' is missing; q, k and v come in threes")
        parts.append(names[name])
    first = shapes[parts[0]]
    if any(tuple(shapes[p]) != tuple(first) for p in parts):
        raise UnsupportedModelError(
            f"diffusers text encoder: {layer}q/k/v {param} shapes differ ({[list(shapes[p]) for p in parts]})"
        )
    return KeySource(parts[0], (3 * first[0], *first[1:]), tuple(parts))


# ------------------------------------------------------------------------------------------------------------ SDXL

SDXL_EMBEDDERS = "conditioner.embedders."


def sdxl_text_to_ldm(shapes: Mapping[str, Shape], index: int, open_clip: bool) -> dict[str, KeySource]:
    """An SDXL folder's text_encoder/ (CLIP ViT-L, ``conditioner.embedders.0.transformer.*``) or text_encoder_2/
    (OpenCLIP bigG with its projection, ``conditioner.embedders.<index>.model.*``)."""
    if open_clip:
        mapped, old, new = open_clip_to_ldm(shapes, projection=True), OPEN_CLIP_PREFIX, f"model."
    else:
        mapped, old, new = clip_to_ldm(shapes), "cond_stage_model.transformer.", "transformer."
    return {f"{SDXL_EMBEDDERS}{index}.{new}{k[len(old):]}": v for k, v in mapped.items()}
