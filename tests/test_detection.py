"""Architecture detection from shapes, checked against diffusers/transformers models built on the meta device.

The oracle runs both ways: diffusers' own LDM converters must map our LDM key/shape table back to the diffusers
model's state dict exactly, and diffusers' ``create_*_diffusers_config_from_ldm`` must turn the detected config back
into the config the diffusers model was built from. No full-size tensor is ever allocated.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.optional import require  # noqa: E402

torch = require("torch")
diffusers = require("diffusers")
transformers = require("transformers")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from rtsd import diffusers_keys  # noqa: E402
from rtsd.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig  # noqa: E402
from rtsd.detection import detect_config  # noqa: E402
from rtsd.errors import UnsupportedModelError  # noqa: E402

SD15_UNET = dict(cross_attention_dim=768)  # UNet2DConditionModel's defaults are SD 1.x's
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
)
SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)

TINY_UNET = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    transformer_layers_per_block=2,
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


def meta_models(unet: dict, vae: dict, clip: dict):
    with torch.device("meta"):
        return UNet2DConditionModel(**unet), AutoencoderKL(**vae), CLIPTextModel(CLIPTextConfig(**clip))


def ldm_meta_state(unet, vae, text) -> dict[str, torch.Tensor]:
    """LDM single-file state dict (meta tensors) made from the diffusers models by rtsd's key mapping."""
    out = {}
    for to_ldm, model in (
        (diffusers_keys.unet_to_ldm, unet),
        (diffusers_keys.vae_to_ldm, vae),
        (diffusers_keys.clip_to_ldm, text),
    ):
        state = model.state_dict()
        for ldm_key, src in to_ldm({k: tuple(t.shape) for k, t in state.items()}).items():
            out[ldm_key] = state[src.key].reshape(src.shape)
    return out


def shapes_of(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in state.items()}


def assert_same_shapes(converted: dict, reference: dict) -> None:
    assert sorted(converted) == sorted(reference)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def ldm_original_config(config: ModelConfig) -> dict:
    """The original-config YAML (v1-inference.yaml layout) that a detected config stands for."""
    u, v = config.unet, config.vae
    unet = dict(
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        model_channels=u.model_channels,
        channel_mult=list(u.channel_mult),
        num_res_blocks=u.num_res_blocks,
        attention_resolutions=list(u.attention_resolutions),
        transformer_depth=u.transformer_depth,
        context_dim=u.context_dim,
        use_linear_in_transformer=u.use_linear_in_transformer,
    )
    unet.update({"num_heads": u.num_heads} if u.num_heads > 0 else {"num_head_channels": u.num_head_channels})
    ddconfig = dict(
        in_channels=v.in_channels, out_ch=v.out_ch, ch=v.ch, ch_mult=list(v.ch_mult),
        num_res_blocks=v.num_res_blocks, z_channels=v.z_channels,
    )  # fmt: skip
    return {
        "model": {
            "params": {
                "scale_factor": v.scaling_factor,
                "unet_config": {"params": unet},
                "first_stage_config": {"params": {"ddconfig": ddconfig, "embed_dim": v.embed_dim}},
            }
        }
    }


def assert_diffusers_agrees(config: ModelConfig, state: dict, unet, vae) -> None:
    """diffusers turns the detected config back into the configs the diffusers models were built from."""
    original = ldm_original_config(config)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, state)
    for name, value in unet_config.items():
        if name in ("sample_size", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
                    "projection_class_embeddings_input_dim"):  # fmt: skip
            continue
        expected = unet.config[name]
        if name == "transformer_layers_per_block" and isinstance(expected, (list, tuple)):
            expected = expected[0]
        assert _plain(value) == _plain(expected), name
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, state)
    for name, value in vae_config.items():
        if name != "sample_size":
            assert _plain(value) == _plain(vae.config[name]), name


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# ------------------------------------------------------------------------------------------------------ SD 1.5 size


@pytest.fixture(scope="module")
def sd15():
    unet, vae, text = meta_models(SD15_UNET, SD15_VAE, SD15_CLIP)
    return unet, vae, text, ldm_meta_state(unet, vae, text)


def test_sd15_key_counts_match_the_real_checkpoint(sd15):
    _, _, _, state = sd15
    unet = {k: t for k, t in state.items() if k.startswith("model.diffusion_model.")}
    vae = [k for k in state if k.startswith("first_stage_model.")]
    text = [k for k in state if k.startswith("cond_stage_model.transformer.text_model.")]
    assert len(unet) == 686
    assert sum(t.numel() for t in unet.values()) == 859_520_964
    assert len(vae) == 248
    assert len(text) == 196
    assert len(state) == 686 + 248 + 196
    # diffusers' converter accepts an upsampler at either slot, so pin LDM's: after the attention when there is one.
    for key in (
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
        "input_blocks.3.0.op.weight", "output_blocks.11.0.skip_connection.weight", "middle_block.1.proj_in.weight",
    ):  # fmt: skip
        assert "model.diffusion_model." + key in state
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert state["first_stage_model.decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert state["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)


