"""Strict LoRA matching on real-shaped models (SD 1.5 / SD 2.1 key and shape tables, no weights loaded): a file for
another family, a key that addresses nothing, a shape that does not fit, each fail with one line naming the family
the file was made for and a few of the keys; nothing is applied in part. Pickled .pt payloads are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rtsd.adapters.lora import LoraError, read_lora, stack_deltas
from rtsd.adapters.lora_keys import lora_table
from rtsd.errors import CheckpointError
from rtsd.models.synthetic import PRESETS, checkpoint_shapes


@pytest.fixture(scope="module")
def tables():
    return {p: lora_table(checkpoint_shapes(p), PRESETS[p].unet.num_res_blocks) for p in ("sd15", "sd21")}


def _lora(tmp_path, modules: dict[str, tuple[int, int]], name="x.safetensors", rank=4):
    """kohya-style file: module -> (out, in) of a Linear."""
    state = {}
    for module, (out, inp) in modules.items():
        state[f"{module}.lora_down.weight"] = torch.randn(rank, inp)
        state[f"{module}.lora_up.weight"] = torch.randn(out, rank)
        state[f"{module}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(tmp_path / name))
    return read_lora(tmp_path / name)


def _error(lora, table, family):
    with pytest.raises(LoraError) as info:
        stack_deltas([(lora, 1.0)], table, family)
    message = str(info.value)
    assert "\n" not in message and "nothing was applied" in message
    return message


def test_a_matching_sd15_lora_applies(tmp_path, tables):
    lora = _lora(tmp_path, {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 768),
                            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)})
    per_key = stack_deltas([(lora, 0.5)], tables["sd15"], "sd1")
    assert sorted(per_key) == [
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]


def test_an_sdxl_lora_on_sd15_names_sdxl(tmp_path, tables):
    lora = _lora(tmp_path, {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k": (640, 2048),
                            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
                            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)}, "xl.safetensors")
    message = _error(lora, tables["sd15"], "sd1")
    assert "made for SDXL, not for this SD 1.x model" in message and "3 of 3 modules" in message
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in message


def test_an_sd1_text_encoder_lora_on_sd21_names_sd1(tmp_path, tables):
    lora = _lora(tmp_path, {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
                            "lora_te_text_model_encoder_layers_0_mlp_fc1": (3072, 768)}, "sd1te.safetensors")
    message = _error(lora, tables["sd21"], "sd2")
    assert "made for SD 1.x, not for this SD 2.x model" in message
    assert "update [768, 768], weight [1024, 1024]" in message


def test_an_sd1_unet_lora_on_sd21_names_sd1(tmp_path, tables):
    lora = _lora(tmp_path, {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 768)})
    assert "made for SD 1.x" in _error(lora, tables["sd21"], "sd2")


def test_one_unknown_key_fails_the_whole_file(tmp_path, tables):
    lora = _lora(tmp_path, {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 768),
                            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn3_to_k": (640, 768)})
    message = _error(lora, tables["sd15"], "sd1")
    assert "1 of 2 modules" in message and "attn3_to_k (no such weight in this model)" in message


def test_a_tensor_that_is_no_lora_part_is_named(tmp_path, tables):
    save_file({"lora_unet_conv_in.lora_down.weight": torch.randn(4, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.randn(320, 4, 1, 1),
               "lora_unet_conv_in.dora_scale": torch.randn(1, 4, 1, 1)}, str(tmp_path / "dora.safetensors"))
    message = _error(read_lora(tmp_path / "dora.safetensors"), tables["sd15"], "sd1")
    assert "dora_scale (not a LoRA/LoHa/LoKr tensor)" in message


def test_inpainting_conv_in_gets_the_update_zero_padded(tmp_path):
    table = lora_table(checkpoint_shapes("tiny-inpaint"), 2)
    save_file({"lora_unet_conv_in.lora_down.weight": torch.randn(2, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.randn(32, 2, 1, 1)}, str(tmp_path / "c.safetensors"))
    (delta,) = stack_deltas([(read_lora(tmp_path / "c.safetensors"), 1.0)], table, "sd1").values()
    ((_, d),) = delta
    assert d.shape == (32, 9, 3, 3) and abs(d[:, :4]).max() > 0 and abs(d[:, 4:]).max() == 0


class Payload:  # any non-tensor object: weights_only refuses to rebuild it
    def __reduce__(self):
        return (print, ("this would have run",))


def test_pt_loras_load_through_weights_only_and_pickled_payloads_are_refused(tmp_path):
    good = {"lora_unet_conv_in.lora_down.weight": torch.randn(4, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.randn(320, 4, 1, 1)}
    torch.save(good, tmp_path / "good.pt")
    assert sorted(read_lora(tmp_path / "good.pt").tensors) == sorted(good)
    torch.save({**good, "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        read_lora(tmp_path / "evil.pt")
    assert "will not unpickle" in str(info.value) and "\n" not in str(info.value)
