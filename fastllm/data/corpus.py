"""Corpus readers: plain-text files, folders, JSONL, and the embedded default corpus.

Every reader yields documents as `str`. Bytes that are not valid UTF-8 are kept as lone surrogates
(`errors="surrogateescape"`) instead of raising, so a stray binary file does not stop a run: the cleaning
step (`clean.py`) sees the surrogates and drops the document as binary.

The default corpus is the Python standard library's own `.py` sources of the interpreter running this code
(about 730 files, ~12 MB on CPython 3.11): real text, no download, identical wherever the same Python runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

# Folders skipped in the default corpus: third-party packages, and CPython's own test suites (large,
# repetitive, and full of deliberately odd files).
_DEFAULT_EXCLUDE_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def default_corpus_files() -> list[Path]:
    """The `.py` files of the running interpreter's standard library, in a fixed order.

    The order is by a hash of the path relative to the stdlib root rather than alphabetical, so that a
    `max_bytes` prefix samples the whole library instead of the first packages (asyncio, ctypes, ...).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"default corpus: the standard library folder {str(root)!r} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _DEFAULT_EXCLUDE_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    if not files:
        raise ValueError(f"default corpus: no .py files found under {str(root)!r}")

    def key(p: Path) -> bytes:
        rel = p.relative_to(root).as_posix()
        return hashlib.blake2b(rel.encode(), digest_size=8).digest() + rel.encode()

    return sorted(files, key=key)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="surrogateescape")


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="surrogateescape").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} field, "
                                 f"got {type(record).__name__}" + (f" with keys {sorted(record)}" if isinstance(record, dict) else ""))
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}")
            yield text


def _iter_file(path: Path, text_field: str, separator: str | None) -> Iterator[str]:
    if path.suffix.lower() in _JSONL_SUFFIXES:
        yield from _iter_jsonl(path, text_field)
        return
    text = _read_text(path)
    if separator is None:
        yield text
    else:
        yield from (part for part in text.split(separator) if part.strip())


def _files_under(folder: Path, extensions: Sequence[str] | None) -> list[Path]:
    exts = None if extensions is None else tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if exts is None or name.lower().endswith(exts):
                files.append(Path(dirpath) / name)
    return sorted(files)


def corpus_files(path: str | os.PathLike | None = None, *, extensions: Sequence[str] | None = None) -> list[Path]:
    """The files `read_corpus(path)` reads, in order. `None` is the default (stdlib) corpus.

    A folder is walked recursively in sorted order, skipping hidden files and folders; `extensions`
    (e.g. `[".txt", ".md"]`) restricts which files are read.
    """
    if path is None:
        return default_corpus_files()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus path {str(p)!r} does not exist")
    if p.is_dir():
        return _files_under(p, extensions)
    return [p]


def iter_corpus(path: str | os.PathLike | None = None, *, text_field: str = "text", separator: str | None = None,
                extensions: Sequence[str] | None = None, max_docs: int | None = None,
                max_bytes: int | None = None) -> Iterator[str]:
    """Yield documents one at a time; see `read_corpus`."""
    if max_docs is not None and max_docs <= 0:
        raise ValueError(f"max_docs must be a positive integer or None, got {max_docs!r}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    n_docs = n_bytes = 0
    for file in corpus_files(path, extensions=extensions):
        for doc in _iter_file(file, text_field, separator):
            yield doc
            n_docs += 1
            n_bytes += len(doc.encode("utf-8", errors="surrogateescape"))
            if (max_docs is not None and n_docs >= max_docs) or (max_bytes is not None and n_bytes >= max_bytes):
                return


def read_corpus(path: str | os.PathLike | None = None, *, text_field: str = "text", separator: str | None = None,
                extensions: Sequence[str] | None = None, max_docs: int | None = None,
                max_bytes: int | None = None) -> list[str]:
    """Read a corpus into a list of documents.

    path: `None` for the embedded default corpus (the stdlib's `.py` files); a plain-text file (one
        document, or several split on `separator`); a `.jsonl`/`.ndjson` file (one document per line, the
        string in `text_field`); or a folder, read recursively with the same rules per file.
    max_docs, max_bytes: stop once this many documents / UTF-8 bytes have been read (the document that
        crosses `max_bytes` is kept whole).
    Raises FileNotFoundError for a missing path, ValueError for malformed JSONL or when nothing was read.
    """
    docs = list(iter_corpus(path, text_field=text_field, separator=separator, extensions=extensions,
                            max_docs=max_docs, max_bytes=max_bytes))
    if not docs:
        where = "the default corpus" if path is None else repr(str(path))
        raise ValueError(f"empty corpus: no documents found in {where}"
                         + (f" with extensions {list(extensions)}" if extensions is not None else ""))
    return docs
