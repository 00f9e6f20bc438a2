"""A1111 prompt syntax, chunking and emphasis (rtsd.prompt), against A1111's documented examples and an independent
restatement of A1111's chunking (sd_hijack_clip.tokenize_line) and "Original" emphasis written here.

No engines: fast, torch only for the emphasis oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

from rtsd.adapters.embeddings import EmbeddingStore
from rtsd.prompt import Chunk, apply_emphasis, frame, parse_attention, split_chunks
from rtsd.tokenizer import Tokenizer

TOKENIZER = Tokenizer.default()
BOS, EOS, COMMA = 49406, 49407, 267


# ---------------------------------------------------------------- the parser: A1111's own docstring examples

@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("(a:0.5) (b:1.5)", [("a", 0.5), (" ", 1.0), ("b", 1.5)]),
    ("", [("", 1.0)]),
])
def test_parser_gives_a1111s_documented_pairs(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], atol=1e-4)


def test_break_is_a_marker_and_plain_text_parses_to_itself():
    assert parse_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", None), ("a dog", 1.0)]
    assert parse_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", None), ("b", 1.1)]
    plain = "a lighthouse at dawn, oil painting, 4k"
    assert parse_attention(plain) == [(plain, 1.0)]
    assert parse_attention("ratio 16:9 hdr") == [("ratio 16:9 hdr", 1.0)]  # a colon alone is text


# ---------------------------------------------------------------- an independent restatement of A1111's chunking

def a1111_chunks(pieces, tokenize, names=None, pad=EOS):
    """A1111's FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line restated: (ids, weights) per chunk of 77.
    ``names``: {token ids of an embedding's name: vector count}; its vectors appear as (name ids, index)."""
    names = sorted((names or {}).items(), key=lambda item: -len(item[0]))
    out, toks, mult, comma = [], [], [], -1

    def flush():
        nonlocal toks, mult, comma
        fill = 75 - len(toks)
        ids = [BOS] + toks + [EOS] + [pad] * fill  # A1111 pads with eos, then SD 2.x overwrites after the first eos
        out.append((ids, [1.0] + mult + [1.0] * (fill + 1)))
        toks, mult, comma = [], [], -1

    for text, weight in pieces:
        if weight is None:
            flush()
            continue
        ids, i = tokenize(text), 0
        while i < len(ids):
            if ids[i] == COMMA:
                comma = len(toks)
            elif len(toks) == 75 and comma != -1 and 75 - comma <= 20:
                moved = (toks[comma + 1:], mult[comma + 1:])
                toks, mult = toks[: comma + 1], mult[: comma + 1]
                flush()
                toks, mult = list(moved[0]), list(moved[1])
            if len(toks) == 75:
                flush()
            hit = next(((n, v) for n, v in names if tuple(ids[i: i + len(n)]) == n), None)
            if hit:
                if len(toks) + hit[1] > 75:
                    flush()
                toks += [(hit[0], k) for k in range(hit[1])]
                mult += [weight] * hit[1]
                i += len(hit[0])
            else:
                toks.append(ids[i])
                mult.append(weight)
                i += 1
    if toks or not out:
        flush()
    return out


def _ours(text, embeddings=None, pad=EOS):
    chunks = split_chunks(parse_attention(text), TOKENIZER.encode_pieces, COMMA, embeddings)
    return [frame(c, BOS, EOS, pad) for c in chunks]


def _phrases(n):
    words = ["red", "fox", "snowy", "forest", "golden", "light", "detailed", "fur", "misty", "pines", "sharp", "focus"]
    return ", ".join(" ".join(words[(i + k) % len(words)] for k in range(1 + i % 4)) for i in range(n))


LONG = _phrases(60)  # ~150 tokens, commas everywhere: the backtrack rule decides where chunks end


@pytest.mark.parametrize("text", [
    LONG, _phrases(120), "a cat BREAK a dog", "BREAK", "a BREAK BREAK b", "x " * 75, "x " * 76, "x " * 151,
    "(" + LONG + ":1.2)", "a [(((house:1.3)) on] a hill, " + LONG, "", "a (red:1.3) fox, [blurry]"])
@pytest.mark.parametrize("pad", [EOS, 0])
def test_chunks_equal_a1111s_chunking(text, pad):
    ours = _ours(text, pad=pad)
    theirs = a1111_chunks(parse_attention(text), lambda t: TOKENIZER.encode_pieces([t])[0], pad=pad)
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs]
    np.testing.assert_allclose([w for _, w in ours], [w for _, w in theirs])
    assert all(len(ids) == 77 for ids, _ in ours)


