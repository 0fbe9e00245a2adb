"""Cleaning: Unicode normalisation, whitespace clean-up, and dropping binary or too-short documents.

Indentation is meaningful in code, so leading whitespace is never touched; only line endings, trailing
whitespace, runs of blank lines and the outer blank lines change.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable

DEFAULT_MIN_CHARS = 64
# A document where more than this fraction of characters are control characters (other than tab, newline,
# carriage return, form feed) is treated as binary. Real text has ~0; a binary file decoded as text ~30%.
_MAX_CONTROL_FRACTION = 0.01

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_TRAILING_SPACE = re.compile(r"[ \t\f\v]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{4,}")  # more than two blank lines in a row


def is_binary(text: str) -> bool:
    """True for text that came from bytes that are not UTF-8 text: NUL bytes, undecodable bytes (the lone
    surrogates `surrogateescape` leaves), or too many control characters."""
    if "\x00" in text or _SURROGATE.search(text):
        return True
    if not text:
        return False
    return len(_CONTROL.findall(text)) > _MAX_CONTROL_FRACTION * len(text)


def normalize_text(text: str) -> str:
    """NFC normalisation, a leading BOM removed, `\\r\\n`/`\\r` to `\\n`, trailing whitespace removed from every
    line, at most two blank lines in a row, and no blank lines at the start or end."""
    text = unicodedata.normalize("NFC", text)
    text = text.removeprefix("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_RUN.sub("\n\n\n", text)
    return text.strip("\n")


def clean_documents(docs: Iterable[str], *, min_chars: int = DEFAULT_MIN_CHARS,
                    stats: dict | None = None) -> list[str]:
    """Normalise every document and drop binary ones and those shorter than `min_chars` characters
    (after normalisation, not counting whitespace at the ends).

    stats: if given, a dict updated with the counts `dropped_binary` and `dropped_short`.
    """
    if not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars must be a non-negative integer, got {min_chars!r}")
    kept, binary, short = [], 0, 0
    for doc in docs:
        if not isinstance(doc, str):
            raise TypeError(f"documents must be str, got {type(doc).__name__}")
        if is_binary(doc):
            binary += 1
            continue
        doc = normalize_text(doc)
        if len(doc.strip()) < min_chars:
            short += 1
            continue
        kept.append(doc)
    if stats is not None:
        stats["dropped_binary"] = stats.get("dropped_binary", 0) + binary
        stats["dropped_short"] = stats.get("dropped_short", 0) + short
    return kept
