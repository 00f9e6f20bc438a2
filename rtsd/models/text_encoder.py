"""Text encoders: OpenAI CLIP as stored by SD 1.x (``cond_stage_model.transformer.text_model.*``, transformers
layout) and OpenCLIP as stored by SD 2.x (``cond_stage_model.model.*``).

Both return the hidden states the UNet is conditioned on, (N, 77, C): the layer picked by
``TextEncoderConfig.output_layer`` (-1 last, -2 penultimate, ...) with the final LayerNorm applied. Both take
optional ``extra_embeddings`` (E, C): an id ``vocab_size + k`` picks its row k instead of the token table
(textual-inversion vectors; the engine-directory contract in rtsd/export/specs.py). Layers after
the chosen one are kept when the checkpoint has them (another output layer can be chosen later) but never run;
when it lacks them (diffusers' SD 2.x folders drop OpenCLIP's last layer) they are removed at load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rtsd.config import TextEncoderConfig
from rtsd.errors import CheckpointError

# Keys real checkpoints carry that no network computation reads: CLIP's position_ids buffer (we use arange; some
# community checkpoints store it as corrupt floats), OpenCLIP's contrastive-loss temperature and pooled projection.
UNUSED_TEXT_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.model.logit_scale",
    "cond_stage_model.model.text_projection",
)


def embed_tokens(table: nn.Embedding, input_ids: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """Token vectors: ids below the vocabulary from ``table``, ids past it from the rows of ``extra``.

    Two gathers and a select (no concatenation with the 49408-row table, which would copy it on every call)."""
    if extra is None:
        return table(input_ids)
    vocab = table.num_embeddings
    is_extra = input_ids >= vocab
    own = table(torch.where(is_extra, torch.zeros_like(input_ids), input_ids))
    added = F.embedding(torch.where(is_extra, input_ids - vocab, torch.zeros_like(input_ids)), extra.to(own.dtype))
    return torch.where(is_extra.unsqueeze(-1), added, own)


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"text encoder activation {name!r} is not supported (use 'quick_gelu' or 'gelu')")


def _layers_to_run(config: TextEncoderConfig) -> int:
    if not -config.num_layers <= config.output_layer <= -1:
        raise ValueError(f"text encoder output_layer must be in [-{config.num_layers}, -1], got {config.output_layer}")
    return config.num_layers + config.output_layer + 1


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Causal multi-head attention on (N, L, heads*head_dim) tensors."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    # An explicit mask in the activations' dtype: torch's ONNX exporter builds the is_causal mask in float32, which
    # breaks an fp16-traced graph (SDXL's fp16 export); the values are the same (-inf above the diagonal).
    length = q.shape[-2]
    mask = torch.full((length, length), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class LayerStackEncoder(nn.Module):
    """What both text encoders share: a stack of layers of which the first ``num_layers_run`` run."""

    layers_key = ""  # state-dict prefix of the layer stack, set by each subclass

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.num_layers_run = _layers_to_run(config)

    def layer_stack(self) -> nn.ModuleList:
        raise NotImplementedError

    def fit_stored_layers(self, keys: Iterable[str]) -> None:
        """Remove the trailing layers that ``keys`` (state-dict keys) lack, if this encoder never runs them.

        Removed rather than left unloaded, so that a deeper output layer chosen afterwards fails to load instead of
        running weights that were never read. Layers it does run must be there: CheckpointError otherwise.
        """
        pattern = re.compile(re.escape(self.layers_key) + r"(\d+)\.")
        stored = 1 + max((int(m[1]) for key in keys if (m := pattern.match(key))), default=-1)
        built = len(self.layer_stack())
        if stored == 0 or stored >= built:
            return  # nothing of the stack at all, or all of it: the strict load says what is wrong, if anything
        if stored < self.num_layers_run:
            raise CheckpointError(
                f"the text encoder weights have {stored} of {built} layers, but output layer "
                f"{self.config.output_layer} runs {self.num_layers_run}; condition on layer {stored - built - 1} or "
                f"earlier (clip skip {built - stored + 1} or more), or use a single-file checkpoint that has them all"
            )
        del self.layer_stack()[stored:]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, after ``fit_stored_layers``: strict about every layer that runs."""
        self.fit_stored_layers(state_dict.keys())
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ------------------------------------------------------------------------------------------- OpenAI CLIP (SD 1.x)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.self_attn = CLIPAttention(config.hidden_size, config.num_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, extra_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        tokens = embed_tokens(self.token_embedding, input_ids, extra_embeddings)
        return tokens + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextHolder(nn.Module):
    """``transformer.text_model``: the nesting transformers' CLIPTextModel gives the SD 1.x keys."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(config)


class CLIPTextEncoder(LayerStackEncoder):
    """SD 1.x text encoder: ``text_encoder(input_ids)`` -> (N, 77, hidden_size)."""

    layers_key = "transformer.text_model.encoder.layers."

    def __init__(self, config: TextEncoderConfig):
        super().__init__(config)
        self.transformer = CLIPTextHolder(config)

    def layer_stack(self) -> nn.ModuleList:
        return self.transformer.text_model.encoder.layers

    def forward(self, input_ids: torch.Tensor, extra_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        model = self.transformer.text_model
        x = model.embeddings(input_ids, extra_embeddings)
        for layer in model.encoder.layers[: self.num_layers_run]:
            x = layer(x)
        return model.final_layer_norm(x) if self.config.final_norm else x


# ---------------------------------------------------------------------------------------------- OpenCLIP (SD 2.x)


class OpenCLIPAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter layout (packed q/k/v ``in_proj``), computed with SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        if not self.in_proj_weight.is_meta:
            nn.init.xavier_uniform_(self.in_proj_weight)
            nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(causal_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = OpenCLIPAttention(config.hidden_size, config.num_heads)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = OpenCLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.num_layers))


class OpenCLIPTextModel(nn.Module):
    """``model``: OpenCLIP's text tower (the visual tower is not in SD 2.x checkpoints)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positional_embedding = nn.Parameter(torch.empty(config.max_position_embeddings, config.hidden_size))
        if not self.positional_embedding.is_meta:
            nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer = OpenCLIPTransformer(config)
        self.ln_final = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.projection_dim:  # SDXL's ViT-bigG: the pooled output's projection (x @ text_projection)
            self.text_projection = nn.Parameter(torch.empty(config.hidden_size, config.projection_dim))
            if not self.text_projection.is_meta:
                nn.init.normal_(self.text_projection, std=config.hidden_size**-0.5)


class OpenCLIPTextEncoder(LayerStackEncoder):
    """SD 2.x text encoder: ``text_encoder(input_ids)`` -> (N, 77, hidden_size), penultimate layer + ln_final."""

    layers_key = "model.transformer.resblocks."

    def __init__(self, config: TextEncoderConfig):
        super().__init__(config)
        self.model = OpenCLIPTextModel(config)

    def layer_stack(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    def forward(self, input_ids: torch.Tensor, extra_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        tokens = embed_tokens(self.model.token_embedding, input_ids, extra_embeddings)
        x = tokens + self.model.positional_embedding[: input_ids.shape[1]]
        for block in self.model.transformer.resblocks[: self.num_layers_run]:
            x = block(x)
        return self.model.ln_final(x) if self.config.final_norm else x

    def hidden_and_pooled(
        self, input_ids: torch.Tensor, extra_embeddings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: the output layer's hidden states and the pooled vector (every layer, ln_final, the row of the highest
        id, times text_projection), in one pass over the layers."""
        tokens = embed_tokens(self.model.token_embedding, input_ids, extra_embeddings)
        x = tokens + self.model.positional_embedding[: input_ids.shape[1]]
        hidden = x
        for index, block in enumerate(self.model.transformer.resblocks):
            x = block(x)
            if index == self.num_layers_run - 1:
                hidden = x
        hidden = self.model.ln_final(hidden) if self.config.final_norm else hidden
        # sgm's text.argmax(-1) (transformers' legacy eos_token_id 2 rule): the first EOS, the highest vocabulary id,
        # unless a textual-inversion id (past the vocabulary) is higher, as in sgm and diffusers.
        eos = input_ids.to(torch.int32).argmax(dim=-1)
        last = self.model.ln_final(x)[torch.arange(x.shape[0], device=x.device), eos]
        return hidden, last @ self.model.text_projection


def build_text_encoder(config: TextEncoderConfig) -> LayerStackEncoder:
    if config.kind == "clip":
        return CLIPTextEncoder(config)
    if config.kind == "open_clip":
        return OpenCLIPTextEncoder(config)
    raise ValueError(f"text encoder kind {config.kind!r} is not supported (use 'clip' or 'open_clip')")
