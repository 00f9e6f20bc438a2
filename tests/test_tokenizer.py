"""rtsd.tokenizer against two independent references, built from the shipped CLIP vocabulary file.

1. ``transformers.CLIPTokenizer`` loaded from vocab.json + merges.txt that this test derives from the .gz with a
   few lines of its own following OpenAI's ``simple_tokenizer.py`` construction (not with rtsd's code). In
   transformers >= 5 this class is the tokenizers-backed one (``CLIPTokenizerFast`` before; the ftfy-based Python
   class is gone) and it is what diffusers' SD pipelines tokenize with, so it is the canonical behaviour we match.
2. A pure-Python rewrite of OpenAI's BPE algorithm (no ``tokenizers`` library involved). With the canonical text
   clean-up (NFC, whitespace, lowercase) it must agree everywhere. With OpenAI's original ftfy + HTML-unescape
   clean-up it must agree on every prompt that clean-up leaves unchanged; the prompts it does change (HTML entities,
   curly quotes, full-width letters, ligatures) are the documented, deliberate difference (see rtsd/tokenizer.py).
"""

from __future__ import annotations

import gzip
import html
import json
import random
import shutil
import subprocess
import sys
import textwrap
import unicodedata

import numpy as np
import pytest
import regex

from rtsd.errors import EngineDirError
from tests.optional import require
from rtsd.tokenizer import Tokenizer, default_vocab_path

SD15_PAD, SD2_PAD = 49407, 0

