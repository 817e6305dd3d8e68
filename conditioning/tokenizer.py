"""CLIP's byte-level BPE tokenizer, built offline from the vocabulary that open_clip ships.

The ids are those of OpenAI CLIP, Hugging Face `CLIPTokenizer` ("openai/clip-vit-large-patch14", SD 1.x)
and `open_clip.tokenize` (SD 2.x): 49,408 tokens, `<|startoftext|>` = 49406, `<|endoftext|>` = 49407,
a context of 77 ids including both. The two Stable Diffusion generations differ only in padding: SD 1.x
pads with the end token, SD 2.x (open_clip) with 0, so the pad id is a constructor argument.

Text is cleaned as OpenAI CLIP and open_clip do (ftfy, HTML unescape, whitespace collapse, lower case).
Hugging Face's fast CLIPTokenizer skips ftfy and HTML unescaping, so on text with curly quotes or
HTML entities (`&amp;`) its ids differ from CLIP's; on ordinary prompts all three agree.
"""
from __future__ import annotations

import functools
import gzip
import html
import logging
import unicodedata
import importlib.util
from pathlib import Path
from typing import Sequence

import regex
import torch

logger = logging.getLogger(__name__)

VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
START_OF_TEXT_ID = 49406
END_OF_TEXT_ID = 49407
# The vocabulary file holds more merges than CLIP used; CLIP kept the first
# VOCAB_SIZE - 256 bytes - 256 end-of-word bytes - 2 specials of them.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, and runs
# of anything else that is not whitespace. Matched case-insensitively on lower-cased text.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def default_vocabulary_path() -> Path:
    """The BPE merges file bundled with the `open_clip_torch` package."""
    # find_spec locates the package without importing it (importing open_clip pulls in torchvision: seconds)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the CLIP BPE vocabulary comes with open_clip_torch: pip install open_clip_torch")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip is installed but its BPE vocabulary is missing: {path}")
    return path


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    BPE works on strings; mapping every byte to a visible character (printable Latin-1 bytes to
    themselves, the rest to code points from 256 on) keeps whitespace and control bytes out of the
    merge table while any UTF-8 input stays representable.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    next_code_point = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_code_point)
            next_code_point += 1
    # CLIP numbers the byte tokens in this order: printable bytes first, then the remapped ones.
    return {b: table[b] for b in [*printable, *(b for b in range(256) if b not in printable)]}


@functools.lru_cache(maxsize=4)
def load_vocabulary(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Read a CLIP BPE file into (token -> id, merge pair -> rank)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; each following line is one merge "a b", best first.
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not a CLIP BPE vocabulary (expected {NUM_MERGES} merge lines)")
    byte_tokens = list(byte_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges] + [START_OF_TEXT, END_OF_TEXT]
    vocabulary = {token: i for i, token in enumerate(tokens)}
    if len(vocabulary) != VOCAB_SIZE:
        raise ValueError(f"{path}: built {len(vocabulary)} distinct tokens, expected {VOCAB_SIZE}")
    return vocabulary, {pair: rank for rank, pair in enumerate(merges)}


def clean_text(text: str) -> str:
    """CLIP's normalisation: repair mojibake, unescape HTML twice, collapse whitespace, lower-case."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy comes with open_clip; without it keep at least the unicode normal form
        text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def warn_truncated(prompts: Sequence[str], too_long: list[tuple[int, int]], context_length: int) -> None:
    """One warning for a batch in which the prompts at rows `too_long` [(row, n_tokens)] were cut."""
    if not too_long:
        return
    row, n_tokens = too_long[0]
    logger.warning(
        "%d of %d prompts exceed the text context of %d tokens and were truncated (prompt %d has %d tokens: %.60r)",
        len(too_long), len(prompts), context_length, row, n_tokens, prompts[row],
    )


class CLIPBPETokenizer:
    """Prompts to CLIP token ids, padded or truncated to a fixed context.

    Args:
        context_length: ids per prompt including the start and end tokens (77 for every SD model).
        pad_token_id: id written after the end token; `END_OF_TEXT_ID` for SD 1.x and Hugging Face,
            0 for open_clip / SD 2.x.
        vocabulary_path: a CLIP `bpe_simple_vocab_16e6.txt.gz`; defaults to open_clip's copy.
    """

    start_token_id = START_OF_TEXT_ID
    end_token_id = END_OF_TEXT_ID

    def __init__(self, context_length: int = CONTEXT_LENGTH, pad_token_id: int = END_OF_TEXT_ID,
                 vocabulary_path: str | Path | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must leave room for the start and end tokens, got {context_length}")
        if not 0 <= pad_token_id < VOCAB_SIZE:
            raise ValueError(f"pad_token_id must be a token id in [0, {VOCAB_SIZE}), got {pad_token_id}")
        path = Path(vocabulary_path) if vocabulary_path is not None else default_vocabulary_path()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path}")
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        self.vocabulary_path = path
        self.encoder, self.merge_ranks = load_vocabulary(str(path))
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._bpe_cached = functools.lru_cache(maxsize=65536)(self._bpe)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the characters of one pre-token, lowest-ranked pair first, until no merge applies."""
        if word in (START_OF_TEXT, END_OF_TEXT):
            return (word,)
        symbols = [*word[:-1], word[-1] + "</w>"]  # the last symbol carries the end-of-word marker
        while len(symbols) > 1:
            ranks = [self.merge_ranks.get(pair, NUM_MERGES) for pair in zip(symbols, symbols[1:])]
            best = min(range(len(ranks)), key=ranks.__getitem__)
            if ranks[best] == NUM_MERGES:
                break
            first, second = symbols[best], symbols[best + 1]
            merged, i = [], 0
            while i < len(symbols):  # merge every non-overlapping occurrence, left to right
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without start/end tokens and without any length limit."""
        ids = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            if word not in (START_OF_TEXT, END_OF_TEXT):
                word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self._bpe_cached(word))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids; start, end and padding ids are left out."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        skip = {self.start_token_id, self.end_token_id, self.pad_token_id}
        raw = bytearray()
        for i in ids:
            if i in skip:
                continue
            token = self.decoder[i]
            word_end = token.endswith("</w>")
            raw.extend(self.byte_decoder[c] for c in (token[:-4] if word_end else token))
            if word_end:
                raw.extend(b" ")
        return raw.decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [B, context_length] (int64): start, prompt, end, then padding.

        A prompt too long for the context keeps its first `context_length - 2` tokens and still ends
        with the end token; one warning per call says how many prompts were cut.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.context_length - 2
        out = torch.full((len(prompts), self.context_length), self.pad_token_id, dtype=torch.long)
        truncated = []
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts must be strings, got {type(prompt).__name__} at index {row}")
            ids = self.encode(prompt)
            if len(ids) > room:
                truncated.append((row, len(ids)))
                ids = ids[:room]
            out[row, : len(ids) + 2] = torch.tensor([self.start_token_id, *ids, self.end_token_id])
        warn_truncated(prompts, [(row, n + 2) for row, n in truncated], self.context_length)
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length={self.context_length}, "
                f"pad_token_id={self.pad_token_id})")
