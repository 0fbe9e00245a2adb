"""Tokenised data on disk and fixed-length training sequences read from it.

File format (nanoGPT's): a flat little-endian array of token ids, uint16 when every id fits (vocabulary of
at most 65,536 tokens) else uint32, with no header; documents are separated by the <|endoftext|> id, which
also follows the last one. The dtype is recorded in meta.json next to the file (`prepare.py` writes it).

Packing: the token stream is cut into non-overlapping windows of seq_len + 1 tokens, starting every
seq_len tokens (x = window[:-1], y = window[1:]); windows cross document boundaries, the separator tells the
model where one document ends. The sample at global position g lies in epoch e = g // num_sequences and is
window perm_e[g % num_sequences], perm_e a permutation seeded by (seed, e). A batch is a range of global
positions, so it is a pure function of its arguments and a resumed run continues exactly.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .tokenizer import EOT_TOKEN, encode_batch, special_token_id

META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits in it, else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_tokens(docs: Iterable[str], tokenizer: Tokenizer, path: str | os.PathLike, *,
                 batch_docs: int = 256, show_progress: bool = False, total: int | None = None) -> int:
    """Tokenise `docs` and write them to `path`, each followed by <|endoftext|>. Returns the number of
    tokens written. Special-token strings inside documents are encoded as plain text."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    eot = special_token_id(tokenizer, EOT_TOKEN)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    bar = tqdm(total=total, desc=f"tokenise {path.name}", unit="doc", disable=not show_progress)
    with open(tmp, "wb") as f:
        batch: list[str] = []

        def flush():
            nonlocal n
            for ids in encode_batch(tokenizer, batch, allow_special=False):
                arr = np.empty(len(ids) + 1, dtype=dtype)
                arr[:-1] = ids
                arr[-1] = eot
                f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
                n += len(arr)
            bar.update(len(batch))
            batch.clear()

        for doc in docs:
            batch.append(doc)
            if len(batch) >= batch_docs:
                flush()
        if batch:
            flush()
    bar.close()
    os.replace(tmp, path)
    return n


def _dtype_from_meta(path: Path) -> np.dtype:
    meta_path = path.parent / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"cannot tell the token dtype of {str(path)!r}: no {META_FILE} next to it; "
                         f"pass dtype=np.uint16 or np.uint32")
    meta = json.loads(meta_path.read_text())
    if "dtype" not in meta:
        raise ValueError(f"{str(meta_path)!r} has no 'dtype' entry")
    return np.dtype(meta["dtype"])


class TokenDataset:
    """Fixed-length (x, y) training sequences from a token file, memory-mapped.

    path: a token file written by `write_tokens` / `prepare_dataset` (train.bin, val.bin).
    seq_len: tokens per sequence; the file must hold at least seq_len + 1 tokens.
    dtype: the file's dtype; by default read from meta.json in the same folder.
    seed: seeds the per-epoch order of the sequences.
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, *, dtype=None, seed: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"token file {str(self.path)!r} does not exist")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.dtype = np.dtype(dtype) if dtype is not None else _dtype_from_meta(self.path)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"token dtype must be uint16 or uint32, got {self.dtype}")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"{str(self.path)!r} has {size} bytes, not a multiple of {self.dtype.itemsize} "
                             f"({self.dtype}): wrong dtype or a truncated file")
        self.num_tokens = size // self.dtype.itemsize
        if self.num_tokens < seq_len + 1:
            raise ValueError(f"seq_len={seq_len} is larger than the data: {str(self.path)!r} has "
                             f"{self.num_tokens} tokens, and one sequence needs seq_len + 1 = {seq_len + 1}")
        self.tokens = np.memmap(self.path, dtype=self.dtype.newbyteorder("<"), mode="r")
        self.seq_len, self.seed = seq_len, seed
        self.num_sequences = (self.num_tokens - 1) // seq_len
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, seq_len={self.seq_len}, tokens={self.num_tokens}, "
                f"sequences={self.num_sequences}, dtype={self.dtype})")

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Global batches of batch_size * world_size sequences per pass over the data (at least 1)."""
        return max(1, self.num_sequences // (batch_size * world_size))

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            self._perms[epoch] = perm
            if len(self._perms) > 4:  # a batch spans at most a few epochs
                self._perms.popitem(last=False)
        return perm

    def _windows(self, seq_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = seq_ids[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        chunk = torch.from_numpy(self.tokens[offsets].astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def sequence_ids(self, index: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Which windows `batch(index, batch_size, rank=rank, world_size=world_size)` returns."""
        for name, value, low in (("index", index, 0), ("batch_size", batch_size, 1), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        # Global positions: the world_size=1 batch of size world_size * batch_size at `index`, this rank's slice.
        start = (index * world_size + rank) * batch_size
        positions = np.arange(start, start + batch_size, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_sequences)
        out = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._permutation(int(e))[within[sel]]
        return out

    def batch(self, index: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (batch_size, seq_len) int64, y = x shifted by one token.

        Deterministic in its arguments. Rank r of world_size w gets rows [r*batch_size, (r+1)*batch_size)
        of the single-process batch of size w*batch_size at the same index, so the ranks' shards are
        disjoint and their concatenation is that batch. Past the last sequence, the next epoch starts
        with a fresh permutation; a batch that straddles the boundary takes the end of one epoch and the
        start of the next, so it can hold the same window twice (once per epoch), never two epochs' worth.
        """
        return self._windows(self.sequence_ids(index, batch_size, rank=rank, world_size=world_size))

    def eval_batches(self, batch_size: int, max_batches: int | None = None, *, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Full batches of consecutive sequences in file order (no shuffling), for evaluation.

        Global batch k holds sequences [k*B*w, (k+1)*B*w) with B = batch_size, w = world_size, and rank r
        gets its slice of it, so every rank yields the same number of batches. At most `max_batches`;
        leftover sequences that do not fill a global batch are not used.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        global_batch = batch_size * world_size
        n = self.num_sequences // global_batch
        if n == 0:
            raise ValueError(f"{str(self.path)!r} has {self.num_sequences} sequences of {self.seq_len} tokens, "
                             f"fewer than one evaluation batch of batch_size * world_size = {global_batch}")
        if max_batches is not None:
            n = min(n, max_batches)
        for k in range(n):
            start = k * global_batch + rank * batch_size
            yield self._windows(np.arange(start, start + batch_size, dtype=np.int64))