PROMPTS_BY_HAND = [
    "",
    " ",
    "\n\t  \r\n",
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT Riding A Horse",
    "(masterpiece:1.2), best quality, ((ultra-detailed)), [blurry], {red|blue} dress",
    "(masterpiece:1.2) (best quality:1.1), 1girl, solo, long hair, looking at viewer, smile",
    "<lora:add_detail:0.8> portrait of a woman, 8k uhd, dslr, soft lighting, film grain, Fujifilm XT3",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality",
    "a cat BREAK a dog AND a bird",
    "[[[cyberpunk city]]]:0.5, neon lights, rain, reflections, highly detailed, artstation, by greg rutkowski",
    "landscape, (sunset:1.3), (mountains:0.9), lake, 4k, hdr, trending on artstation, octane render, unreal engine 5",
    "it's a dog's life, don't you think? I'M SURE they'RE fine, we've, you'll, he'd",
    "rock'n'roll 'quoted' \"double quoted\" `backticks`",
    "café crème brûlée à la mode, naïve façade, jalapeño, Ångström, Øresund, straße",
    "cafe\u0301 cre\u0300me (decomposed accents)",
    "東京の夜景、ネオン、雨",
    "一只猫坐在窗台上，阳光明媚",
    "서울의 밤거리, 네온사인",
    "Москва зимой, снег, Красная площадь",
    "Αθήνα, ΟΔΥΣΣΕΥΣ, ΣΟΦΟΣ, ςσΣ",
    "مدينة عربية قديمة في الليل",
    "עיר עתיקה בלילה",
    "नमस्ते दुनिया, हिमालय पर्वत",
    "กรุงเทพมหานคร ยามค่ำคืน",
    "İSTANBUL ılık ığdır Iİıi",
    "Ünïcödé ÀÉÎÕÜ àéîõü ÇçÑñ ŁłŚśŻż ĞğŞş",
    "emoji 😀😃😄 🐱‍👤 👍🏽 🇯🇵🇺🇸 ❤️ 🔥🔥🔥",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, ✨sparkles✨",
    "😀",
    "!!!???...,,,;;;:::---___===+++***&&&%%%$$$###@@@",
    "a.b,c;d:e!f?g(h)i[j]k{l}m<n>o/p\\q|r~s^t`u",
    "3.14159 1,000,000 2024-01-01 12:30pm 4k 8K 1080p 16:9 50mm f/1.8 1/1000s ISO100",
    "0123456789 ٠١٢٣٤٥٦٧٨٩ ०१२३ ①②③ ½ ¾ ² ³",
    "Ⅻ roman Ⅳ, superscript x², subscript H₂O",
    "tabs\tand\tnewlines\nand\r\ncarriage\rreturns",
    "   leading and trailing spaces   ",
    "multiple     spaces      between words",
    "non\u00a0breaking\u00a0spaces and\u3000ideographic\u2003em\u2009thin",
    "zero\u200bwidth\u200cjoiners\u200d and\ufeffbom",
    "line\u2028separator\u2029paragraph",
    "control \x00 \x01 \x07 \x1b \x7f \x85 chars",
    "soft\u00adhyphen and\u2011non-breaking hyphen — em dash – en dash",
    "‘curly single’ “curly double” «guillemets» „low“",
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;apos&#39; &nbsp;",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "ﬁne ﬂower ligatures ﬀ",
    "mojibake: cafÃ© SchÃ¶n",
    "<|startoftext|>hello<|endoftext|>",
    "a <|endoftext|> in the middle",
    "math ∑∫∂√∞≈≠≤≥ ∀x∈ℝ",
    "arrows ←↑→↓↔ shapes ■□▲△●○ ★☆ ♠♣♥♦ ♪♫",
    "currency $100 €50 £30 ¥1000 ₹500 ₿",
    "https://example.com/path?query=1&x=2#frag user@example.com",
    "#hashtag @mention snake_case camelCase kebab-case PascalCase",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "photo, photo, photo, photo, photo, photo, photo, photo",
    "x" * 300,
    "🔥" * 60,
    "東" * 120,
    ", ".join(["masterpiece", "best quality", "highly detailed"] * 20),
    " ".join(f"word{i}" for i in range(120)),
    "(" * 80 + "cat" + ")" * 80,
    "a " * 74 + "end",
    "a " * 75 + "end",
    "a " * 76 + "end",
    "The quick brown fox jumps over the lazy dog. " * 10,
    "Vincent van Gogh's 'The Starry Night' (1889), oil on canvas — post-impressionism",
    "portrait of Mona Lisa by Leonardo da Vinci, sfumato, Renaissance, 16th century",
    "A cozy cabin in the woods, winter, smoke from chimney, warm light in the windows, snowfall, night",
    "isometric 3D render of a tiny island, low poly, pastel colors, blender, cycles",
    "anime style, studio ghibli, hayao miyazaki, spirited away, totoro",
    "steampunk airship over victorian london, brass gears, fog, sepia",
    "macro photograph of a dew drop on a leaf, bokeh, 100mm macro lens",
    "(extremely detailed CG unity 8k wallpaper), (photorealistic:1.4), RAW photo",
    "negative: (worst quality:2), (low quality:2), (normal quality:2), lowres, ((monochrome)), ((grayscale))",
    "embedding:EasyNegative, bad-hands-5, ng_deepnegative_v1_75t",
    "score_9, score_8_up, score_7_up, source_anime, rating_safe",
    "a\u0308o\u0308u\u0308 e\u0301e\u0300 n\u0303",
    "Hello, World! HELLO world hello WORLD",
    "ALL CAPS PROMPT WITH NUMBERS 123 AND SYMBOLS !@#",
    "mIxEd CaSe TeXt WiTh AlTeRnAtInG lEtTeRs",
    "'s 't 're 've 'm 'll 'd",
    "'S 'T 'RE 'VE 'M 'LL 'D",
    "''' '' ' \" \"\" \"\"\"",
    "dog's cat's it''s ''tis o'clock",
    "semi;colon, comma. period! bang? question: colon",
    "\\n literal backslash-n \\t literal tab",
    "tab-only\t",
    "\n",
    "\t",
    "a",
    "A",
    "1",
    ".",
    "a1b2c3d4e5",
    "100% real, 50/50 chance, 3:2 aspect, 24fps, 60Hz",
    "Pokémon, Pikachu ⚡, Charizard 🔥",
    "Björk, Sigur Rós, Mötley Crüe, Beyoncé",
    "São Paulo, Kraków, Zürich, Malmö, Reykjavík, Đà Nẵng",
    "Ελληνικά και Русский и 中文 and English mixed",
    "日本語とEnglishのmixed文章です。",
    "한국어English混合",
    "Tiếng Việt có dấu: Hà Nội, Hồ Chí Minh",
    "Türkçe: çok güzel, şehir, ğ",
    "Polski: źdźbło, żółć, gęślą jaźń",
    "Čeština: příliš žluťoučký kůň úpěl ďábelské ódy",
    "Română: știință, țară",
    "Ελληνική γλώσσα: ΆΈΉΊΌΎΏ άέήίόύώ ϊϋΐΰ",
    "ﷺ ﷽ ligature arabic",
    "𝓕𝓪𝓷𝓬𝔂 𝕋𝕖𝕩𝕥 𝐁𝐨𝐥𝐝",
    "ǅ ǈ ǋ titlecase digraphs",
    "ß ẞ ﬆ ŉ ǰ",
    "the end.",
]

