"""The LDM ``AutoencoderKL`` (ldm/modules/diffusionmodules/model.py Encoder/Decoder + quant convs).

Attribute names mirror the checkpoint keys under ``first_stage_model.``. ``decode`` takes latents in UNet space
and ``encode`` returns them (the posterior mean), so callers never handle the scaling factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtsd.config import VAEConfig
from rtsd.models.unet import Upsample  # the LDM decoder's upsampler is the UNet's (nearest x2, 3x3 conv)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels; q/k/v/proj_out are 1x1 convs as stored in LDM checkpoints."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        # (N, C, H, W) -> (N, 1, H*W, C): one head as wide as the channels.
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LDM pads right/bottom only, then convolves without padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution level: ResnetBlocks, then a strided conv except at the deepest level."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # SD VAEs have no attention outside the mid block (attn_resolutions=[])
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level: ResnetBlocks, then x2 upsampling except at full resolution."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.ch, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        last = len(config.ch_mult) - 1
        for level, mult in enumerate(config.ch_mult):
            block_out = ch * mult
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            self.down.append(DownLevel(blocks, Downsample(block_in) if level != last else None))
        self.mid = MidBlock(block_in, groups)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.ch, config.norm_num_groups
        block_in = ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, groups)
        levels: list[UpLevel] = []
        for level in reversed(range(len(config.ch_mult))):
            block_out = ch * config.ch_mult[level]
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            levels.insert(0, UpLevel(blocks, Upsample(block_in) if level != 0 else None))
        self.up = nn.ModuleList(levels)  # indexed by resolution level, run from the deepest one
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (N, 3, H, W) -> posterior mean in UNet latent space (times the scaling factor)."""
        moments = self.quant_conv(self.encoder(images))
        mean = moments[:, : self.config.embed_dim]
        return mean * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet-space latents (N, C, h, w) -> images (N, 3, 8h, 8w), nominally in [-1, 1], not clamped."""
        return self.decoder(self.post_quant_conv(latents / self.config.scaling_factor))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder path, so that ``vae(latents)`` is what gets exported as the VAE decoder."""
        return self.decode(latents)
