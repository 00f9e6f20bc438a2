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


def _rtsd_merge(checkpoint, preset, files):
    """rtsd's merged LDM state dict (float32) for [(path, scale)]."""
    ldm = {k: v.float().numpy() for k, v in load_file(str(checkpoint)).items()}
    table = lora_table({k: v.shape for k, v in ldm.items()}, PRESETS[preset].unet.num_res_blocks)
    per_key = stack_deltas([(read_lora(p), s) for p, s in files], table, PRESETS[preset].family)
    return {**ldm, **{k: merged(ldm[k], d) for k, d in per_key.items()}}, set(per_key)


def _pipeline(checkpoint, preset):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers_oracle import load_oracles

    o = load_oracles(checkpoint, PRESETS[preset])
    pipe = StableDiffusionPipeline(vae=o.vae, text_encoder=o.text_encoder, tokenizer=None, unet=o.unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


def _compare_with_diffusers(tmp_path, checkpoint, preset, merged_ldm, pipe):
    """Our merged LDM weights, converted by diffusers' own converters, vs the fused diffusers modules."""
    from diffusers_oracle import load_oracles

    path = tmp_path / "merged.safetensors"
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in merged_ldm.items()}, str(path))
    ours = load_oracles(path, PRESETS[preset])
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