SD_FRAGMENTS = [
    "masterpiece", "best quality", "(detailed face:1.2)", "[blurry]", "((sharp focus))", "1girl", "solo",
    "a castle on a hill", "golden hour", "volumetric lighting", "by artgerm", "trending on artstation", "8k",
    "(high contrast:0.8)", "bokeh", "f/2.8", "35mm", "RAW", "HDR", "cinematic", "café", "東京", "😀", "🌸",
    "nighttime", "rainy", "neon", "Schön", "naïve", "über", "it's", "don't", "x1.5", "--ar 16:9", "seed:42",
]
SEPARATORS = [", ", " ", ",", "\n", "\t", " | ", "  ", ". ", "; ", " AND ", " BREAK "]


def generated_prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        pieces = [rng.choice(SD_FRAGMENTS) for _ in range(rng.randint(1, 40))]
        text = pieces[0]
        for piece in pieces[1:]:
            text += rng.choice(SEPARATORS) + piece
        if rng.random() < 0.3:
            text = text.upper()
        prompts.append(text)
    return prompts


PROMPTS = PROMPTS_BY_HAND + generated_prompts(120)


# ---- independent references ----------------------------------------------------------------------------------


def openai_byte_table() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def openai_merges_and_vocab() -> tuple[list[tuple[str, str]], list[str]]:
    """As in OpenAI's simple_tokenizer.py: merges are lines 1..48894 of the file;
    vocab = bytes, bytes + </w>, one token per merge, then the two special tokens."""
    lines = gzip.open(default_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(openai_byte_table().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    return merges, vocab + ["<|startoftext|>", "<|endoftext|>"]


def canonical_clean(text: str) -> str:
    # Lowercase one character at a time, as the tokenizers Lowercase normalizer does: str.lower() would turn a
    # word-final capital sigma into "ς" where transformers' CLIPTokenizer gives "σ".
    return "".join(c.lower() for c in regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)))


def ftfy_clean(text: str) -> str:
    """OpenAI simple_tokenizer (and transformers < 5's slow CLIPTokenizer with ftfy): basic_clean + whitespace_clean."""
    ftfy = require("ftfy")  # test-only (dev extra): skips without it outside CI

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class PythonBPE:
    """OpenAI's CLIP BPE algorithm re-written in plain Python for this test."""

    SPLIT = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )

    def __init__(self, clean):
        merges, vocab = openai_merges_and_vocab()
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.byte_chars = openai_byte_table()
        self.clean = clean
        self.cache = {"<|startoftext|>": ("<|startoftext|>",), "<|endoftext|>": ("<|endoftext|>",)}

    def bpe(self, token: str) -> tuple[str, ...]:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = word
        return word

    def row(self, text: str, pad_id: int, length: int = 77) -> list[int]:
        ids = []
        for piece in self.SPLIT.findall(self.clean(text)):
            piece = "".join(self.byte_chars[b] for b in piece.encode("utf-8"))
            ids.extend(self.ids[t] for t in self.bpe(piece))
        ids = [49406] + ids[: length - 2] + [49407]
        return ids + [pad_id] * (length - len(ids))


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    """vocab.json + merges.txt in the transformers layout, derived here from the .gz (not by rtsd)."""
    directory = tmp_path_factory.mktemp("clip_reference")
    merges, vocab = openai_merges_and_vocab()
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")
    return directory


