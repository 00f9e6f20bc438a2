"""The CLIP BPE tokenizer SD text encoders were trained with, built on HF ``tokenizers`` (no torch).

The vocabulary is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT, see ``rtsd/data/CLIP_LICENSE``), shipped as
package data; it was taken from the ``clip-anytorch`` 2.6.0 wheel (byte-identical to the one in ``open_clip_torch``).

Text handling matches ``transformers.CLIPTokenizer`` (tokenizers-backed since transformers 5, ``CLIPTokenizerFast``
before), which is what diffusers' SD pipelines run: NFC, runs of whitespace -> one space, lowercase one character at
a time, CLIP's split regex, byte-level BPE with a ``</w>`` end-of-word suffix. Where that differs from OpenAI's
original ``simple_tokenizer`` (and transformers < 5's slow tokenizer with ftfy installed), we follow transformers,
since ``tokenizer.json`` (read by C++ hosts) cannot express the rest:

- no ftfy / HTML unescaping: prompts with HTML entities, mojibake, curly quotes, ligatures, full-width characters or
  control characters tokenize differently;
- a word-final capital sigma lowercases to "σ", not "ς";
- only the exact text ``<|endoftext|>`` / ``<|startoftext|>`` in a prompt is the special token, not other casings.

Each encoded row is ``bos, tokens[:max_length - 2], eos, pad...``. SD 1.x pads with ``<|endoftext|>`` (49407),
SD 2.x / OpenCLIP with 0. The pad id only fills the padding: unlike transformers with diffusers' SD 2.x
``pad_token="!"``, a "!" in a prompt stays "!</w>" (256), as in OpenCLIP, which SD 2.x was trained with.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from rtsd.errors import EngineDirError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77
VOCAB_SIZE = 49408
# OpenAI's simple_tokenizer keeps the first 49152 - 256 - 2 merges of the file, so the vocab is exactly 49408.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
CONFIG_JSON = "tokenizer_config.json"
CONFIG_FORMAT = "rtsd-clip-tokenizer/1"

# CLIP's split: the special tokens, English contractions, letter runs, single digits, runs of other non-space chars.
_SPLIT_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes, in CLIP's vocab order (GPT-2's byte-to-unicode table): bytes that
    are printable stand for themselves and come first; the rest (controls, space, ...) become chr(256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """The merge pairs CLIP uses from ``bpe_simple_vocab_16e6.txt.gz`` (header line skipped, first NUM_MERGES)."""
    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    pairs = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(pairs) != NUM_MERGES or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{path}: expected {NUM_MERGES} merge pairs, got a malformed CLIP BPE file")
    return pairs


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id table: bytes, bytes + ``</w>``, one token per merge, then bos and eos."""
    alphabet = byte_alphabet()
    merged = ["".join(pair) for pair in merges]
    tokens = alphabet + [b + END_OF_WORD for b in alphabet] + merged + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("CLIP BPE merges produce duplicate tokens; the vocabulary file is not CLIP's")
    return vocab


def build_backend(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> _Backend:
    """A ``tokenizers.Tokenizer`` that splits and encodes text like CLIP (``Tokenizer`` adds bos/eos and padding)."""
    backend = _Backend(
        BPE(
            vocab=vocab,
            merges=list(merges),
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=EOS_TOKEN,  # never used: every byte is in the vocab
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            # GPT-2's regex on top, as transformers has it: it only splits "<|EndOfText|>"-like words further.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    # Bytes back to text, then each end-of-word marker becomes the space it stood for.
    backend.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace(END_OF_WORD, " "), decoders.Strip(" ", 0, 1)]
    )
    # Matched on the raw text, so a literal "<|endoftext|>" in a prompt is the special token, as in transformers.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (BOS_TOKEN, EOS_TOKEN)])
    return backend


def _configure_framing(backend: _Backend, max_length: int, pad_token_id: int) -> None:
    bos_id, eos_id = backend.token_to_id(BOS_TOKEN), backend.token_to_id(EOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}", special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)]
    )
    # Truncation counts the two special tokens, so the text keeps max_length - 2 tokens.
    backend.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
    backend.enable_padding(
        direction="right", pad_id=pad_token_id, pad_token=backend.id_to_token(pad_token_id), length=max_length
    )


def default_vocab_path() -> Path:
    """The shipped ``bpe_simple_vocab_16e6.txt.gz``."""
    return Path(str(resources.files("rtsd") / "data" / "bpe_simple_vocab_16e6.txt.gz"))


