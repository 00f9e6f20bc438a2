"""Prompts as AUTOMATIC1111's web UI reads them: attention syntax, 75-token chunks, BREAK, and "Original" emphasis.

Syntax (``parse_attention``): ``(text)`` weighs text x1.1, ``[text]`` /1.1, ``(text:1.3)`` sets a factor, brackets
nest and multiply, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters, brackets left open are closed at
the end, and the word ``BREAK`` (upper case) ends the current chunk. A prompt without brackets, ``:``, backslashes
or BREAK parses to itself with weight 1, so it tokenizes exactly as a plain prompt.

Chunks (``split_chunks``): the weighted pieces are tokenized one by one and laid into chunks of 75 tokens. When a chunk
is full and a comma came within its last 20 tokens, the tokens after that comma move on to the next chunk, so a
phrase is not cut in two; a textual-inversion embedding (all its vectors) never straddles two chunks. Each chunk is
framed as ``bos, tokens, eos, pad...`` (77 ids) and encoded on its own; the runtime joins the encodings along the
token axis.

Emphasis (``apply_emphasis``): A1111's "Original" mode scales each token's encoded vector by its weight, then scales
the whole chunk back so its mean equals the mean before weighting. Unlike A1111, which takes that mean over every
prompt of a batch at once, rtsd takes it per prompt, so a prompt's conditioning does not depend on its batch mates
(the two agree for a batch of one prompt, A1111's usual case). SDXL's context joins two encoders' outputs along the
channels: each part restores its own mean, as in A1111, which wraps each SDXL embedder on its own. Also unlike
A1111, ``BREAK`` inside brackets still breaks (A1111 would encode the word with a negative weight).

Pure Python + NumPy: the torch-free runtime uses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

CHUNK_TOKENS = 75
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
BREAK = "BREAK"

# One token of the syntax per match: an escaped character, a lone backslash (dropped, as A1111 does), an opening
# bracket, a ":number)" closing with an explicit factor, a closing bracket, a run of plain text, or a lone colon.
_SYNTAX = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float | None]]:
    """``text`` -> [(text, weight)] in order, equal neighbours merged; a BREAK is ("BREAK", None)."""
    pieces: list[list] = []  # [text, weight]; weight None marks a BREAK, which no bracket scales
    open_at: dict[str, list[int]] = {"(": [], "[": []}

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in _SYNTAX.finditer(text):
        token, factor = match.group(0), _number(match.group(1))
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in ("(", "["):
            open_at[token].append(len(pieces))
        elif factor is not None and open_at["("]:
            scale_from(open_at["("].pop(), factor)
        elif token == ")" and open_at["("]:
            scale_from(open_at["("].pop(), ROUND_FACTOR)
        elif token == "]" and open_at["["]:
            scale_from(open_at["["].pop(), SQUARE_FACTOR)
        else:  # plain text, or a bracket / ":n)" with nothing open: literal, split at BREAK words
            for i, part in enumerate(_BREAK_WORD.split(token)):
                if i:
                    pieces.append([BREAK, None])
                pieces.append([part, 1.0])
    for start in open_at["("]:
        scale_from(start, ROUND_FACTOR)
    for start in open_at["["]:
        scale_from(start, SQUARE_FACTOR)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and piece[1] is not None and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:  # "1.2.3": not a factor, the text stays literal
        return None


class EmbeddingLookup(Protocol):
    """Textual-inversion embeddings found by their name's token ids (rtsd.adapters.embeddings.EmbeddingStore)."""

    def match(self, tokens: Sequence[int], position: int) -> tuple[str, int, int] | None:
        """(name, vector count, tokens the name spans) of the longest embedding name at ``position``, or None."""


@dataclass
class Chunk:
    """Up to 75 slots: a token id, or (embedding name, vector index) for a textual-inversion vector."""

    slots: list = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slots)

    def split_off(self, start: int) -> "Chunk":
        tail = Chunk(self.slots[start:], self.weights[start:])
        del self.slots[start:], self.weights[start:]
        return tail

    def embeddings(self) -> list[str]:
        return list(dict.fromkeys(s[0] for s in self.slots if isinstance(s, tuple)))


def split_chunks(pieces: Sequence[tuple[str, float | None]], tokenize: Callable[[list[str]], list[list[int]]],
                 comma_id: int, embeddings: EmbeddingLookup | None = None) -> list[Chunk]:
    """Weighted pieces -> chunks of at most 75 slots (the rules in the module docstring). Never empty."""
    texts = [text for text, weight in pieces if weight is not None]
    token_lists = iter(tokenize(texts))
    chunks: list[Chunk] = []
    current, last_comma = Chunk(), -1

    def close() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current, last_comma = Chunk(), -1

    for text, weight in pieces:
        if weight is None:
            close()
            continue
        tokens = next(token_lists)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_id:
                last_comma = len(current)
            elif len(current) == CHUNK_TOKENS and last_comma != -1 and len(current) - last_comma <= COMMA_BACKTRACK:
                tail = current.split_off(last_comma + 1)
                close()
                current = tail
            if len(current) == CHUNK_TOKENS:
                close()
            found = embeddings.match(tokens, position) if embeddings is not None else None
            if found is None:
                current.slots.append(token)
                current.weights.append(weight)
                position += 1
                continue
            name, vectors, spanned = found
            if len(current) + vectors > CHUNK_TOKENS:
                close()
            current.slots += [(name, i) for i in range(vectors)]
            current.weights += [weight] * vectors
            position += spanned
    if len(current) or not chunks:
        close()
    return chunks


def frame(chunk: Chunk, bos: int, eos: int, pad: int, length: int = CHUNK_TOKENS + 2) -> tuple[list, list[float]]:
    """(77 slots, 77 weights): bos, the chunk, eos, then pad (SD 1.x pads with eos, SD 2.x with 0); weight 1 around."""
    padding = length - 2 - len(chunk)
    return [bos, *chunk.slots, eos] + [pad] * padding, [1.0, *chunk.weights, 1.0] + [1.0] * padding


def apply_emphasis(hidden: np.ndarray, weights: np.ndarray, widths: Sequence[int] | None = None) -> np.ndarray:
    """A1111 "Original" emphasis on encoded chunks: hidden (rows, 77, C) x weights (rows, 77), then each row rescaled
    so its mean is what it was before weighting. ``widths`` splits C into the text encoders' parts (SDXL: ViT-L's,
    then bigG's), each restoring its own mean, as A1111 does by wrapping every SDXL embedder on its own. Rows whose
    weights are all 1 are returned unchanged, bit for bit."""
    hidden = np.asarray(hidden, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32)
    bounds = np.cumsum([0, *(widths or (hidden.shape[-1],))])
    if bounds[-1] != hidden.shape[-1]:
        raise ValueError(f"encoder widths {list(widths or ())} do not add up to the hidden size {hidden.shape[-1]}")
    out = hidden.copy()
    for row in np.flatnonzero((weights != 1.0).any(axis=1)):
        for start, stop in zip(bounds[:-1], bounds[1:]):
            part = hidden[row, :, start:stop]
            before = part.mean(dtype=np.float64)
            weighted = part * weights[row][:, None]
            out[row, :, start:stop] = weighted * np.float32(before / weighted.mean(dtype=np.float64))
    return out