def transformers_clip(directory, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory), pad_token=pad_token)


def transformers_ids(directory, prompts, pad_id: int) -> np.ndarray:
    """Padded (N, 77) ids. Pad 0 is applied through transformers' own attention mask: setting pad_token="!" (id 0)
    would also turn every "!" in a prompt into that special token (see test_sd2_pad_token_quirk_of_transformers)."""
    out = transformers_clip(directory)(
        prompts, padding="max_length", truncation=True, max_length=77, return_tensors="np"
    )
    return np.where(out["attention_mask"] == 1, out["input_ids"], pad_id).astype(np.int64)


@pytest.fixture(scope="module", params=[SD15_PAD, SD2_PAD], ids=["pad_eos", "pad_zero"])
def pad_id(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer_by_pad():
    return {pad: Tokenizer.default(pad_token_id=pad) for pad in (SD15_PAD, SD2_PAD)}


# ---- equality with the references -----------------------------------------------------------------------------


def test_prompt_set_is_varied_and_large():
    assert len(PROMPTS) >= 200 and len(set(PROMPTS)) >= 200


def test_vocab_and_merges_match_openai_construction(saved_sd15):
    merges, vocab = openai_merges_and_vocab()
    saved_vocab = json.loads((saved_sd15 / "vocab.json").read_text(encoding="utf-8"))
    saved_merges = (saved_sd15 / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert len(vocab) == 49408 and saved_vocab == {t: i for i, t in enumerate(vocab)}
    assert saved_merges == [" ".join(m) for m in merges]
    assert (saved_vocab["<|startoftext|>"], saved_vocab["<|endoftext|>"]) == (49406, 49407)


def test_equals_transformers_clip_tokenizer(tokenizer_by_pad, reference_files, pad_id):
    ours = tokenizer_by_pad[pad_id](PROMPTS)
    expected = transformers_ids(reference_files, PROMPTS, pad_id)
    assert ours.dtype == np.int64 and ours.shape == (len(PROMPTS), 77)
    mismatched = [PROMPTS[i] for i in np.flatnonzero((ours != expected).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} prompts differ from transformers, first: {mismatched[:3]!r}"


def test_equals_python_bpe_with_canonical_cleanup(tokenizer_by_pad, pad_id):
    reference = PythonBPE(canonical_clean)
    expected = np.array([reference.row(p, pad_id) for p in PROMPTS], dtype=np.int64)
    ours = tokenizer_by_pad[pad_id](PROMPTS)
    mismatched = [PROMPTS[i] for i in np.flatnonzero((ours != expected).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} prompts differ from the Python BPE, first: {mismatched[:3]!r}"


def test_ftfy_cleanup_is_the_only_difference_to_openai_original(tokenizer_by_pad):
    require("ftfy")  # OpenAI's text clean-up, needed for this reference
    reference = PythonBPE(ftfy_clean)
    ours = tokenizer_by_pad[SD15_PAD](PROMPTS)
    cleaned_differently = {p for p in PROMPTS if ftfy_clean(p) != canonical_clean(p).strip()}
    for prompt, row in zip(PROMPTS, ours):
        if prompt not in cleaned_differently:
            assert row.tolist() == reference.row(prompt, SD15_PAD), prompt
    # The deliberate differences are real (otherwise the documentation in rtsd/tokenizer.py would be stale).
    html_and_fullwidth = ("&amp; &lt;tag&gt; &quot;quoted&quot; &#39;apos&#39; &nbsp;", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３")
    for prompt in html_and_fullwidth:
        assert prompt in cleaned_differently
        assert tokenizer_by_pad[SD15_PAD](prompt)[0].tolist() != reference.row(prompt, SD15_PAD)
    assert len(cleaned_differently) < len(PROMPTS) // 10


def test_special_token_text_in_other_casing_is_plain_text(tokenizer_by_pad, reference_files):
    """Only the exact "<|endoftext|>" is the special token (as in transformers); OpenAI matched it after lowercasing."""
    prompts = ["a <|EndOfText|> b", "a <|endoftext|> b"]
    ours = tokenizer_by_pad[SD15_PAD](prompts)
    assert np.array_equal(ours, transformers_ids(reference_files, prompts, SD15_PAD))
    assert ours[1, :5].tolist() == [49406, 320, 49407, 321, 49407]
    assert ours[0, 2] != 49407 and PythonBPE(canonical_clean).row(prompts[0], SD15_PAD)[2] == 49407


def test_sd2_pad_token_quirk_of_transformers(tokenizer_by_pad, reference_files):
    """diffusers' SD 2.x tokenizer sets pad_token "!" (id 0); transformers then encodes every "!" in a prompt as
    that special token (0) instead of "!</w>" (256). OpenCLIP, which SD 2.x was trained with, does not: rtsd's
    pad_token_id only fills the padding, so "!" prompts match OpenCLIP (and the Python BPE above), not diffusers."""
    with_bang = [p for p in PROMPTS if "!" in p]
    without_bang = [p for p in PROMPTS if "!" not in p]
    quirky = transformers_clip(reference_files, pad_token="!")
    kwargs = dict(padding="max_length", truncation=True, max_length=77, return_tensors="np")
    ours = tokenizer_by_pad[SD2_PAD]
    assert np.array_equal(ours(without_bang), quirky(without_bang, **kwargs)["input_ids"])
    assert ours("hello!")[0, :4].tolist() == [49406, 3306, 256, 49407]
    assert quirky("hello!")["input_ids"][:4] == [49406, 3306, 0, 49407]
    assert len(with_bang) >= 5


# ---- framing, input checks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [SD15_PAD, SD2_PAD])
def test_rows_are_bos_tokens_eos_then_padding(pad):
    tokenizer = Tokenizer.default(pad_token_id=pad)
    assert (tokenizer.max_length, tokenizer.bos_token_id, tokenizer.eos_token_id) == (77, 49406, 49407)
    assert tokenizer.pad_token_id == pad
    a = 320  # "a</w>"
    fits, one_over = tokenizer(["a " * 74 + "a", "a " * 75 + "end"])
    assert fits.tolist() == [49406] + [a] * 75 + [49407]
    assert one_over.tolist() == [49406] + [a] * 75 + [49407]  # "end" is cut so eos still fits
    empty = tokenizer("")
    assert empty.shape == (1, 77) and empty[0].tolist() == [49406, 49407] + [pad] * 75
    assert tokenizer([]).shape == (0, 77) and tokenizer([]).dtype == np.int64


def test_max_length_is_configurable():
    tokenizer = Tokenizer.default(max_length=8)
    assert tokenizer("a photo of an astronaut riding a horse").tolist() == [
        [49406, 320, 1125, 539, 550, 18376, 6765, 49407]
    ]


def test_accepts_any_sequence_of_str(tokenizer_by_pad):
    tokenizer = tokenizer_by_pad[SD15_PAD]
    as_list = tokenizer(["a cat", "a dog"])
    assert np.array_equal(tokenizer(("a cat", "a dog")), as_list)
    assert np.array_equal(tokenizer(np.array(["a cat", "a dog"]).tolist()), as_list)


@pytest.mark.parametrize(
    "bad, needle",
    [(["a cat", 42], "prompts[1] is int"), ([None], "prompts[0] is NoneType"), (b"a cat", "got bytes"),
     (42, "got int"), (["ok", b"bytes"], "prompts[1] is bytes")],
)
def test_non_string_prompt_is_a_type_error(tokenizer_by_pad, bad, needle):
    with pytest.raises(TypeError, match=regex.escape(needle)):
        tokenizer_by_pad[SD15_PAD](bad)


def test_lone_surrogate_is_a_value_error_naming_the_prompt(tokenizer_by_pad):
    with pytest.raises(ValueError, match=regex.escape("prompts[1] is not valid Unicode text")):
        tokenizer_by_pad[SD15_PAD](["fine", "broken \ud800 text"])


@pytest.mark.parametrize(
    "kwargs", [{"pad_token_id": -1}, {"pad_token_id": 49408}, {"max_length": 1}, {"pad_token_id": True}]
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="pad_token_id|max_length"):
        Tokenizer.default(**kwargs)


# ---- save / load --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [SD15_PAD, SD2_PAD])
def test_save_load_round_trip(tokenizer_by_pad, tmp_path, pad):
    tokenizer_by_pad[pad].save(tmp_path)
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"}
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.max_length, loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (77, 49406, 49407, pad)
    assert np.array_equal(loaded(PROMPTS), tokenizer_by_pad[pad](PROMPTS))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["max_length"] == 77 and config["pad_token_id"] == pad and config["padding"] == "max_length"


def test_tokenizer_json_alone_frames_and_pads(tokenizer_by_pad, saved_sd15, tmp_path):
    """What a C++ host using tokenizers-cpp sees: tokenizer.json carries bos/eos, truncation and padding itself."""
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer_by_pad[SD2_PAD].save(tmp_path)
    raw = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = np.array([e.ids for e in raw.encode_batch(PROMPTS)], dtype=np.int64)
    assert np.array_equal(ids, tokenizer_by_pad[SD2_PAD](PROMPTS))
    raw = HFTokenizer.from_file(str(saved_sd15 / "tokenizer.json"))  # eos padding is special: decode skips it
    assert raw.decode(raw.encode("A photo of a Café, 東京 😀!").ids) == "a photo of a café , 東京 😀!"


def test_transformers_reads_the_saved_directory(tokenizer_by_pad, saved_sd15):
    reference = transformers_clip(saved_sd15)
    ids = reference(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    assert np.array_equal(ids["input_ids"], tokenizer_by_pad[SD15_PAD](PROMPTS))


@pytest.fixture(scope="module")
def saved_sd15(tokenizer_by_pad, tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved_sd15")
    tokenizer_by_pad[SD15_PAD].save(directory)
    return directory


def _corrupt(directory, name, text):
    (directory / name).write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda d: (d / "tokenizer_config.json").unlink(), "tokenizer_config.json is missing"),
        (lambda d: _corrupt(d, "tokenizer.json", '{"model": '), "tokenizer.json is not a valid tokenizers file"),
        (lambda d: _corrupt(d, "tokenizer_config.json", "{not json"), "tokenizer_config.json is not readable JSON"),
        (lambda d: _corrupt(d, "tokenizer_config.json", '{"format": "other"}'), "format 'other'"),
        (lambda d: _corrupt(d, "tokenizer_config.json", json.dumps(
            {"format": "rtsd-clip-tokenizer/1", "max_length": 77, "bos_token_id": 49406, "eos_token_id": 49407,
             "pad_token_id": 99999})), "pad_token_id must be an int in [0, 49408)"),
        (lambda d: _corrupt(d, "tokenizer_config.json", json.dumps(
            {"format": "rtsd-clip-tokenizer/1", "max_length": 77, "bos_token_id": 1, "eos_token_id": 49407,
             "pad_token_id": 0})), "bos_token_id=1"),
        (lambda d: _corrupt(d, "tokenizer_config.json", json.dumps(
            {"format": "rtsd-clip-tokenizer/1", "max_length": "77", "bos_token_id": 49406, "eos_token_id": 49407,
             "pad_token_id": 0})), "'max_length' must be an integer"),
    ],
)
def test_damaged_directory_is_an_engine_dir_error(saved_sd15, tmp_path, damage, needle):
    directory = shutil.copytree(saved_sd15, tmp_path / "tokenizer")
    damage(directory)
    with pytest.raises(EngineDirError, match=regex.escape(needle)):
        Tokenizer.load(directory)


def test_missing_directory_is_an_engine_dir_error(tmp_path):
    with pytest.raises(EngineDirError, match="does not exist"):
        Tokenizer.load(tmp_path / "nowhere")


# ---- no torch -----------------------------------------------------------------------------------------------------


def test_imports_and_runs_with_torch_and_transformers_blocked():
    script = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "diffusers"):
                    raise ImportError(f"blocked: {name}")

        sys.meta_path.insert(0, Block())
        from rtsd.tokenizer import Tokenizer

        ids = Tokenizer.default()(["a photo of an astronaut riding a horse"])
        expected = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
        assert ids.shape == (1, 77) and ids[0, :10].tolist() == expected
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
