"""Which model weight a LoRA module name addresses: one table per model, built from its LDM key -> shape table.

LoRA files name modules by their diffusers path (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_model.encoder.layers.3.self_attn.q_proj``) in one of several spellings: kohya/A1111 (``lora_unet_`` +
path with ``_``), PEFT/diffusers (``unet.`` + path), diffusers' older attention-processor names. The table maps
every spelling of every LoRA-addressable weight (2-D Linear and 4-D Conv weights of the UNet and text encoder) to
its LDM checkpoint key, plus the rows it occupies when the LDM tensor packs several diffusers ones (SD 2.x's OpenCLIP
q/k/v ``in_proj_weight``). Nothing is guessed: a name is in the table or it does not match.

NumPy/stdlib only (the torch-free runtime builds the table from the manifest's weights map).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

from rtsd.diffusers_keys import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, unet_to_ldm

Shape = tuple[int, ...]
_RESNET_FROM_LDM = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                    "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_UNET_DIRECT = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                "input_blocks.0.0": "conv_in", "out.2": "conv_out", "out.0": "conv_norm_out",
                "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}  # SDXL
_OPEN_CLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


class Target(NamedTuple):
    """One LoRA-addressable weight: its LDM key, the rows [start, stop) it fills (packed q/k/v), its shape there."""

    key: str
    shape: Shape
    rows: tuple[int, int] | None = None
    component: str = "unet"


def lora_table(shapes: Mapping[str, Shape], num_res_blocks: int) -> dict[str, Target]:
    """diffusers module path (``unet.…`` / ``text_encoder.…``) -> Target, for every 2-D/4-D weight in ``shapes``."""
    table: dict[str, Target] = {}
    weights = {k: tuple(s) for k, s in shapes.items()
               if k.endswith("weight") and len(s) in (2, 4) and "embedding" not in k}  # not the token tables
    unet = {k: s for k, s in weights.items() if k.startswith(UNET_PREFIX)}
    for key, shape in unet.items():
        path = _unet_diffusers_path(key[len(UNET_PREFIX):-len(".weight")], num_res_blocks, unet)
        table["unet." + path] = Target(key, shape)
    for key, shape in weights.items():
        if key.startswith(CLIP_PREFIX):
            table["text_encoder.text_model." + key[len(CLIP_PREFIX):-len(".weight")]] = \
                Target(key, shape, component="text_encoder")
        elif m := re.match(re.escape(OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.(.+)$", key):
            _open_clip_entries(table, "text_encoder", m[1], m[2], key, shape)
        # SDXL (both in the one text-encoder engine): ViT-L is diffusers' text_encoder, bigG its text_encoder_2
        elif m := re.match(r"conditioner\.embedders\.\d+\.transformer\.text_model\.(.+)\.weight$", key):
            table["text_encoder.text_model." + m[1]] = Target(key, shape, component="text_encoder")
        elif m := re.match(r"conditioner\.embedders\.\d+\.model\.transformer\.resblocks\.(\d+)\.(.+)$", key):
            _open_clip_entries(table, "text_encoder_2", m[1], m[2], key, shape)
    _check_round_trip(unet, table)
    return table


def _open_clip_entries(table: dict[str, Target], encoder: str, layer: str, module: str, key: str,
                       shape: Shape) -> None:
    """An OpenCLIP resblock weight under its transformers CLIPTextModel name(s) (packed q/k/v: three row ranges)."""
    prefix = f"{encoder}.text_model.encoder.layers.{layer}."
    module = module.removesuffix(".weight")
    if module in _OPEN_CLIP_LAYER:
        table[prefix + _OPEN_CLIP_LAYER[module]] = Target(key, shape, component="text_encoder")
    elif module == "attn.in_proj_weight":
        width = shape[0] // 3
        for i, name in enumerate(_QKV):
            table[prefix + name] = Target(key, (width, shape[1]), (i * width, (i + 1) * width), "text_encoder")


def _unet_diffusers_path(module: str, layers: int, unet: Mapping[str, Shape]) -> str:
    """LDM UNet module path -> diffusers UNet2DConditionModel module path (the inverse of diffusers_keys)."""
    step = layers + 1
    if module in _UNET_DIRECT:
        return _UNET_DIRECT[module]
    if m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.+)$", module):
        level, index = divmod(int(m[1]) - 1, step)
        if m[2] == "1":
            return f"down_blocks.{level}.attentions.{index}.{m[3]}"
        if index == layers:
            return f"down_blocks.{level}.downsamplers.0.conv"
        return f"down_blocks.{level}.resnets.{index}.{_RESNET_FROM_LDM[m[3]]}"
    if m := re.match(r"middle_block\.(\d)\.(.+)$", module):
        if m[1] == "1":
            return f"mid_block.attentions.0.{m[2]}"
        return f"mid_block.resnets.{int(m[1]) // 2}.{_RESNET_FROM_LDM[m[2]]}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d)\.(.+)$", module):
        level, index = divmod(int(m[1]), step)
        if m[2] == "0":
            return f"up_blocks.{level}.resnets.{index}.{_RESNET_FROM_LDM[m[3]]}"
        if m[3] == "conv":
            return f"up_blocks.{level}.upsamplers.0.conv"
        return f"up_blocks.{level}.attentions.{index}.{m[3]}"
    raise KeyError(f"UNet weight {module!r} has no diffusers name")


def _check_round_trip(unet: Mapping[str, Shape], table: Mapping[str, Target]) -> None:
    """The inverse must agree with diffusers_keys' forward map on every UNet weight (a wrong inverse is a bug)."""
    diffusers = {name[len("unet."):] + ".weight": t.shape for name, t in table.items() if name.startswith("unet.")}
    back = {ldm: source.key for ldm, source in unet_to_ldm(diffusers).items()}
    for name, target in table.items():
        if target.component == "unet" and back.get(target.key) != name[len("unet."):] + ".weight":
            raise AssertionError(f"LoRA key table: {name} does not map back to {target.key}")


def kohya_names(table: Mapping[str, Target]) -> dict[str, str]:
    """kohya/A1111 module name (``lora_unet_…`` / ``lora_te_…``) -> diffusers module path in ``table``.

    SDXL (a table with ``text_encoder_2``): ``lora_te1_`` / ``lora_te2_``, and the UNet also under its sgm (LDM)
    module names, which kohya's SDXL trainer writes (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``)."""
    sdxl = any(path.startswith("text_encoder_2.") for path in table)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    names = {}
    for path, target in table.items():
        component, _, rest = path.partition(".")
        names[prefixes[component] + rest.replace(".", "_")] = path
        if sdxl and component == "unet" and target.key.startswith(UNET_PREFIX):
            names["lora_unet_" + target.key[len(UNET_PREFIX):-len(".weight")].replace(".", "_")] = path
    return names


def peft_module(name: str) -> str:
    """A PEFT/diffusers module name in its canonical ``unet.…`` / ``text_encoder.text_model.…`` form."""
    name = name.removeprefix("base_model.model.")
    # diffusers' pre-PEFT attention-processor names: attn1.processor.to_q_lora -> attn1.to_q, to_out_lora -> to_out.0
    name = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", name)
    name = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", name)
    name = re.sub(r"_lora$", "", name)  # text encoder: self_attn.q_proj_lora (older diffusers)
    if not name.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
        name = "unet." + name  # diffusers writes UNet-only files without the prefix
    for encoder in ("text_encoder.", "text_encoder_2."):
        if name.startswith(encoder) and not name.startswith(encoder + "text_model."):
            name = encoder + "text_model." + name[len(encoder):]  # transformers >= 5 drops text_model.
    return name
