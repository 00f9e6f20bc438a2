"""Prompts -> the UNet's text context through the text-encoder engine: syntax, chunks, embeddings, emphasis.

``prepare`` does all the host work and every check before any engine runs (syntax, chunking, the prompt-length
limit of the engines); ``encode`` runs the text encoder once per chunk position over all prompt rows and joins the
chunks along the token axis, (rows, 77 x chunks, C). A prompt with fewer chunks than the longest one in the call
(e.g. an empty negative prompt beside a long prompt) gets the empty prompt's chunk, as A1111 does.

Textual-inversion vectors travel in the text encoder's ``extra_embeddings`` input: each call numbers the vectors it
uses 0..k-1 and writes ids ``vocab_size + k`` in their token positions (the engine-directory contract,
rtsd/export/specs.py). Engine directories of format 1 have no such input: they run prompts of one chunk (75
tokens), with the attention syntax, and refuse embeddings and longer prompts with a message to re-export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rtsd.adapters.embeddings import Embedding, EmbeddingStore
from rtsd.errors import EngineDirError
from rtsd.export.specs import IOSpec, ShapeRange
from rtsd.prompt import Chunk, apply_emphasis, frame, parse_attention, split_chunks

PROMPT_SYNTAXES = ("a1111", "plain")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}


@dataclass
class PromptPlan:
    """Every row's chunks (evened to ``chunks``), and the embeddings the prompts call."""

    rows: list[list[Chunk]]
    chunks: int
    embeddings: list[Embedding]

    def describe_embeddings(self) -> list[dict]:
        return [e.describe() for e in self.embeddings]


class TextConditioning:
    def __init__(self, tokenizer, text_spec: IOSpec, config, shape_range: ShapeRange):
        self.tokenizer, self.shape_range = tokenizer, shape_range
        extra = next((t for t in text_spec.inputs if t.name == "extra_embeddings"), None)
        self.extra_rows = int(extra.shape[0]) if extra is not None else 0
        te = config.text_encoder
        # SDXL: one extra row holds every encoder's vector side by side (clip_l | clip_g), as the context does.
        self.vocab_size, self.width = te.vocab_size, config.context_dim
        self.encoder_widths = tuple(e.hidden_size for e in config.text_encoders)  # emphasis: a mean per encoder
        parts = tuple("clip_l" if e.kind == "clip" else "clip_g" for e in config.text_encoders) \
            if config.pooled_dim else ()
        self.embeddings = EmbeddingStore(self.width, FAMILY_NAMES.get(config.family, config.family),
                                         tokenizer.encode_pieces, parts)
        self._comma = tokenizer.token_to_id(",</w>")
        self._zeros = np.zeros((self.extra_rows, self.width), np.float32)

    def load_embedding(self, path: str | Path, token: str | None = None) -> Embedding:
        self._require_extra_rows()
        return self.embeddings.load(path, token)

    def load_embeddings_dir(self, directory: str | Path) -> list[Embedding]:
        self._require_extra_rows()
        return self.embeddings.load_dir(directory)

    def _require_extra_rows(self) -> None:
        if not self.extra_rows:
            raise EngineDirError("this engine directory was exported before textual inversion (manifest format 1: "
                                 "its text encoder takes token ids only); re-export it with this rtsd (`rtsd export`)")

    def prepare(self, prompts: Sequence[str], syntax: str = "a1111") -> PromptPlan:
        """Parse and chunk every prompt row; raise ValueError if the engines cannot take the longest one."""
        if syntax not in PROMPT_SYNTAXES:
            raise ValueError(f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}, got {syntax!r}")
        cache: dict[str, list[Chunk]] = {}
        for text in prompts:
            if text not in cache:
                pieces = parse_attention(text) if syntax == "a1111" else [(text, 1.0)]
                cache[text] = split_chunks(pieces, self.tokenizer.encode_pieces, self._comma,
                                           self.embeddings if len(self.embeddings) else None)
        longest = max(prompts, key=lambda text: len(cache[text]))
        count = len(cache[longest])
        self.shape_range.check_chunks(count, what=f"the prompt {_quote(longest)}")
        rows = [cache[text] + [Chunk()] * (count - len(cache[text])) for text in prompts]
        used = dict.fromkeys(token for chunks in cache.values() for chunk in chunks for token in chunk.embeddings())
        return PromptPlan(rows, count, [self.embeddings[token] for token in used])

    def encode(self, engine, plan: PromptPlan):
        """The context (rows, 77 x chunks, C) on the engine's array module."""
        return self.encode_with_pooled(engine, plan)[0]

    def encode_with_pooled(self, engine, plan: PromptPlan):
        """(context, pooled): SDXL's text encoder also gives ``text_embeds``, taken from the first chunk (None for
        engines without it)."""
        xp, tok = engine.xp, self.tokenizer
        parts, pooled = [], None
        for index in range(plan.chunks):
            framed = [frame(row[index], tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) for row in plan.rows]
            ids, extra = self._ids_and_rows([slots for slots, _ in framed])
            feeds = {"input_ids": xp.asarray(ids)}
            if self.extra_rows:
                feeds["extra_embeddings"] = xp.asarray(extra)
            outputs = engine.infer(feeds)
            hidden = outputs["hidden_states"]
            if index == 0:
                pooled = outputs.get("text_embeds")
            weights = np.array([w for _, w in framed], dtype=np.float32)
            if (weights != 1.0).any():  # emphasis on the host: a few hundred KB per chunk
                hidden = xp.asarray(apply_emphasis(engine.to_host(hidden), weights, self.encoder_widths))
            parts.append(hidden)
        return (parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=1)), pooled

    def _ids_and_rows(self, rows: list[list]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (rows, 77) with embedding vectors numbered from vocab_size, and the extra rows they select."""
        numbered: dict[tuple[str, int], int] = {}
        ids = np.empty((len(rows), len(rows[0])), dtype=np.int64)
        for r, slots in enumerate(rows):
            for p, slot in enumerate(slots):
                if not isinstance(slot, int):  # an embedding vector: the next free extra row
                    slot = self.vocab_size + numbered.setdefault(slot, len(numbered))
                ids[r, p] = slot
        if not numbered:
            return ids, self._zeros
        extra = self._zeros.copy()
        for (token, i), k in numbered.items():
            extra[k] = self.embeddings[token].vectors[i]
        return ids, extra


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
