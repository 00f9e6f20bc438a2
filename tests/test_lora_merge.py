"""Every LoRA format rtsd reads merges to the same weights as an independent implementation.

kohya (LoCon convs included) and PEFT files: diffusers' ``load_lora_weights`` + ``fuse_lora(lora_scale=s)`` on
diffusers/transformers models loaded from the same synthetic checkpoint. LyCORIS LoHa, LoKr and Tucker (which
diffusers does not load): the formulas written out here with torch. SD 1.x and SD 2.x (packed OpenCLIP q/k/v),
UNet and text encoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_files import kohya_state, lora_modules, peft_state, save_peft
from rtsd.adapters.lora import read_lora, stack_deltas, merged
from rtsd.adapters.lora_keys import lora_table
from rtsd.models.synthetic import PRESETS

pytest.importorskip("peft")  # diffusers' LoRA loading goes through PEFT


PUBLISHED_FAMILY = {"tiny": "sd15", "tiny-sd2": "sd21"}  # the oracle's literal published configs


def _rtsd_merge(checkpoint, preset, files):
    """rtsd's merged LDM state dict (float32) for [(path, scale)]."""
    ldm = {k: v.float().numpy() for k, v in load_file(str(checkpoint)).items()}
    table = lora_table({k: v.shape for k, v in ldm.items()}, PRESETS[preset].unet.num_res_blocks)
    per_key = stack_deltas([(read_lora(p), s) for p, s in files], table, PRESETS[preset].family)
    return {**ldm, **{k: merged(ldm[k], d) for k, d in per_key.items()}}, set(per_key)


def _pipeline(checkpoint, preset):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers_oracle import load_oracles

    o = load_oracles(checkpoint, PUBLISHED_FAMILY[preset])
    pipe = StableDiffusionPipeline(vae=o.vae, text_encoder=o.text_encoder, tokenizer=None, unet=o.unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


def _compare_with_diffusers(tmp_path, checkpoint, preset, merged_ldm, pipe):
    """Our merged LDM weights, converted by diffusers' own converters, vs the fused diffusers modules."""
    from diffusers_oracle import load_oracles

    path = tmp_path / "merged.safetensors"
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in merged_ldm.items()}, str(path))
    ours = load_oracles(path, PUBLISHED_FAMILY[preset])
    worst = {}
    for name, theirs_module, ours_module in (("unet", pipe.unet, ours.unet),
                                             ("text_encoder", pipe.text_encoder, ours.text_encoder)):
        theirs_state, ours_state = theirs_module.state_dict(), ours_module.state_dict()
        assert set(theirs_state) == set(ours_state), f"{name}: diffusers left LoRA layers in the model"
        for key, value in ours_state.items():
            # fp32 rounding: the two merges add the same products in a different order
            err = (value - theirs_state[key]).abs().max().item() / max(value.abs().max().item(), 1e-6)
            worst[f"{name}.{key}"] = err
    return worst


def _sampled(name: str) -> bool:
    """Every kind of target (attention, ff, proj, resnet convs, samplers, conv_in/out, time embedding, 3 text
    layers) without all ~400 modules: diffusers' PEFT injection is what makes this test slow."""
    parts = ("down_blocks.1.", "mid_block.", "up_blocks.0.upsamplers", "down_blocks.0.downsamplers", "conv_in",
             "conv_out", "time_embedding", "layers.0.", "layers.1.", "layers.11.")
    return any(p in name for p in parts)


@pytest.mark.slow  # ~45 s (diffusers' PEFT injection); run with: pytest -m slow tests/test_lora_merge.py
@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2"])
def test_kohya_locon_and_peft_match_diffusers_fuse_lora(preset, tmp_path, tiny_checkpoint, tiny_sd2_checkpoint):
    checkpoint = tiny_checkpoint if preset == "tiny" else tiny_sd2_checkpoint
    pipe = _pipeline(checkpoint, preset)
    modules = {k: m for k, m in lora_modules(pipe.unet, pipe.text_encoder).items() if _sampled(k)}
    kohya, peft = tmp_path / "style.safetensors", tmp_path / "detail.safetensors"
    save_file(kohya_state(modules, rank=4, alpha=2.0, seed=1), str(kohya))
    linear = {k: m for k, m in modules.items() if isinstance(m, torch.nn.Linear)}
    save_peft(peft, peft_state(linear, rank=8, seed=2), rank=8, alpha=4.0)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in modules.values())
    assert n_convs > 8 and any(k.endswith("conv_in") for k in modules)  # LoCon reaches conv_in, resnets, samplers

    pipe.load_lora_weights(str(kohya), adapter_name="style")
    pipe.load_lora_weights(str(peft), adapter_name="detail")
    pipe.set_adapters(["style", "detail"], adapter_weights=[1.0, 1.0])
    pipe.fuse_lora(lora_scale=0.7, adapter_names=["style", "detail"])
    pipe.unload_lora_weights()

    ours, touched = _rtsd_merge(checkpoint, preset, [(kohya, 0.7), (peft, 0.7)])
    packed = 2 * sum(k.endswith("q_proj") for k in modules) if preset == "tiny-sd2" else 0  # q/k/v: one in_proj
    assert len(touched) == len(modules) - packed
    worst = _compare_with_diffusers(tmp_path, checkpoint, preset, ours, pipe)
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    # and the LoRAs did move the weights far beyond that tolerance
    base = load_file(str(checkpoint))
    moved = max(float(np.abs(ours[k] - base[k].numpy()).max() / np.abs(base[k].numpy()).max()) for k in touched)
    assert moved > 1e-2