def test_long_prompts_are_not_truncated_and_break_starts_a_chunk():
    assert len(TOKENIZER.encode_pieces([LONG])[0]) > 150 and len(_ours(LONG)) == 3
    assert len(_ours("x " * 75)) == 1 and len(_ours("x " * 76)) == 2
    chunks = _ours("a cat BREAK a dog")
    assert len(chunks) == 2 and chunks[1][0][:4] == [BOS, 320, 1929, EOS]  # "a dog" starts the second chunk


def test_comma_backtrack_moves_the_last_phrase_whole():
    text = "word " * 70 + ", alpha beta gamma delta epsilon zeta"  # the comma is the 71st token
    first, second = _ours(text)
    assert first[0][71] == COMMA and first[0][72] == EOS  # the chunk ends at the comma
    assert second[0][1:7] == TOKENIZER.encode_pieces(["alpha beta gamma delta epsilon zeta"])[0]


def test_plain_prompts_frame_exactly_as_the_tokenizer():
    for pad in (EOS, 0):
        tokenizer = Tokenizer.default(pad_token_id=pad)
        for text in ("a lighthouse at dawn, oil painting", "", "x " * 75):
            chunks = split_chunks([(text, 1.0)], tokenizer.encode_pieces, COMMA)
            assert len(chunks) == 1 and frame(chunks[0], BOS, EOS, pad)[0] == tokenizer(text)[0].tolist()


def test_embeddings_never_straddle_chunks_and_match_longest_name(tmp_path):
    from safetensors.numpy import save_file

    store = EmbeddingStore(8, "test", TOKENIZER.encode_pieces)
    for name, n in (("easynegative", 5), ("easy", 2)):
        save_file({"emb_params": np.ones((n, 8), np.float32)}, str(tmp_path / f"{name}.safetensors"))
        store.load(tmp_path / f"{name}.safetensors")
    names = {tuple(TOKENIZER.encode_pieces(["easynegative"])[0]): 5, tuple(TOKENIZER.encode_pieces(["easy"])[0]): 2}
    for text in ("x " * 72 + "easynegative tail", "x " * 73 + "(easy:1.2) easynegative", "easynegative, " * 30):
        ours = split_chunks(parse_attention(text), TOKENIZER.encode_pieces, COMMA, store)
        theirs = a1111_chunks(parse_attention(text), lambda t: TOKENIZER.encode_pieces([t])[0], names)
        assert len(ours) == len(theirs)
        for chunk, (ids, weights) in zip(ours, theirs):
            got = [s if isinstance(s, int) else (tuple(TOKENIZER.encode_pieces([s[0]])[0]), s[1])
                   for s in frame(chunk, BOS, EOS, EOS)[0]]
            assert got == ids and frame(chunk, BOS, EOS, EOS)[1] == pytest.approx(weights)
            counts = {}
            for slot in chunk.slots:
                if isinstance(slot, tuple):
                    counts[slot[0]] = counts.get(slot[0], 0) + 1
            assert all(v % {"easynegative": 5, "easy": 2}[k] == 0 for k, v in counts.items())  # whole embeddings
    assert store.match(TOKENIZER.encode_pieces(["easynegative"])[0], 0)[:2] == ("easynegative", 5)


# ---------------------------------------------------------------- emphasis

def test_emphasis_equals_a1111_original_and_leaves_unweighted_rows_alone():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 77, 16), dtype=np.float32) + 0.3
    weights = np.ones((3, 77), np.float32)
    weights[0, 3:6], weights[2, 10] = 1.3, 0.5
    ours = apply_emphasis(hidden, weights)
    for row in (0, 2):  # A1111 sd_emphasis.EmphasisOriginal.after_transformers, on one prompt
        z = torch.from_numpy(hidden[row])
        mean = z.mean()
        z = z * torch.from_numpy(weights[row])[:, None]
        z = z * (mean / z.mean())
        np.testing.assert_allclose(ours[row], z.numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(ours[1], hidden[1])  # all-ones weights: bit for bit
    assert np.abs(ours[0] - hidden[0]).max() > 0.1  # the weights do move the context
    assert ours[0].mean() == pytest.approx(hidden[0].mean(), rel=1e-5)


def test_chunk_split_off_keeps_slots_and_weights_together():
    chunk = Chunk([1, 2, ("e", 0), 4], [1.0, 1.1, 1.2, 1.3])
    tail = chunk.split_off(2)
    assert (chunk.slots, chunk.weights, tail.slots, tail.weights) == ([1, 2], [1.0, 1.1], [("e", 0), 4], [1.2, 1.3])
    assert tail.embeddings() == ["e"]
