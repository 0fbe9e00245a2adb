"""Exact and near-duplicate removal.

Exact: documents whose whitespace-normalised text has the same BLAKE2b digest; the first one is kept.

Near: MinHash over hashed word shingles with LSH banding (Broder 1997; Leskovec, Rajaraman & Ullman,
"Mining of Massive Datasets", ch. 3). A document's words (lower-cased `\\w+` runs) are hashed once each
(BLAKE2b, so results do not depend on PYTHONHASHSEED), k consecutive word hashes are combined into a 64-bit
shingle hash, and `num_perm` multiply-shift hashes h(x) = ((a*x + b) mod 2^64) >> 32 give the signature
(the minimum of each over the shingle set). The fraction of equal signature entries estimates the Jaccard
similarity of the shingle sets. Signatures are cut into `bands` bands of `num_perm // bands` rows; two
documents that agree on a whole band become candidates, and a candidate pair is a duplicate when the
estimated Jaccard similarity reaches `threshold`. With 16 bands of 8 rows the candidate probability is
1 - (1 - s^8)^16: 0.98 at s = 0.8, 0.09 at s = 0.5. Documents are visited in order and each one is compared
only with earlier documents that were kept, so the first of a cluster survives and the result is deterministic.
"""
from __future__ import annotations

import hashlib
import re
from typing import NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

_WORD = re.compile(r"\w+")
_CHUNK = 4096  # shingles per MinHash block: num_perm x _CHUNK uint64 = 4 MiB at num_perm=128


class Duplicate(NamedTuple):
    index: int        # position of the removed document in the input
    original: int     # position of the earlier, kept document it duplicates
    kind: str         # "exact" or "near"
    similarity: float # 1.0 for exact; the estimated Jaccard similarity for near


def exact_key(text: str) -> bytes:
    """Digest of the text with every whitespace run collapsed to one space."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8", errors="surrogatepass"), digest_size=16).digest()


class MinHasher:
    """Deterministic MinHash signatures of word shingles (see the module docstring)."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 0):
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        if shingle_size < 1:
            raise ValueError(f"shingle_size must be >= 1, got {shingle_size}")
        self.num_perm, self.shingle_size, self.seed = num_perm, shingle_size, seed
        rng = np.random.default_rng([seed, 0x5EED])
        self._a = (rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)  # odd
        self._b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
        # Odd multipliers that make the shingle hash depend on word order.
        self._pos = (rng.integers(0, 1 << 63, shingle_size, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self._key = seed.to_bytes(8, "little", signed=True)
        self._word_cache: dict[str, int] = {}

    def _word_hash(self, word: str) -> int:
        h = self._word_cache.get(word)
        if h is None:
            h = int.from_bytes(hashlib.blake2b(word.encode("utf-8", errors="surrogatepass"), digest_size=8,
                                               key=self._key).digest(), "little")
            self._word_cache[word] = h
        return h

    def shingles(self, text: str) -> np.ndarray:
        """The set of 64-bit shingle hashes of `text` (sorted, unique). A document with fewer than
        `shingle_size` words is one shingle of all its words; one with no words hashes its whole text."""
        words = _WORD.findall(text.lower())
        if not words:
            return np.array([int.from_bytes(exact_key(text)[:8], "little")], dtype=np.uint64)
        w = np.fromiter((self._word_hash(x) for x in words), dtype=np.uint64, count=len(words))
        k = min(self.shingle_size, len(w))
        n = len(w) - k + 1
        h = np.zeros(n, dtype=np.uint64)
        for i in range(k):  # wraps mod 2^64, as intended
            h += w[i:i + n] * self._pos[i]
        h ^= h >> np.uint64(31)  # mix the high bits down; multiply-shift below reads the high half
        return np.unique(h)

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32 MinHash signature."""
        sh = self.shingles(text)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        a, b = self._a[:, None], self._b[:, None]
        for start in range(0, len(sh), _CHUNK):
            x = sh[None, start:start + _CHUNK]
            np.minimum(sig, ((a * x + b) >> np.uint64(32)).min(axis=1), out=sig)
        return sig.astype(np.uint32)


def find_duplicates(docs: Sequence[str], *, near: bool = True, threshold: float = 0.8, num_perm: int = 128,
                    bands: int = 16, shingle_size: int = 5, seed: int = 0,
                    show_progress: bool = False) -> list[Duplicate]:
    """The documents `deduplicate` removes, each with the kept document it duplicates, in input order."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if bands < 1 or num_perm % bands:
        raise ValueError(f"bands must divide num_perm: got bands={bands}, num_perm={num_perm}")
    dups: list[Duplicate] = []
    first_seen: dict[bytes, int] = {}
    unique = []
    for i, doc in enumerate(docs):
        key = exact_key(doc)
        j = first_seen.setdefault(key, i)
        if j != i:
            dups.append(Duplicate(i, j, "exact", 1.0))
        else:
            unique.append(i)
    if not near:
        return dups

    hasher = MinHasher(num_perm, shingle_size, seed)
    rows = num_perm // bands
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    kept_sigs: dict[int, np.ndarray] = {}
    for i in tqdm(unique, desc="near-dup minhash", unit="doc", disable=not show_progress):
        sig = hasher.signature(docs[i])
        keys = [sig[b * rows:(b + 1) * rows].tobytes() for b in range(bands)]
        candidates = sorted({j for b, k in enumerate(keys) for j in buckets[b].get(k, ())})
        best, best_sim = -1, 0.0
        for j in candidates:
            sim = float(np.mean(sig == kept_sigs[j]))
            if sim > best_sim:
                best, best_sim = j, sim
        if best >= 0 and best_sim >= threshold:
            dups.append(Duplicate(i, best, "near", best_sim))
            continue
        kept_sigs[i] = sig
        for b, k in enumerate(keys):
            buckets[b].setdefault(k, []).append(i)
    dups.sort(key=lambda d: d.index)
    return dups


def deduplicate(docs: Sequence[str], *, near: bool = True, threshold: float = 0.8, num_perm: int = 128,
                bands: int = 16, shingle_size: int = 5, seed: int = 0, stats: dict | None = None,
                show_progress: bool = False) -> list[str]:
    """Remove exact duplicates and (with `near=True`) near-duplicates whose estimated Jaccard similarity
    of word `shingle_size`-grams is at least `threshold`; the first document of each group is kept and
    the order is preserved.

    stats: if given, a dict updated with the counts `exact_duplicates` and `near_duplicates`.
    """
    dups = find_duplicates(docs, near=near, threshold=threshold, num_perm=num_perm, bands=bands,
                           shingle_size=shingle_size, seed=seed, show_progress=show_progress)
    if stats is not None:
        for kind in ("exact", "near"):
            stats[f"{kind}_duplicates"] = stats.get(f"{kind}_duplicates", 0) + sum(d.kind == kind for d in dups)
    removed = {d.index for d in dups}
    return [doc for i, doc in enumerate(docs) if i not in removed]