class Tokenizer:
    """Prompts -> int64 token ids (N, max_length) for a CLIP text encoder.

    Make one with ``Tokenizer.default()`` (the shipped vocabulary) or ``Tokenizer.load(directory)`` (files written by
    ``save``); the constructor takes a backend already configured by ``build_backend`` or read from ``tokenizer.json``.
    """

    def __init__(self, backend: _Backend, max_length: int = MAX_LENGTH, pad_token_id: int = 49407):
        bos_id, eos_id = backend.token_to_id(BOS_TOKEN), backend.token_to_id(EOS_TOKEN)
        if bos_id is None or eos_id is None:
            raise ValueError(f"the vocabulary lacks {BOS_TOKEN} or {EOS_TOKEN}; it is not a CLIP vocabulary")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for bos and eos), got {max_length!r}")
        vocab_size = backend.get_vocab_size()
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id must be an int in [0, {vocab_size}), got {pad_token_id!r}")
        _configure_framing(backend, max_length, pad_token_id)
        self._backend = backend
        # The same tokenizer without bos/eos, truncation or padding: pieces of prompts (rtsd.prompt chunks them).
        self._pieces = _Backend.from_str(backend.to_str())
        self._pieces.no_truncation()
        self._pieces.no_padding()
        self._max_length = max_length
        self._bos_token_id = bos_id
        self._eos_token_id = eos_id
        self._pad_token_id = pad_token_id

    # Read-only: the backend's truncation and padding are configured from these once.
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def bos_token_id(self) -> int:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self._pad_token_id

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"bos_token_id={self.bos_token_id}, eos_token_id={self.eos_token_id}, pad_token_id={self.pad_token_id})"
        )

    @classmethod
    def default(cls, pad_token_id: int = 49407, max_length: int = MAX_LENGTH) -> Tokenizer:
        """OpenAI CLIP's tokenizer from the shipped vocabulary (SD 1.x: pad 49407; SD 2.x / OpenCLIP: pad 0)."""
        merges = read_merges(default_vocab_path())
        return cls(build_backend(build_vocab(merges), merges), max_length, pad_token_id)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a tokenizer written by ``save`` (tokenizer.json + tokenizer_config.json); no network, no torch."""
        directory = Path(directory)
        if not directory.is_dir():
            raise EngineDirError(f"tokenizer directory {directory} does not exist; re-export the engine directory")
        config_path = directory / CONFIG_JSON
        config = _read_config(config_path)
        backend = _read_backend(directory / TOKENIZER_JSON)
        for key, token in (("bos_token_id", BOS_TOKEN), ("eos_token_id", EOS_TOKEN)):
            if backend.token_to_id(token) != config[key]:
                raise EngineDirError(
                    f"{config_path}: {key}={config[key]} but {TOKENIZER_JSON} has {token} at id "
                    f"{backend.token_to_id(token)}; the tokenizer files do not belong together, re-export them"
                )
        try:
            return cls(backend, config["max_length"], config["pad_token_id"])
        except ValueError as err:
            raise EngineDirError(f"{config_path}: {err}") from err

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode_pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without bos/eos, truncation or padding."""
        texts = list(texts)
        if not texts:
            return []
        try:
            return [e.ids for e in self._pieces.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            _raise_for_unencodable(texts)
            raise

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (HF tokenizers format, for tokenizers-cpp), vocab.json, merges.txt and
        tokenizer_config.json (max_length, bos/eos/pad ids, padding rule) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / TOKENIZER_JSON), pretty=True)
        # vocab.json and merges.txt are derived from the same serialized model so all files agree.
        spec = json.loads(self._backend.to_str())
        vocab = spec["model"]["vocab"]
        (directory / VOCAB_JSON).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        (directory / MERGES_TXT).write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        pad_token = self._backend.id_to_token(self.pad_token_id)
        config = {
            "format": CONFIG_FORMAT,
            "max_length": self.max_length,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "padding": "max_length",
            "padding_side": "right",
            "truncation": "longest_first",
            "truncation_side": "right",
            # The transformers keys, so CLIPTokenizer.from_pretrained(directory) yields the same ids.
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.max_length,
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": pad_token,
        }
        (directory / CONFIG_JSON).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids int64 (N, max_length): bos, tokens truncated to fit, eos, then pad_token_id."""
        batch = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(batch, Sequence) or isinstance(batch, (bytes, bytearray)):
            raise TypeError(f"prompts must be a str or a sequence of str, got {type(prompts).__name__}")
        for i, prompt in enumerate(batch):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{i}] is {type(prompt).__name__} ({prompt!r:.60}), expected str")
        if not batch:
            return np.zeros((0, self.max_length), dtype=np.int64)
        try:
            encodings = self._backend.encode_batch(list(batch), add_special_tokens=True)
        except TypeError:
            _raise_for_unencodable(batch)
            raise
        return np.array([e.ids for e in encodings], dtype=np.int64)


def _raise_for_unencodable(batch: Sequence[str]) -> None:
    # tokenizers rejects str that has no UTF-8 form (lone surrogates) with an opaque TypeError; name the prompt.
    for i, prompt in enumerate(batch):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"prompts[{i}] is not valid Unicode text ({err.reason} at index {err.start}); "
                "decode the prompt with errors='replace' first"
            ) from None


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngineDirError(f"{path} is missing; re-export the engine directory to write the tokenizer") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EngineDirError(f"{path} is not readable JSON ({err}); re-export the engine directory") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise EngineDirError(f"{path}: format {found!r} is not {CONFIG_FORMAT!r}; re-export the engine directory")
    for key in ("max_length", "bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), int):
            raise EngineDirError(f"{path}: '{key}' must be an integer, got {config.get(key)!r}; re-export it")
    return config


def _read_backend(path: Path) -> _Backend:
    if not path.is_file():
        raise EngineDirError(f"{path} is missing; re-export the engine directory to write the tokenizer")
    try:
        return _Backend.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for any parse failure
        raise EngineDirError(f"{path} is not a valid tokenizers file ({err}); re-export the engine directory") from None