def test_sd15_table_round_trips_through_diffusers_converters(sd15):
    unet, vae, text, state = sd15
    assert_same_shapes(sfu.convert_ldm_unet_checkpoint(state, dict(unet.config)), unet.state_dict())
    assert_same_shapes(sfu.convert_ldm_vae_checkpoint(state, dict(vae.config)), vae.state_dict())
    clip = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(state).items()}
    assert_same_shapes(clip, text.state_dict())
    assert sfu.infer_diffusers_model_type(state) == "v1"


def test_sd15_detects_as_the_sd15_config(sd15):
    unet, vae, _, state = sd15
    config = detect_config(shapes_of(state))
    # The config defaults are SD 1.5 (v1-inference.yaml, CLIP ViT-L/14).
    assert config == ModelConfig(family="sd1")
    assert not config.is_inpainting and config.latent_channels == 4
    assert config.unet.heads_at(320) == (8, 40)
    assert_diffusers_agrees(config, state, unet, vae)


def test_sd15_inpainting_detects_nine_input_channels():
    unet, vae, text = meta_models(dict(SD15_UNET, in_channels=9), SD15_VAE, SD15_CLIP)
    state = ldm_meta_state(unet, vae, text)
    config = detect_config(shapes_of(state))
    assert config.is_inpainting and config.unet.in_channels == 9 and config.unet.out_channels == 4
    assert sfu.infer_diffusers_model_type(state) == "inpainting"
    assert_diffusers_agrees(config, state, unet, vae)


# ------------------------------------------------------------------------------------------------------ tiny layouts

TINY_LAYOUTS = {
    "tiny": (TINY_UNET, TINY_VAE, TINY_CLIP),
    "attention-on-lower-levels": (
        dict(
            TINY_UNET,
            block_out_channels=(32, 64, 96),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            transformer_layers_per_block=1,
        ),
        dict(TINY_VAE, block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2),  # fmt: skip
        TINY_CLIP,
    ),
    "inpainting-linear-proj": (
        dict(TINY_UNET, in_channels=9, use_linear_projection=True, cross_attention_dim=64),
        TINY_VAE,
        dict(TINY_CLIP, hidden_size=64, num_attention_heads=1, max_position_embeddings=40, vocab_size=1000),
    ),
}


