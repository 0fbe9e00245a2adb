"""Train/validation split by document, so no document contributes text to both sides."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def split_documents(docs: Sequence[str], val_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """Shuffle the documents with `seed` and put `round(val_fraction * n)` of them (at least one when
    `val_fraction > 0`) in the validation split. Returns (train, val), each in shuffled order.

    Raises ValueError when val_fraction is outside [0, 1) or the split would leave either side empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(docs)
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise ValueError(f"cannot split {n} document(s) with val_fraction={val_fraction}: "
                         f"need at least {n_val + 1} documents so that both splits are non-empty")
    order = np.random.default_rng(seed).permutation(n)
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]
