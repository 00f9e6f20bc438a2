"""Where a ControlNet's residuals enter the UNet: one per UNet input block (its skip connection) plus the middle block.

Derived from the UNetConfig alone (count, channels and downsampling of each input block), so every family that keeps
the LDM encoder structure gets its residual contract from the same function: SD 1.x / 2.x have 12 input blocks
(conv_in, 4 levels x (2 res blocks) + 3 downsamplers) + the middle block = 13 residuals.

Torch-free: export specs, the runtime and the reference models all read it.
"""

from __future__ import annotations

from typing import NamedTuple

from rtsd.config import UNetConfig

MID_RESIDUAL = "mid_residual"


class Residual(NamedTuple):
    name: str  # the UNet input / ControlNet output tensor name
    channels: int
    downsample: int  # latent pixels per residual pixel (1, 2, 4, 8): spatial size = ceil(latent / downsample)


def residual_layout(unet: UNetConfig) -> list[Residual]:
    """The down residuals in input-block order, then the mid residual (as the UNet's skip connections are built)."""
    mc = unet.model_channels
    found = [(mc, 1)]  # conv_in
    ch, ds = mc, 1
    for level, mult in enumerate(unet.channel_mult):
        ch = mult * mc
        found += [(ch, ds)] * unet.num_res_blocks
        if level != len(unet.channel_mult) - 1:
            ds *= 2
            found.append((ch, ds))
    down = [Residual(f"down_residual_{i}", c, d) for i, (c, d) in enumerate(found)]
    return down + [Residual(MID_RESIDUAL, ch, ds)]


def residual_names(unet: UNetConfig) -> list[str]:
    return [r.name for r in residual_layout(unet)]


def guess_mode_scales(count: int, scale: float) -> list[float]:
    """diffusers' guess mode: residual k of ``count`` scaled by 10 ** (-1 + k / (count - 1)) (0.1 .. 1), times ``scale``."""
    return [scale * 10.0 ** (-1.0 + k / (count - 1)) for k in range(count)]