@pytest.mark.parametrize("layout", sorted(TINY_LAYOUTS))
def test_tiny_layouts_round_trip_and_detect(layout):
    unet_kwargs, vae_kwargs, clip_kwargs = TINY_LAYOUTS[layout]
    unet, vae, text = meta_models(unet_kwargs, vae_kwargs, clip_kwargs)
    state = ldm_meta_state(unet, vae, text)
    assert_same_shapes(sfu.convert_ldm_unet_checkpoint(state, dict(unet.config)), unet.state_dict())
    assert_same_shapes(sfu.convert_ldm_vae_checkpoint(state, dict(vae.config)), vae.state_dict())

    config = detect_config(shapes_of(state))
    assert config.family == "sd1"
    assert_diffusers_agrees(config, state, unet, vae)
    u = unet.config
    assert config.unet.use_linear_in_transformer == u.use_linear_projection
    assert config.unet.num_heads == 8 and config.unet.num_head_channels == -1
    assert config.vae == VAEConfig(
        ch=vae.config.block_out_channels[0],
        ch_mult=tuple(c // vae.config.block_out_channels[0] for c in vae.config.block_out_channels),
        num_res_blocks=vae.config.layers_per_block,
        z_channels=vae.config.latent_channels,
        embed_dim=vae.config.latent_channels,
    )
    c = text.config
    assert config.text_encoder == TextEncoderConfig(
        kind="clip",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=max(1, c.hidden_size // 64),
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
    )


def test_tiny_transformer_depth_and_attention_levels():
    unet, vae, text = meta_models(*TINY_LAYOUTS["attention-on-lower-levels"])
    config = detect_config(shapes_of(ldm_meta_state(unet, vae, text)))
    assert config.unet == UNetConfig(
        model_channels=32, channel_mult=(1, 2, 3), num_res_blocks=2, attention_resolutions=(4, 2),
        transformer_depth=1, context_dim=32,
    )  # fmt: skip
    unet, vae, text = meta_models(*TINY_LAYOUTS["tiny"])
    assert detect_config(shapes_of(ldm_meta_state(unet, vae, text))).unet.transformer_depth == 2


# ------------------------------------------------------------------------------------------------------- rejections


@pytest.fixture(scope="module")
def tiny_shapes():
    return shapes_of(ldm_meta_state(*meta_models(TINY_UNET, TINY_VAE, TINY_CLIP)))


def test_sdxl_keys_are_named(tiny_shapes):
    shapes = {k: v for k, v in tiny_shapes.items() if not k.startswith("cond_stage_model.")}
    shapes["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 768)
    shapes["conditioner.embedders.1.model.token_embedding.weight"] = (49408, 1280)
    with pytest.raises(UnsupportedModelError, match=r"SDXL checkpoint \(conditioner\.embedders\.\* keys\).*SD 1\.x"):
        detect_config(shapes)


def test_adm_unet_is_named(tiny_shapes):
    with pytest.raises(UnsupportedModelError, match="label_emb"):
        detect_config({**tiny_shapes, "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)})


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({}, "no model tensors"),
        ({"foo.bar": (3,)}, "incomplete checkpoint: no unet, vae, text_encoder"),
        ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "unknown diffusion model"),
    ],
)
def test_garbage_raises(shapes, message):
    with pytest.raises(UnsupportedModelError, match=message):
        detect_config(shapes)


def test_unet_only_file_names_what_is_missing(tiny_shapes):
    unet_only = {k: v for k, v in tiny_shapes.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(UnsupportedModelError, match="no vae, text_encoder tensors"):
        detect_config(unet_only)


def test_missing_tensor_is_named(tiny_shapes):
    shapes = dict(tiny_shapes)
    del shapes["model.diffusion_model.out.2.weight"]
    with pytest.raises(UnsupportedModelError, match=r"'out\.2\.weight' is missing"):
        detect_config(shapes)


def test_context_dim_must_match_text_encoder():
    unet, vae, text = meta_models(dict(TINY_UNET, cross_attention_dim=48), TINY_VAE, TINY_CLIP)
    with pytest.raises(UnsupportedModelError, match="context_dim 48 differs from the text encoder width 32"):
        detect_config(shapes_of(ldm_meta_state(unet, vae, text)))


def test_eight_channel_unet_is_refused():
    unet, vae, text = meta_models(dict(TINY_UNET, in_channels=8), TINY_VAE, TINY_CLIP)
    with pytest.raises(UnsupportedModelError, match="8 input"):
        detect_config(shapes_of(ldm_meta_state(unet, vae, text)))


def test_detection_is_pure_and_typed(tiny_shapes):
    before = dict(tiny_shapes)
    config = detect_config(tiny_shapes)
    assert tiny_shapes == before
    assert dataclasses.is_dataclass(config) and config == detect_config(dict(reversed(list(tiny_shapes.items()))))
    assert ModelConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------------------------------------------------- SD 2.x

SD21_UNET = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD21_TEXT = dict(width=1024, layers=24, mlp=4096)
OPEN_CLIP = "cond_stage_model.model."


def open_clip_shapes(width: int, layers: int, mlp: int, vocab: int = 49408, context: int = 77) -> dict:
    """The OpenCLIP text tower's state dict layout (open_clip TextTransformer), as SD 2.x checkpoints store it."""
    shapes = {
        "token_embedding.weight": (vocab, width),
        "positional_embedding": (context, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "text_projection": (width, width),
        "logit_scale": (),
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        shapes.update({
            block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
            block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (mlp, width), block + "mlp.c_fc.bias": (mlp,),
            block + "mlp.c_proj.weight": (width, mlp), block + "mlp.c_proj.bias": (width,),
        })  # fmt: skip
    return {OPEN_CLIP + k: v for k, v in shapes.items()}


def sd2_meta_state(unet_kwargs: dict, vae_kwargs: dict, width: int, layers: int, mlp: int):
    unet, vae, _ = meta_models(unet_kwargs, vae_kwargs, TINY_CLIP)
    state = {k: v for k, v in ldm_meta_state(unet, vae, _).items() if not k.startswith("cond_stage_model.")}
    with torch.device("meta"):
        state.update({k: torch.empty(shape) for k, shape in open_clip_shapes(width, layers, mlp).items()})
    return unet, vae, state


def test_open_clip_table_matches_diffusers_sd2_text_encoder():
    """diffusers' OpenCLIP converter maps our table onto transformers' CLIPTextModel (it drops layer 23, as SD 2.x
    conditions on the penultimate layer)."""
    _, _, state = sd2_meta_state(TINY_UNET, TINY_VAE, **SD21_TEXT)
    config = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu")  # fmt: skip
    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig(**config))
    converted = sfu.convert_open_clip_checkpoint(text, state)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if k != "text_projection.weight"}
    assert_same_shapes(converted, text.state_dict())


@pytest.fixture(scope="module")
def sd21():
    return sd2_meta_state(SD21_UNET, SD15_VAE, **SD21_TEXT)


def test_sd21_detects_as_sd2(sd21):
    unet, vae, state = sd21
    assert_same_shapes(sfu.convert_ldm_unet_checkpoint(state, dict(unet.config)), unet.state_dict())
    assert sfu.infer_diffusers_model_type(state) == "v2"
    config = detect_config(shapes_of(state))
    assert config == ModelConfig(
        family="sd2",
        unet=UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
        text_encoder=TextEncoderConfig(
            kind="open_clip", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
            hidden_act="gelu", output_layer=-2, pad_token_id=0,
        ),
    )  # fmt: skip
    assert config.unet.heads_at(320) == (5, 64) and config.unet.heads_at(1280) == (20, 64)
    # diffusers derives attention_head_dim (5, 10, 20, 20) from num_head_channels=64, as in SD 2.1's unet/config.json.
    assert_diffusers_agrees(config, state, unet, vae)
    assert config.prediction_type == "epsilon"  # weights cannot tell 768-v from 512-base: read_prediction_type can


def test_sd2_inpainting_detects():
    unet, vae, state = sd2_meta_state(dict(SD21_UNET, in_channels=9), SD15_VAE, **SD21_TEXT)
    config = detect_config(shapes_of(state))
    assert config.family == "sd2" and config.is_inpainting
    assert sfu.infer_diffusers_model_type(state) == "inpainting_v2"


def test_tiny_sd2_layout():
    unet_kwargs = dict(TINY_UNET, block_out_channels=(64, 128), cross_attention_dim=64, use_linear_projection=True,
                       attention_head_dim=(1, 2), transformer_layers_per_block=1)  # fmt: skip
    unet, vae, state = sd2_meta_state(unet_kwargs, TINY_VAE, width=64, layers=2, mlp=128)
    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=1, hidden_act="gelu"))  # fmt: skip
    converted = sfu.convert_open_clip_checkpoint(text, state)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if k != "text_projection.weight"}
    assert_same_shapes(converted, text.state_dict())
    config = detect_config(shapes_of(state))
    assert config.family == "sd2" and config.unet.model_channels == 64 and config.unet.channel_mult == (1, 2)
    assert config.text_encoder.num_layers == 2 and config.text_encoder.num_heads == 1
    assert_diffusers_agrees(config, state, unet, vae)


