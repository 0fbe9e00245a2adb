"""Scoring: a reward model, or weighted reward functions, plus the missing-EOS and overlong penalties.

A reward function receives the prompt, the response text and the response's token ids, and returns a number:

    def exact_answer(prompt: str, response: str, token_ids: list[int]) -> float: ...
    def short(prompt, response): ...          # two parameters: called without the token ids

(without a chat template the prompt and response are token-id lists). Several functions with weights score a
response by sum_k weight_k f_k; each function's own mean and std are logged as rewards/{name}/mean and /std.
A function that raises, or returns something that is not a finite number, stops the run with an error that
names the function and shows the sample; nothing is swallowed.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable, Optional, Sequence

import torch


class RewardError(RuntimeError):
    """A reward function raised or returned a non-number on one sample."""


def load_reward_fn(spec: str) -> Callable:
    """'package.module:function' -> the function."""
    if ":" not in spec:
        raise ValueError(f"--reward-fn must be 'module:function', got {spec!r}")
    module, name = spec.split(":", 1)
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec!r}: {module} has no callable {name!r}")
    return fn


def _takes_token_ids(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the two-argument form
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _name_of(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class RewardFunctions:
    """sum_k weight_k f_k(prompt, response, token_ids); fns: one callable or several, weights: one per function
    (default 1 each). names: how each is logged (default: the function's __name__, made unique)."""

    def __init__(self, fns, weights: Optional[Sequence[float]] = None, names: Optional[Sequence[str]] = None):
        self.fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
        if not self.fns or not all(callable(f) for f in self.fns):
            raise ValueError(f"reward functions must be one or more callables, got {fns!r}")
        self.weights = [1.0] * len(self.fns) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.fns) or not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"reward_weights must be {len(self.fns)} finite numbers (one per reward function), "
                             f"got {weights!r}")
        names = list(names) if names is not None else [_name_of(f) for f in self.fns]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self._with_ids = [_takes_token_ids(f) for f in self.fns]

    def __call__(self, prompts, responses, token_ids) -> tuple[torch.Tensor, dict]:
        """(weighted total (n,), {name: (n,) each function's output})."""
        parts = {}
        for fn, name, with_ids in zip(self.fns, self.names, self._with_ids):
            values = []
            for prompt, response, ids in zip(prompts, responses, token_ids):
                try:
                    value = fn(prompt, response, list(ids)) if with_ids else fn(prompt, response)
                except Exception as e:
                    raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e} on the sample "
                                      f"prompt={prompt!r} response={response!r}") from e
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise RewardError(f"reward function {name!r} must return a finite number, got {value!r} on "
                                      f"the sample prompt={prompt!r} response={response!r}")
                values.append(float(value))
            parts[name] = torch.tensor(values, dtype=torch.float32)
        total = sum(w * parts[n] for w, n in zip(self.weights, self.names))
        return total, parts


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment [Yu et al. 2025, eq. 13] per response length L, with L_max = max_length
    and the buffer L_c: 0 for L <= L_max - L_c, then falling linearly to -penalty at L = L_max (and -penalty past
    it): -penalty * min((L - (L_max - L_c)) / L_c, 1)."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_length - buffer)).clamp(min=0.0)
    return -penalty * (over / buffer).clamp(max=1.0)
