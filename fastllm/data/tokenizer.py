"""Byte-level BPE tokenizer, trained with the Hugging Face `tokenizers` library.

Byte-level (GPT-2 style): every byte has a token, so any string encodes and `decode(encode(s)) == s`.
No normaliser is attached, the corpus is normalised by `clean.py` before training, and a tokenizer that
changed its input would break the round trip. Special tokens take the first ids, in the order given.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT_TOKEN = "<|endoftext|>"  # document separator in the packed training data
PAD_TOKEN = "<|pad|>"
# The chat roles are for the later SFT / reward / PPO / DPO stages (chat templates).
DEFAULT_SPECIAL_TOKENS = (EOT_TOKEN, PAD_TOKEN, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = DEFAULT_SPECIAL_TOKENS
_N_BYTES = 256
MAX_VOCAB_SIZE = 1 << 31  # ids are stored as uint32 at most


def _check_vocab_size(vocab_size, n_special: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an integer, got {type(vocab_size).__name__} {vocab_size!r}")
    low = _N_BYTES + n_special
    if not low <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be between {low} (256 bytes + {n_special} special tokens) and "
                         f"{MAX_VOCAB_SIZE}, got {vocab_size}")


def train_tokenizer(docs: Iterable[str], vocab_size: int = 4096,
                    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, *, min_frequency: int = 2,
                    show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `docs`.

    The result has at most `vocab_size` tokens: special tokens (ids 0..len-1), the 256 byte tokens, then
    merges. A small corpus can run out of merges that occur `min_frequency` times, giving fewer tokens;
    read the real size from `tokenizer.get_vocab_size()`.
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens) or not all(isinstance(t, str) and t for t in special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens}")
    _check_vocab_size(vocab_size, len(special_tokens))
    docs = list(docs) if not isinstance(docs, (list, tuple)) else docs
    if not docs:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> Path:
    """Write tokenizer.json (atomically: a temporary file, then rename). `path` may be a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json, or the tokenizer.json inside a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
        raise ValueError(f"cannot load tokenizer from {str(path)!r}: {e}") from None


def special_token_id(tokenizer: Tokenizer, token: str) -> int:
    """Id of a special token; ValueError if the tokenizer does not have it."""
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"tokenizer has no token {token!r}")
    return i


@contextmanager
def _special_tokens_as_text(tokenizer: Tokenizer, as_text: bool):
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = as_text
    try:
        yield
    finally:
        tokenizer.encode_special_tokens = previous


def encode(tokenizer: Tokenizer, text: str, *, allow_special: bool = True) -> list[int]:
    """Token ids of `text`. With `allow_special` (the default) a special-token string such as "<|user|>"
    in the text becomes its single id, as chat templates need; without it, it is encoded as plain text,
    as raw corpus documents need (a document that mentions "<|endoftext|>" must not end itself)."""
    with _special_tokens_as_text(tokenizer, not allow_special):
        return tokenizer.encode(text, add_special_tokens=False).ids


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str], *, allow_special: bool = True) -> list[list[int]]:
    """`encode` over many texts, in parallel inside the library."""
    with _special_tokens_as_text(tokenizer, not allow_special):
        return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def decode(tokenizer: Tokenizer, ids: Iterable[int], *, skip_special: bool = False) -> str:
    """Text of `ids` (special tokens included unless `skip_special`)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)