def test_sd2_attention_width_must_fit_64_wide_heads():
    unet_kwargs = dict(TINY_UNET, cross_attention_dim=64, use_linear_projection=True)  # 32-wide level 0
    _, _, state = sd2_meta_state(unet_kwargs, TINY_VAE, width=64, layers=2, mlp=128)
    with pytest.raises(UnsupportedModelError, match="32 is not a multiple of 64"):
        detect_config(shapes_of(state))


# ------------------------------------------------------------------------------------------- synthetic checkpoints


def test_synthetic_tiny_checkpoint_detects_and_fits_diffusers(tmp_path):
    """rtsd's own synthetic writer (another module) against diffusers: the detected config, turned into diffusers
    configs by diffusers itself, gives models whose state dicts the file's tensors convert onto exactly."""
    synthetic = require("rtsd.models.synthetic")  # needs torch (export extra): a failure in CI
    from rtsd.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(synthetic.write_checkpoint(tmp_path / "tiny.safetensors", "tiny", 0))
    config = detect_config(checkpoint.shapes)
    assert config.family == "sd1" and config.unet.channel_mult == (1, 2, 4, 4) and config.unet.num_res_blocks == 2
    with torch.device("meta"):
        state = {k: torch.empty(shape) for k, shape in checkpoint.shapes.items()}
        original = ldm_original_config(config)
        unet = UNet2DConditionModel(**sfu.create_unet_diffusers_config_from_ldm(original, state))
        vae = AutoencoderKL(**sfu.create_vae_diffusers_config_from_ldm(original, state))
        t = config.text_encoder
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings,
        ))  # fmt: skip
    assert_same_shapes(sfu.convert_ldm_unet_checkpoint(state, dict(unet.config)), unet.state_dict())
    assert_same_shapes(sfu.convert_ldm_vae_checkpoint(state, dict(vae.config)), vae.state_dict())
    clip = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(state).items()}
    assert_same_shapes(clip, text.state_dict())
