"""The LDM ``ControlNet`` (cldm.py) of Stable Diffusion 1.x / 2.x, written to export cleanly.

A trainable copy of the UNet encoder (``time_embed``, ``input_blocks``, ``middle_block``: the UNet's own modules)
plus what ControlNet adds: ``input_hint_block`` (control image at full resolution -> latent-size features, added after
the first input block), ``zero_convs.N.0`` (one 1x1 conv per input block) and ``middle_block_out.0``. Attribute names
mirror the checkpoint keys under ``control_model.``; loading is strict.

``controlnet(sample, timestep, context, control_image, conditioning_scale)`` -> the 13 residuals of SD 1.x / 2.x
(rtsd.control_layout), residual k multiplied by ``conditioning_scale[k]`` (one scale per residual: plain scaling
repeats one value, diffusers' guess mode passes its log-spaced ramp).
"""

from __future__ import annotations

import torch
from torch import nn

from rtsd.config import UNetConfig
from rtsd.control_layout import residual_layout
from rtsd.models.unet import Downsample, ResBlock, SpatialTransformer, TimestepEmbedSequential, timestep_embedding

# The hint encoder's widths (cldm.py and diffusers' ControlNetConditioningEmbedding): three stride-2 convs take the
# control image down 8x, to the latent size.
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


class ControlNetModel(nn.Module):
    def __init__(self, config: UNetConfig, hint_channels: int = 3):
        super().__init__()
        self.config = config
        mc, groups = config.model_channels, config.norm_num_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        hint: list[nn.Module] = []
        width = hint_channels
        for out, stride in zip(HINT_CHANNELS, HINT_STRIDES):  # conv, SiLU pairs: convs at even indices 0..12
            hint += [nn.Conv2d(width, out, 3, padding=1, stride=stride), nn.SiLU()]
            width = out
        hint.append(nn.Conv2d(width, mc, 3, padding=1))  # index 14 (zero-initialised in training)
        self.input_hint_block = nn.Sequential(*hint)

        def transformer(channels: int) -> SpatialTransformer:
            heads, head_dim = config.heads_at(channels)
            return SpatialTransformer(channels, heads, head_dim, config.transformer_depth, config.context_dim,
                                      config.use_linear_in_transformer, groups)

        # The UNet's input blocks, built in the same order as UNetModel's (so the keys are the same).
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        ch, ds = mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups), transformer(ch), ResBlock(ch, emb_dim, ch, groups))

        layout = residual_layout(config)
        self.zero_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(r.channels, r.channels, 1)) for r in layout[:-1])
        self.middle_block_out = nn.Sequential(nn.Conv2d(layout[-1].channels, layout[-1].channels, 1))
        self.residual_names = [r.name for r in layout]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                control_image: torch.Tensor, conditioning_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=sample.device)
        timestep = timestep.reshape(-1).expand(sample.shape[0])
        emb = self.time_embed(timestep_embedding(timestep, self.config.model_channels).to(sample.dtype))
        hint = self.input_hint_block(control_image.to(sample.dtype))
        scale = conditioning_scale.to(sample.dtype)
        outs = []
        h = sample
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + hint
            outs.append(zero_conv(h) * scale[index])
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h) * scale[len(outs)])
        return tuple(outs)
