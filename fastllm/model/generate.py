"""Generation with a KV cache: greedy or sampled (temperature, top-k, top-p), stop tokens, batched prompts of
different lengths, and the log-probs of the sampled tokens (what PPO stores as its old policy's).

Prompts of different lengths need no padding: the prefill runs them packed side by side (varlen attention),
and row b of the cache holds sequence b's tokens at positions [0, length_b). Each decoding step appends one
token per row at its own position and attends to each row's own prefix (fastllm.ops.attention_decode with
kv_lengths), so a prompt's continuation does not depend on the other prompts in the batch.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ..ops._common import kernels


class KVCache:
    """Keys and values of every layer for `batch_size` sequences of at most `max_len` tokens each.

    Layer i's keys are (batch_size, max_len, n_kv_head, head_dim), allocated on first use in the keys' dtype
    and device; row b holds its sequence's tokens at [0, lengths[b]) (host ints). The model stores into it and
    advances the lengths during a forward (GPT.hidden_states(..., cache=cache)).
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int):
        for name, value in (("n_layer", n_layer), ("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name} must be a positive int, got {value!r}")
        self.batch_size, self.max_len = batch_size, max_len
        self.keys = [None] * n_layer
        self.values = [None] * n_layer
        self.lengths = [0] * batch_size

    def store(self, layer, k, v, slots):
        """Write k, v (..., n_kv_head, head_dim) at (row, position) slots (N,) each; return layer's tensors."""
        if self.keys[layer] is None:
            shape = (self.batch_size, self.max_len, *k.shape[-2:])
            self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        rows, positions = slots
        self.keys[layer][rows, positions] = k.reshape(-1, *k.shape[-2:]).to(self.keys[layer].dtype)
        self.values[layer][rows, positions] = v.reshape(-1, *v.shape[-2:]).to(self.values[layer].dtype)
        return self.keys[layer], self.values[layer]

    def advance(self, layout):
        self.lengths = list(layout.new_lengths)


@dataclass
class Generation:
    tokens: list  # list[list[int]]: each prompt's new tokens, its stop token included
    logprobs: Optional[list]  # with return_logprobs: fp32 (len(tokens[b]),) tensors, else None
    stopped: list  # list[bool]: ended by a stop token (else by max_new_tokens)


def restrict_logits(logits, top_k=None, top_p=None):
    """logits (B, V) with every token outside the top_k, or outside the nucleus, set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p: a token stays iff
    the tokens ranked above it hold less than top_p. The most likely token always stays."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, *, temperature=1.0, top_k=None, top_p=None, generator=None):
    """The next token (B,) and its log-prob (B,) fp32, from logits (B, V).

    temperature 0 is greedy (log-probs of softmax(logits)); otherwise the token is drawn from
    softmax(logits / temperature) restricted by top_k / top_p. The log-prob is of the unrestricted
    softmax(logits / temperature): the policy's, which a trainer recomputes with linear_token_logprobs.
    """
    return _sample(logits, temperature, top_k, top_p, generator, want_logprobs=True)


def _sample(logits, temperature, top_k, top_p, generator, want_logprobs):
    """sample_next, with the log-probs (None) skipped unless wanted. Batched, on the logits' device."""
    if temperature == 0 and not want_logprobs:
        return greedy(logits), None  # on the logits as they are: the same index, no fp32 copy
    logits = logits.float()
    if temperature == 0:
        tokens = greedy(logits)
        scaled = logits
    else:
        scaled = logits / temperature
        restricted = restrict_logits(scaled, top_k, top_p) if top_k is not None or top_p is not None else scaled
        tokens = draw(restricted.softmax(dim=-1), generator)
    if not want_logprobs:
        return tokens, None
    return tokens, (scaled.gather(-1, tokens[:, None]).squeeze(-1) - scaled.logsumexp(dim=-1))


def greedy(logits):
    """logits.argmax(dim=-1) of (B, V) logits: the first of equal maxima, NaN the largest. On the C++ backend, its
    row_argmax kernel: ATen's CPU argmax takes 1.3 ns an element on one core (0.3 ms a step at 8 x 32000, more
    than the step's attention), 10x the kernel."""
    if (logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[-1] > 0
            and _backend.resolve(logits.device, logits.dtype) == "cpp"):
        return kernels("cpp", "softmax").row_argmax(logits.contiguous())
    return logits.argmax(dim=-1)


def draw(probs, generator=None):
    """One index per row of probs (B, V), row b's index i with probability probs[b, i] / sum(probs[b]).

    On a CPU by the inverse CDF: one uniform per row against the row's running sum (in float64, so no
    probability moves by more than ~1e-16 of the total). torch.multinomial draws one exponential per entry
    instead (an exponential race): 6.7 ms a step for 8 rows of 32000 on one core, as long as a decode step's
    matmuls. Same distribution, another random stream. Elsewhere torch.multinomial (fast on GPUs, and no host
    sync for the check below)."""
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = probs.to(torch.float64, copy=True).cumsum_(dim=-1)  # in place: a second buffer costs page faults
    totals = cdf[:, -1:]
    if not (torch.isfinite(totals) & (totals > 0)).all() or probs.min() < 0:  # a NaN or inf makes its total so
        raise ValueError("probs must be finite and non-negative with a positive sum in every row, got "
                         f"row sums {totals.squeeze(-1).tolist()}")
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator) * totals
    # the first index whose running sum exceeds u: never one of probability 0 (its sum equals the one before)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def generate(model, prompts, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
             return_logprobs=False, generator=None, use_cache=True) -> Generation:
    """Continue each prompt by up to max_new_tokens tokens.

    prompts: a list of token-id lists (any lengths >= 1) or a 2-D integer tensor. temperature 0: greedy.
    top_k (int >= 1) and top_p (in (0, 1]) restrict sampling. A prompt stops after emitting any of
    stop_tokens (an int or a collection of ints); generation ends when all have stopped. generator: a
    torch.Generator on the model's device, for reproducible sampling. use_cache=False recomputes the whole
    forward at every step (the reference the cache is tested against). The model runs in eval mode (no
    dropout) under no_grad, and is put back in its previous mode.

    The new tokens collect in a (B, max_new_tokens) buffer on the model's device and are read back once at the
    end; stop tokens are checked as a tensor, and whether every row has stopped is read every step on CPU
    (free there), every STOP_CHECK_EVERY steps on an accelerator (a device sync). With the cache, the decode
    steps run on a decode.Decoder when the model's kernels allow (see decode.can_decode).
    """
    config = model.config
    prompts = _prompt_lists(prompts, config.vocab_size)
    stop = _check_generation_args(config, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                                  return_logprobs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tokens, logprobs, counts, stopped = _decode(model, prompts, max_new_tokens, stop, use_cache,
                                                        return_logprobs, lambda logits: _sample(
                                                            logits, temperature, top_k, top_p, generator,
                                                            return_logprobs))
    finally:
        model.train(was_training)
    counts = counts.tolist()
    return Generation(tokens=[row[:n] for row, n in zip(tokens.tolist(), counts)],
                      logprobs=[lp[:n].cpu() for lp, n in zip(logprobs, counts)] if return_logprobs else None,
                      stopped=stopped.tolist())


STOP_CHECK_EVERY = 8  # decode steps between reads of "has every row stopped?" on an accelerator


def _decode(model, prompts, max_new_tokens, stop, use_cache, return_logprobs, sample):
    """The decoding loop: (tokens (B, max_new_tokens), logprobs (B, max_new_tokens) fp32 or None, counts (B,)
    of the tokens each row keeps, stopped (B,) bool), all on the model's device."""
    from . import decode  # decode imports gpt, which imports this module

    device = model.lm_head_weight.device
    batch = len(prompts)
    tokens = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device) if return_logprobs else None
    counts = torch.zeros(batch, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    check_every = 1 if device.type == "cpu" else STOP_CHECK_EVERY
    head = lambda hidden: F.linear(hidden, model.lm_head_weight)  # noqa: E731
    decoder = None
    if use_cache:
        cache = KVCache(model.config.n_layer, batch, max(map(len, prompts)) + max_new_tokens)
        last = _last_hidden(model, prompts, device, cache)  # the prefill, (B, C)
        if max_new_tokens > 1 and decode.can_decode(model, device, model.lm_head_weight.dtype):
            decoder = decode.Decoder(model, cache)
            head = decoder.logits
    sample = decode.timed(sample, "sampling")
    for step in range(max_new_tokens):
        if not use_cache:
            rows = tokens[:, :step].tolist()
            last = _last_hidden(model, [p + r for p, r in zip(prompts, rows)], device)
        next_tokens, next_logprobs = sample(head(last))
        tokens[:, step] = next_tokens
        if return_logprobs:
            logprobs[:, step] = next_logprobs
        counts += ~stopped  # a row keeps this token unless it stopped before it
        if stop:
            stopped |= torch.isin(next_tokens, stop_ids)
        if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(stopped.all())):
            break
        if decoder is not None:
            last = decoder.step(next_tokens)
        elif use_cache:
            # Rows already stopped keep decoding too (one static batch); their tokens are dropped.
            last = model.hidden_states(next_tokens[:, None], cache=cache)[:, 0]
    if decoder is not None:
        decoder.finish()
    return tokens, logprobs, counts, stopped