# ------------------------------------------------------------------------------------ LyCORIS (diffusers: none)

def _lycoris_cases(g):
    """(kohya module name, LDM key, rows, tensors, expected delta at scale 1) with the formulas written out here."""
    r, alpha = 4, 2.0

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    cases = []
    # LoHa on a Linear: (w1a @ w1b) * (w2a @ w2b) * alpha / r
    w = {"hada_w1_a": randn(32, r), "hada_w1_b": randn(r, 32), "hada_w2_a": randn(32, r), "hada_w2_b": randn(r, 32)}
    expected = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * alpha / r
    cases.append(("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                  "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", w, expected))
    # LoHa on a 3x3 conv: the products are (out, in*3*3), reshaped to the kernel
    w = {"hada_w1_a": randn(32, r), "hada_w1_b": randn(r, 32 * 9), "hada_w2_a": randn(32, r),
         "hada_w2_b": randn(r, 32 * 9)}
    expected = ((w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * alpha / r).view(32, 32, 3, 3)
    cases.append(("lora_unet_down_blocks_0_resnets_0_conv1",
                  "model.diffusion_model.input_blocks.1.0.in_layers.2.weight", w, expected))
    # LoKr, both factors full: kron(w1, w2), no alpha scaling
    w = {"lokr_w1": randn(4, 4), "lokr_w2": randn(8, 8)}
    cases.append(("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
                  "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", w,
                  torch.kron(w["lokr_w1"], w["lokr_w2"])))
    # LoKr, w2 decomposed on a 3x3 conv: kron(w1, w2a @ w2b viewed as (o2, i2, 3, 3)) * alpha / r
    w = {"lokr_w1": randn(4, 4), "lokr_w2_a": randn(8, r), "lokr_w2_b": randn(r, 8 * 9)}
    w2 = (w["lokr_w2_a"] @ w["lokr_w2_b"]).view(8, 8, 3, 3)
    expected = torch.stack([torch.stack([w["lokr_w1"][i, j] * w2 for j in range(4)], 1) for i in range(4)], 0)
    assert expected.shape == (4, 8, 4, 8, 3, 3)
    expected = expected.reshape(32, 32, 3, 3) * alpha / r  # [i, o2, j, i2]: row i*8+o2, column j*8+i2
    cases.append(("lora_unet_down_blocks_0_resnets_0_conv2",
                  "model.diffusion_model.input_blocks.1.0.out_layers.3.weight", w, expected))
    # Tucker (LoCon with lora_mid): conv 1x1 down -> kxk mid -> 1x1 up, composed
    w = {"lora_down.weight": randn(r, 32, 1, 1), "lora_mid.weight": randn(r, r, 3, 3),
         "lora_up.weight": randn(32, r, 1, 1)}
    expected = torch.zeros(32, 32, 3, 3)
    for o in range(32):
        for c in range(32):
            for i in range(r):
                for j in range(r):
                    expected[o, c] += w["lora_up.weight"][o, i, 0, 0] * w["lora_mid.weight"][i, j] * \
                        w["lora_down.weight"][j, c, 0, 0]
    cases.append(("lora_unet_up_blocks_3_resnets_0_conv2",
                  "model.diffusion_model.output_blocks.9.0.out_layers.3.weight", w, expected * alpha / r))
    return cases, alpha


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2"])
def test_lycoris_loha_lokr_tucker_follow_their_formulas(preset, tmp_path, tiny_checkpoint, tiny_sd2_checkpoint):
    checkpoint = tiny_checkpoint if preset == "tiny" else tiny_sd2_checkpoint
    g = torch.Generator().manual_seed(3)
    cases, alpha = _lycoris_cases(g)
    if preset == "tiny-sd2":  # the kernel shapes above are tiny's 32 channels; SD 2.x: a text-encoder LoHa on k
        cases = []
        w = {"hada_w1_a": torch.randn(128, 4, generator=g), "hada_w1_b": torch.randn(4, 128, generator=g),
             "hada_w2_a": torch.randn(128, 4, generator=g), "hada_w2_b": torch.randn(4, 128, generator=g)}
        expected = torch.zeros(384, 128)
        expected[128:256] = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * alpha / 4
        cases.append(("lora_te_text_model_encoder_layers_2_self_attn_k_proj",
                      "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight", w, expected))
        w = {"lokr_w1_a": torch.randn(8, 4, generator=g), "lokr_w1_b": torch.randn(4, 8, generator=g),
             "lokr_w2": torch.randn(32, 32, generator=g)}
        cases.append(("lora_unet_mid_block_attentions_0_proj_in",  # SD 2.x: a Linear proj_in
                      "model.diffusion_model.middle_block.1.proj_in.weight", w,
                      torch.kron(w["lokr_w1_a"] @ w["lokr_w1_b"], w["lokr_w2"]) * alpha / 4))
    state = {}
    for module, _, tensors, _ in cases:
        state.update({f"{module}.{k}": v.contiguous() for k, v in tensors.items()})
        state[f"{module}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "lycoris.safetensors"
    save_file(state, str(path))
    ours, touched = _rtsd_merge(checkpoint, preset, [(path, -0.4)])
    base = load_file(str(checkpoint))
    assert touched == {key for _, key, _, _ in cases}
    for _, key, _, delta in cases:
        want = base[key] + (-0.4) * delta
        err = (torch.from_numpy(ours[key]) - want).abs().max() / want.abs().max()
        assert err < 1e-5, (key, float(err))
        assert (want - base[key]).abs().max() / base[key].abs().max() > 1e-2  # it did change the weight
