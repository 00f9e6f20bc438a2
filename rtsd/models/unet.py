"""The LDM ``UNetModel`` (openaimodel.py) of Stable Diffusion 1.x / 2.x and SDXL (sgm), written to export cleanly.

SDXL adds a per-level transformer depth (none at the first level) and ``label_emb``, the embedding of the pooled
text vector and the time ids (original size, crop top-left, target size; the refiner: aesthetic score instead of
the target size), added to the timestep embedding.

Attribute names mirror the checkpoint keys under ``model.diffusion_model.``: ``time_embed.0``, ``input_blocks.N.M``,
``middle_block.M``, ``output_blocks.N.M``, ``out.0`` / ``out.2``. Graph rules for ONNX/TensorRT: no Python control
flow on tensor values, attention through ``scaled_dot_product_attention``, nearest x2 upsampling by scale factor,
the timestep embedding computed from the timestep tensor with torch ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rtsd.config import UNetConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (LDM ``timestep_embedding``, diffusers ``flip_sin_to_cos=True``)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period) / half)
    args = timesteps.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on (N, L, heads*head_dim) tensors; the head split uses no batch/length sizes."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between (LDM ``ResBlock``)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Identity(),  # index 2 is the (inference-time no-op) dropout, kept so the conv stays at index 3
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Self-attention (``context_dim`` None) or cross-attention onto the text encoder states."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 is the dropout slot of the original, so the output projection keeps its key ``net.2``.
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image tokens attend to themselves and to the text; proj_in/out are 1x1 convs (SD 1.x) or Linear (SD 2.x)."""

    def __init__(
        self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int, linear: bool, groups: int
    ):
        super().__init__()
        inner = heads * head_dim
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (N, H*W, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        # ``size``: the skip connection's height and width, when an odd size made the downsampler round up
        # (latents that are not multiples of 8): nearest-upsample to exactly that size instead of x2.
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Passes the timestep embedding to ResBlocks and the text states to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                upsample_size: torch.Size | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """``unet(sample, timestep, encoder_hidden_states)`` -> the raw prediction (epsilon or v), shaped like sample."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc, groups = config.model_channels, config.norm_num_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        if config.adm_in_channels:
            # SDXL's added conditions (pooled text + time-id sinusoids) -> the timestep embedding's width.
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        def transformer(channels: int, depth: int = config.transformer_depth) -> SpatialTransformer:
            heads, head_dim = config.heads_at(channels)
            return SpatialTransformer(
                channels,
                heads,
                head_dim,
                depth,
                config.context_dim,
                config.use_linear_in_transformer,
                groups,
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        last_level = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if config.depth_at(level):
                    layers.append(transformer(ch, config.depth_at(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last_level:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups), transformer(ch), ResBlock(ch, emb_dim, ch, groups)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                if config.depth_at(level):
                    layers.append(transformer(ch, config.depth_at(level)))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1))

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
        down_residuals: "list[torch.Tensor] | None" = None, mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``text_embeds`` (N, pooled) and ``time_ids`` (N, ids): SDXL's added conditions (``adm_in_channels``);
        ``down_residuals`` / ``mid_residual``: ControlNet residuals added to the skip connections and the middle block."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._check_sample(sample)
        # A 0-d or (1,) timestep is broadcast over the batch; (N,) passes through unchanged.
        if not isinstance(timestep, torch.Tensor):  # a Python number, for convenience in eager use
            timestep = torch.tensor(timestep, device=sample.device)
        timestep = timestep.reshape(-1).expand(sample.shape[0])
        emb = self.time_embed(timestep_embedding(timestep, self.config.model_channels).to(sample.dtype))
        if self.config.adm_in_channels:
            emb = emb + self.label_emb(self._added_conditions(text_embeds, time_ids).to(sample.dtype))
        h = sample
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, encoder_hidden_states)
            skips.append(h)
        if down_residuals is not None:  # ControlNet: one residual per skip connection (rtsd.control_layout)
            skips = [skip + residual for skip, residual in zip(skips, down_residuals, strict=True)]
        h = self.middle_block(h, emb, encoder_hidden_states)
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # An upsampler at the end of this block must land on the next skip's size (odd after a rounded-up
            # downsampling when the latent is not a multiple of 8).
            h = block(h, emb, encoder_hidden_states, skips[-1].shape[-2:] if skips else None)
        return self.out(h)

    def _added_conditions(self, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> torch.Tensor:
        """SDXL's ``y``: the pooled text embedding, then each time id as a 256-wide sinusoid (sgm's
        ConcatTimestepEmbedderND, diffusers' add_time_proj)."""
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet (SDXL) needs text_embeds and time_ids")
        times = timestep_embedding(time_ids.reshape(-1), self.config.time_id_embed_dim)
        return torch.cat([text_embeds.to(times.dtype), times.reshape(time_ids.shape[0], -1)], dim=-1)

    def _check_sample(self, sample: torch.Tensor) -> None:
        # Eager-only: a wrong shape would otherwise fail deep inside with a convolution shape error.
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet sample must be (N, {self.config.in_channels}, H, W), got {tuple(sample.shape)}")
