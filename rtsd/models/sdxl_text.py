"""SDXL's text conditioning: ``conditioner.embedders.N`` of an sgm checkpoint, as one module.

The base has two embedders, OpenAI CLIP ViT-L/14 (``embedders.0.transformer.text_model.*``) and OpenCLIP ViT-bigG/14
(``embedders.1.model.*``, with ``text_projection``); the refiner only the second (as ``embedders.0``). Each gives
its penultimate hidden state without the final LayerNorm; the context is their concatenation along the channels
(768 + 1280 = 2048 for the base), and the pooled vector the UNet's added conditions take is bigG's final-norm
EOS token through ``text_projection`` (the row of each sequence's highest id, sgm's ``text.argmax(-1)``: the
first EOS, or a textual-inversion token's, whose ids lie past the vocabulary, as in sgm and diffusers).

The tokenizers of the two encoders differ only in padding: ViT-L pads with ``<|endoftext|>``, bigG with ``!``
(id 0). The module takes the first encoder's ids and re-pads them for the others in the graph, so the runtime and the
text-encoder engine keep one ``input_ids`` input.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rtsd.config import TextEncoderConfig
from rtsd.models.text_encoder import OpenCLIPTextEncoder, build_text_encoder

# In single files this module lives under ``conditioner.`` (rtsd.detection.component_prefixes): ``embedders.N.*``.

def repad(input_ids: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """``input_ids`` with every position after each row's first EOS set to ``pad``."""
    is_eos = (input_ids == eos).to(torch.int32)
    after_first = (torch.cumsum(is_eos, dim=1) - is_eos) > 0
    return torch.where(after_first, torch.full_like(input_ids, pad), input_ids)


class SDXLTextEncoder(nn.Module):
    """``encoder(input_ids)`` -> (context (N, 77, sum of widths), pooled (N, projection_dim))."""

    def __init__(self, configs: Iterable[TextEncoderConfig]):
        super().__init__()
        self.configs = tuple(configs)
        if not self.configs[-1].projection_dim or self.configs[-1].kind != "open_clip":
            raise ValueError("SDXL's last text encoder must be OpenCLIP with a text_projection (projection_dim > 0)")
        self.embedders = nn.ModuleList(build_text_encoder(c) for c in self.configs)
        self.config = self.configs[0]  # the tokenizer's conventions (pad, bos, eos) follow the first encoder

    def forward(
        self, input_ids: torch.Tensor, extra_embeddings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, start = [], 0
        for config, encoder in zip(self.configs, self.embedders):
            ids = input_ids
            if config.pad_token_id != self.config.pad_token_id:
                ids = repad(input_ids, config.eos_token_id, config.pad_token_id)
            # textual-inversion rows: this encoder's columns (clip_l | clip_g)
            extra = None if extra_embeddings is None else extra_embeddings[:, start: start + config.hidden_size]
            start += config.hidden_size
            if encoder is self.embedders[-1]:
                assert isinstance(encoder, OpenCLIPTextEncoder)
                states, pooled = encoder.hidden_and_pooled(ids, extra)
            else:
                states = encoder(ids, extra)
            hidden.append(states)
        return torch.cat(hidden, dim=-1), pooled

    def fit_stored_layers(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for index, encoder in enumerate(self.embedders):
            prefix = f"embedders.{index}."
            encoder.fit_stored_layers(k[len(prefix):] for k in keys if k.startswith(prefix))