def _last_hidden(model, sequences, device, cache=None):
    """The final hidden state (B, C) at the last token of each sequence, all run packed in one forward."""
    lengths = torch.tensor([len(s) for s in sequences])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
    idx = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)[None]  # (1, N)
    hidden = model.hidden_states(idx, cu_seqlens=cu_seqlens, cache=cache)  # (1, N, C)
    return hidden[0, cu_seqlens[1:] - 1]


def _prompt_lists(prompts, vocab_size):
    """prompts as a list of lists of ints, each non-empty and in [0, vocab_size)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise ValueError(f"a prompts tensor must be 2-D integer (batch, tokens), got {prompts.dtype} "
                             f"{tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of token-id lists (or a 2-D tensor), got {prompts!r:.80}")
    result = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompts[{i}] must be a list of token ids, got {type(prompt).__name__} (for one prompt "
                             f"pass [tokens])")
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        for j, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ValueError(f"prompts[{i}][{j}] = {token!r} is not a token id in [0, {vocab_size})")
        result.append(list(prompt))
    return result


def _check_generation_args(config, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                           return_logprobs):
    """Raise ValueError for a bad argument; return the stop tokens as a set."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    longest = max(map(len, prompts))
    if longest + max_new_tokens > config.block_size:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size = {config.block_size}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if not isinstance(return_logprobs, bool):
        raise ValueError(f"return_logprobs must be a bool, got {return_logprobs!r}")
    if stop_tokens is None:
        stop_tokens = ()
    if isinstance(stop_tokens, int) and not isinstance(stop_tokens, bool):
        stop_tokens = (stop_tokens,)
    try:
        stop = set(stop_tokens)
    except TypeError:
        raise ValueError(f"stop_tokens must be an int or a collection of ints, got {stop_tokens!r}") from None
    for token in stop:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < config.vocab_size:
            raise ValueError(f"stop token {token!r} is not a token id in [0, {config.vocab_size})")
    return stop
