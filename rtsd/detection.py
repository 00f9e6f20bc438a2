"""Architecture detection: a pure function of LDM tensor names and shapes -> frozen ``ModelConfig``.

Everything the weights determine is read from them (channels, multipliers, block counts, attention levels, depth,
context width, text encoder size). What weights cannot say follows the family's convention: SD 1.x uses 8 attention
heads, SD 2.x 64-wide heads; CLIP heads are 64 wide. Layouts that match neither family raise UnsupportedModelError
naming what was found; there are no statistical guesses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from rtsd.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from rtsd.errors import UnsupportedModelError

Shape = tuple[int, ...]

COMPONENT_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
}
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SUPPORTED = "rtsd supports SD 1.x, 2.x and SDXL (base, refiner, inpainting)"
SDXL_TEXT_PREFIX = "conditioner.embedders."
SDXL_TIME_ID_WIDTH = 256  # each time id is a 256-wide sinusoid (sgm ConcatTimestepEmbedderND, outdim 256)
SDXL_TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}  # size, crop, target size | size, crop, aesthetic score
CLIP_HEAD_WIDTH = 64
SD1_UNET_HEADS = 8
SD2_UNET_HEAD_WIDTH = 64
# diffusers' OpenCLIP converter drops resblock 23 by name (ViT-H/14's last; SD 2.x conditions on the penultimate
# layer and never runs it), so an OpenCLIP tower stored as resblocks 0..22 is that 24-layer tower minus its last.
DIFFUSERS_DROPPED_RESBLOCK = 23
_UNET_TOP_LEVEL = {"time_embed", "input_blocks", "middle_block", "output_blocks", "out"}


def detect_config(shapes: Mapping[str, Shape]) -> ModelConfig:
    """The ModelConfig of an SD 1.x / 2.x / SDXL checkpoint from its LDM key -> shape table."""
    if any(k.startswith(SDXL_TEXT_PREFIX) for k in shapes):
        try:
            return _detect_sdxl(shapes)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"SDXL checkpoint (conditioner.embedders.* keys): {exc}") from None
    _reject_other_families(shapes)
    text_encoder = _detect_text_encoder(shapes)
    family = "sd2" if text_encoder.kind == "open_clip" else "sd1"
    unet = _detect_unet(_strip(shapes, COMPONENT_PREFIXES["unet"]), family)
    vae = _detect_vae(_strip(shapes, COMPONENT_PREFIXES["vae"]))
    _check_consistent(unet, vae, text_encoder)
    return ModelConfig(family=family, unet=unet, vae=vae, text_encoder=text_encoder)


def component_prefixes(config: ModelConfig) -> dict[str, str]:
    """Where each network lives in this family's single files (SDXL's text encoders: ``conditioner.``)."""
    if config.unet.adm_in_channels:
        return {**COMPONENT_PREFIXES, "text_encoder": "conditioner."}
    return COMPONENT_PREFIXES


def _strip(shapes: Mapping[str, Shape], prefix: str) -> dict[str, Shape]:
    return {k[len(prefix) :]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _need(shapes: Mapping[str, Shape], key: str, what: str) -> Shape:
    if key not in shapes:
        raise UnsupportedModelError(f"{what}: tensor '{key}' is missing; not an SD 1.x/2.x layout")
    return shapes[key]


def _indices(shapes: Mapping[str, Shape], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (a regex with one group) at the start of the keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := regex.match(k))})


def _ratio(value: int, base: int, what: str) -> int:
    if base <= 0 or value % base:
        raise UnsupportedModelError(f"{what}: {value} is not a multiple of {base}; not an SD 1.x/2.x layout")
    return value // base


# --------------------------------------------------------------------------------------------------- other families


def _reject_other_families(shapes: Mapping[str, Shape]) -> None:
    if not shapes:
        raise UnsupportedModelError(f"no model tensors at all; {SUPPORTED}")
    unet = _strip(shapes, COMPONENT_PREFIXES["unet"])
    if "label_emb.0.0.weight" in unet or "label_emb.weight" in unet:
        raise UnsupportedModelError(
            f"UNet with a class/ADM embedding (label_emb.* keys) but no SDXL text encoders (conditioner.embedders.*: "
            f"unCLIP or upscaler): {SUPPORTED}"
        )
    _reject_foreign_unet(unet)
    missing = [name for name, prefix in COMPONENT_PREFIXES.items() if not any(k.startswith(prefix) for k in shapes)]
    if missing:
        found = sorted({k.split(".", 1)[0] for k in shapes})
        raise UnsupportedModelError(
            f"incomplete checkpoint: no {', '.join(missing)} tensors ({'*, '.join(COMPONENT_PREFIXES.values())}* "
            f"expected; found {', '.join(f + '.*' for f in found)}); rtsd needs a full SD 1.x/2.x checkpoint"
        )


def _reject_foreign_unet(unet: Mapping[str, Shape], allowed: frozenset[str] = frozenset()) -> None:
    foreign = sorted({k.split(".", 1)[0] for k in unet} - _UNET_TOP_LEVEL - allowed)
    if foreign:
        raise UnsupportedModelError(
            f"unknown diffusion model layout (model.diffusion_model.{foreign[0]}.* keys; not an LDM UNet): {SUPPORTED}"
        )


# -------------------------------------------------------------------------------------------------------------- SDXL


def _detect_sdxl(shapes: Mapping[str, Shape]) -> ModelConfig:
    """SDXL base (CLIP ViT-L + OpenCLIP bigG, 6 time ids), refiner (bigG alone, 5 time ids) or inpainting."""
    missing = [p for p in (COMPONENT_PREFIXES["unet"], COMPONENT_PREFIXES["vae"]) if not any(k.startswith(p) for k in shapes)]
    if missing:
        raise UnsupportedModelError(f"incomplete SDXL checkpoint: no {', '.join(m + '*' for m in missing)} tensors")
    embedders = _indices(shapes, re.escape(SDXL_TEXT_PREFIX) + r"(\d+)\.")
    encoders = []
    for index in embedders:
        part = _strip(shapes, f"{SDXL_TEXT_PREFIX}{index}.")
        if any(k.startswith("transformer.text_model.") for k in part):
            encoders.append(replace(_detect_clip(_strip(part, "transformer.text_model.")), output_layer=-2,
                                    final_norm=False))
        elif any(k.startswith("model.") for k in part):
            inner = _strip(part, "model.")
            projection = _need(inner, "text_projection", "SDXL OpenCLIP text encoder")
            encoders.append(replace(_detect_open_clip(inner), final_norm=False, projection_dim=projection[1]))
        else:
            raise UnsupportedModelError(f"SDXL text encoder {SDXL_TEXT_PREFIX}{index}.* is neither CLIP "
                                        f"(transformer.text_model.*) nor OpenCLIP (model.*): {SUPPORTED}")
    kinds = [te.kind for te in encoders]
    if kinds == ["clip", "open_clip"]:
        family = "sdxl"
    elif kinds == ["open_clip"]:
        family = "sdxl_refiner"
    else:
        raise UnsupportedModelError(f"SDXL-style checkpoint with text encoders {kinds} (embedders {embedders}); "
                                    f"expected CLIP + OpenCLIP (base) or OpenCLIP alone (refiner): {SUPPORTED}")
    unet_shapes = _strip(shapes, COMPONENT_PREFIXES["unet"])
    _reject_foreign_unet(unet_shapes, frozenset({"label_emb"}))
    unet = _detect_unet(unet_shapes, family)
    vae = replace(_detect_vae(_strip(shapes, COMPONENT_PREFIXES["vae"])), scaling_factor=0.13025)
    context = sum(te.hidden_size for te in encoders)
    if unet.context_dim != context:
        raise UnsupportedModelError(f"inconsistent SDXL checkpoint: UNet context_dim {unet.context_dim} differs "
                                    f"from the text encoders' widths {[te.hidden_size for te in encoders]} ({context})")
    time_ids = (unet.adm_in_channels - encoders[-1].projection_dim) / SDXL_TIME_ID_WIDTH
    if time_ids != SDXL_TIME_IDS[family]:
        raise UnsupportedModelError(
            f"SDXL UNet label_emb takes {unet.adm_in_channels} inputs: pooled text {encoders[-1].projection_dim} + "
            f"{time_ids:g} time ids of {SDXL_TIME_ID_WIDTH}; the {family} family has {SDXL_TIME_IDS[family]}")
    _check_latents(unet, vae)
    return ModelConfig(family=family, unet=unet, vae=vae, text_encoder=encoders[0],
                       text_encoder_2=encoders[1] if len(encoders) > 1 else None, default_size=1024,
                       zeros_for_empty_prompt=family == "sdxl")


# ------------------------------------------------------------------------------------------------------ text encoder


def _detect_text_encoder(shapes: Mapping[str, Shape]) -> TextEncoderConfig:
    clip = _strip(shapes, CLIP_PREFIX)
    open_clip = _strip(shapes, OPEN_CLIP_PREFIX)
    if clip:
        return _detect_clip(clip)
    if open_clip:
        return _detect_open_clip(open_clip)
    example = next(k for k in shapes if k.startswith(COMPONENT_PREFIXES["text_encoder"]))
    raise UnsupportedModelError(
        f"unknown text encoder layout ('{example}'; expected {CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}*): {SUPPORTED}"
    )


def _heads(hidden: int) -> int:
    return max(1, hidden // CLIP_HEAD_WIDTH)


def _detect_clip(s: Mapping[str, Shape]) -> TextEncoderConfig:
    what = "CLIP text encoder"
    vocab, hidden = _need(s, "embeddings.token_embedding.weight", what)
    positions, _ = _need(s, "embeddings.position_embedding.weight", what)
    layers = _indices(s, r"encoder\.layers\.(\d+)\.")
    if not layers or layers != list(range(len(layers))):
        raise UnsupportedModelError(f"{what}: encoder layers {layers[:5]}... are not numbered 0..N-1")
    intermediate = _need(s, "encoder.layers.0.mlp.fc1.weight", what)[0]
    _need(s, "final_layer_norm.weight", what)
    return TextEncoderConfig(
        kind="clip",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=len(layers),
        num_heads=_heads(hidden),
        intermediate_size=intermediate,
        max_position_embeddings=positions,
        hidden_act="quick_gelu",
        output_layer=-1,
        pad_token_id=49407,
    )


def _detect_open_clip(s: Mapping[str, Shape]) -> TextEncoderConfig:
    """OpenCLIP text tower (SD 2.x): conditioned on the penultimate layer, padded with token 0.

    A tower without its last layer (diffusers folders, and single files converted back from them) detects as the
    whole tower: the missing layer is one the penultimate-layer output never runs.
    """
    what = "OpenCLIP text encoder"
    vocab, hidden = _need(s, "token_embedding.weight", what)
    positions, _ = _need(s, "positional_embedding", what)
    layers = _indices(s, r"transformer\.resblocks\.(\d+)\.")
    if len(layers) < 2 or layers != list(range(len(layers))):
        raise UnsupportedModelError(f"{what}: resblocks {layers[:5]}... are not numbered 0..N-1 (N >= 2)")
    if _need(s, "transformer.resblocks.0.attn.in_proj_weight", what) != (3 * hidden, hidden):
        raise UnsupportedModelError(f"{what}: attn.in_proj_weight is not ({3 * hidden}, {hidden})")
    intermediate = _need(s, "transformer.resblocks.0.mlp.c_fc.weight", what)[0]
    _need(s, "ln_final.weight", what)
    num_layers = len(layers) + (len(layers) == DIFFUSERS_DROPPED_RESBLOCK)
    return TextEncoderConfig(
        kind="open_clip",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=_heads(hidden),
        intermediate_size=intermediate,
        max_position_embeddings=positions,
        hidden_act="gelu",
        output_layer=-2,
        pad_token_id=0,
    )


# --------------------------------------------------------------------------------------------------------------- UNet


def _detect_unet(s: Mapping[str, Shape], family: str) -> UNetConfig:
    what = "UNet"
    model_channels, in_channels = _need(s, "input_blocks.0.0.weight", what)[:2]
    out_channels = _need(s, "out.2.weight", what)[0]
    inputs = _indices(s, r"input_blocks\.(\d+)\.")
    downsamples = _indices(s, r"input_blocks\.(\d+)\.0\.op\.")
    levels = len(downsamples) + 1
    # Input blocks: conv_in, then per level num_res_blocks resnets (+ attention) and a downsample except at the last.
    res_blocks, rest = divmod(len(inputs) - 1 - len(downsamples), levels)
    step = res_blocks + 1
    if (
        res_blocks < 1
        or rest
        or inputs != list(range(len(inputs)))
        or downsamples != [1 + level * step + res_blocks for level in range(levels - 1)]
    ):
        raise UnsupportedModelError(
            f"{what}: input blocks {len(inputs)} with downsamples at {downsamples} do not form equal levels"
        )
    outputs = _indices(s, r"output_blocks\.(\d+)\.")
    if outputs != list(range(levels * step)):
        raise UnsupportedModelError(
            f"{what}: {len(outputs)} output blocks, expected {levels * step} for {levels} levels of {res_blocks}"
        )
    for index in range(3):
        if not any(k.startswith(f"middle_block.{index}.") for k in s):
            raise UnsupportedModelError(f"{what}: middle_block.{index} is missing; not an SD 1.x/2.x layout")

    channel_mult, attention_levels = [], []
    for level in range(levels):
        first = 1 + level * step
        width = _need(s, f"input_blocks.{first}.0.out_layers.3.weight", what)[0]
        channel_mult.append(_ratio(width, model_channels, f"{what} level {level} width"))
        has_attention = {f"input_blocks.{first + i}.1.proj_in.weight" in s for i in range(res_blocks)}
        up_first = (levels - 1 - level) * step
        has_attention |= {f"output_blocks.{up_first + i}.1.proj_in.weight" in s for i in range(step)}
        if len(has_attention) != 1:
            raise UnsupportedModelError(f"{what}: level {level} has attention in some blocks but not others")
        if has_attention.pop():
            attention_levels.append(level)
    if not attention_levels:
        raise UnsupportedModelError(f"{what}: no cross-attention blocks; not an SD 1.x/2.x text-to-image UNet")

    attention_blocks = sorted({k[: -len(".proj_in.weight")] for k in s if k.endswith(".proj_in.weight")})

    def depth(block: str) -> int:
        return len(_indices(_strip(s, block + "."), r"transformer_blocks\.(\d+)\."))

    sdxl = family.startswith("sdxl")
    if sdxl:
        # Per level (0 where it has no attention; every block of a level alike), and the middle block's.
        levels_depth = []
        for level in range(levels):
            first, up_first = 1 + level * step, (levels - 1 - level) * step
            blocks = [f"input_blocks.{first + i}.1" for i in range(res_blocks)]
            blocks += [f"output_blocks.{up_first + i}.1" for i in range(step)]
            found = {depth(b) for b in blocks} if level in attention_levels else {0}
            if len(found) != 1:
                raise UnsupportedModelError(f"{what}: level {level} has transformer depths {sorted(found)}")
            levels_depth.append(found.pop())
        depth_fields = {"transformer_depth": depth("middle_block.1"), "transformer_depth_levels": tuple(levels_depth),
                        "adm_in_channels": _need(s, "label_emb.0.0.weight", what)[1]}
    else:
        depths = {depth(block) for block in attention_blocks}
        if len(depths) != 1:
            raise UnsupportedModelError(f"{what}: transformer depths {sorted(depths)} differ between blocks (SDXL-like)")
        depth_fields = {"transformer_depth": depths.pop()}
    first_attention = attention_blocks[0]
    context_dims = {s[k][1] for k in s if k.endswith(".attn2.to_k.weight")}
    if len(context_dims) != 1:
        raise UnsupportedModelError(f"{what}: cross-attention context widths {sorted(context_dims)} differ")
    linear = len(_need(s, f"{first_attention}.proj_in.weight", what)) == 2

    widths = [model_channels * channel_mult[level] for level in attention_levels]
    if family == "sd2" or sdxl:
        for width in widths:
            _ratio(width, SD2_UNET_HEAD_WIDTH, f"{what} attention width (SD 2.x heads are 64 wide)")
        heads = {"num_heads": -1, "num_head_channels": SD2_UNET_HEAD_WIDTH}
    else:
        for width in widths:
            _ratio(width, SD1_UNET_HEADS, f"{what} attention width (SD 1.x uses 8 heads)")
        heads = {"num_heads": SD1_UNET_HEADS, "num_head_channels": -1}
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=res_blocks,
        attention_resolutions=tuple(sorted((2**level for level in attention_levels), reverse=True)),
        context_dim=context_dims.pop(),
        use_linear_in_transformer=linear,
        **heads,
        **depth_fields,
    )


# ---------------------------------------------------------------------------------------------------------------- VAE


def _detect_vae(s: Mapping[str, Shape]) -> VAEConfig:
    what = "VAE"
    ch, in_channels = _need(s, "encoder.conv_in.weight", what)[:2]
    levels = _indices(s, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))) or _indices(s, r"decoder\.up\.(\d+)\.") != levels:
        raise UnsupportedModelError(f"{what}: encoder/decoder levels do not match (encoder.down.*, decoder.up.*)")
    res_blocks = len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\."))
    if len(_indices(s, r"decoder\.up\.0\.block\.(\d+)\.")) != res_blocks + 1:
        raise UnsupportedModelError(f"{what}: decoder levels should have {res_blocks + 1} blocks")
    ch_mult = tuple(
        _ratio(_need(s, f"encoder.down.{level}.block.0.conv2.weight", what)[0], ch, f"{what} level {level} width")
        for level in levels
    )
    z_channels = _need(s, "decoder.conv_in.weight", what)[1]
    if _need(s, "encoder.conv_out.weight", what)[0] != 2 * z_channels:
        raise UnsupportedModelError(f"{what}: encoder.conv_out does not output mean and log-variance of {z_channels}")
    embed_dim = _need(s, "post_quant_conv.weight", what)[1]
    if _need(s, "quant_conv.weight", what)[0] != 2 * embed_dim:
        raise UnsupportedModelError(f"{what}: quant_conv does not output mean and log-variance of {embed_dim}")
    return VAEConfig(
        in_channels=in_channels,
        out_ch=_need(s, "decoder.conv_out.weight", what)[0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=res_blocks,
        z_channels=z_channels,
        embed_dim=embed_dim,
        scaling_factor=0.18215,
    )


# ------------------------------------------------------------------------------------------------------ consistency


def _check_consistent(unet: UNetConfig, vae: VAEConfig, text_encoder: TextEncoderConfig) -> None:
    if unet.context_dim != text_encoder.hidden_size:
        raise UnsupportedModelError(
            f"inconsistent checkpoint: UNet cross-attention context_dim {unet.context_dim} differs from the text "
            f"encoder width {text_encoder.hidden_size}"
        )
    _check_latents(unet, vae)


def _check_latents(unet: UNetConfig, vae: VAEConfig) -> None:
    latent = vae.embed_dim
    if unet.out_channels != latent or unet.in_channels not in (latent, 2 * latent + 1):
        raise UnsupportedModelError(
            f"UNet with {unet.in_channels} input / {unet.out_channels} output channels does not fit the VAE's "
            f"{latent} latent channels; rtsd supports {latent} (text-to-image) and {2 * latent + 1} (inpainting) inputs"
        )
