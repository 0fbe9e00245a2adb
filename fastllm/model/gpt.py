"""The lean GPT: norm, attention, MLP, block, GPT, top to bottom, nanoGPT-style.

Shapes: B batch, T tokens per row, C n_embd, nh query heads, nkv key/value heads, hd head_dim, V vocabulary.
Every hot op goes through fastllm.ops (norms fused with the residual add, flash attention, the fused linear
cross-entropy); with config.use_kernels=False the same modules run plain PyTorch instead (F.layer_norm,
F.scaled_dot_product_attention, F.cross_entropy on materialised logits): same parameters, same state_dict keys.

Three token layouts share one forward:
  dense   idx (B, T): B rows of T tokens, causal attention within each row (pretraining).
  packed  idx (1, N) with cu_seqlens (n + 1,): n sequences side by side, no padding; each attends only to
          itself and its positions restart at 0 (packed SFT, generation's prefill).
  cached  idx (B, T) with a KVCache: row b's T new tokens follow the cache's lengths[b] tokens (decoding).
"""
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .config import GPTConfig
from .generate import KVCache, generate

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dimension, fused with the residual add that precedes it.

    norm(x) -> (norm(x), x);  norm(x, residual) -> (norm(x + residual), x + residual), one pass over the rows.
    Parameters `weight` (and `bias` for LayerNorm with config.bias), as in torch.nn.LayerNorm / RMSNorm.
    """

    def __init__(self, config):
        super().__init__()
        self.rms = config.norm == "rmsnorm"
        self.eps = config.norm_eps
        self.use_kernels = config.use_kernels
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if config.bias and not self.rms else None

    def forward(self, x, residual=None):
        if residual is not None:
            x = x.to(residual.dtype)  # under autocast a sub-layer returns bf16; the stream keeps its own dtype
        if self.use_kernels:
            if residual is None:
                normed = (ops.rms_norm(x, self.weight, self.eps) if self.rms
                          else ops.layer_norm(x, self.weight, self.bias, self.eps))
                return normed, x
            if self.rms:
                return ops.add_rms_norm(x, residual, self.weight, self.eps)
            return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)
        if residual is not None:
            x = x + residual
        shape = x.shape[-1:]
        normed = (F.rms_norm(x, shape, self.weight, self.eps) if self.rms
                  else F.layer_norm(x, shape, self.weight, self.bias, self.eps))
        return normed, x


def rotary_cos_sin(position_ids, head_dim, theta):
    """cos and sin (B, T, 1, hd/2), float32, of the rotation angles position * theta^(-2i/hd).

    Computed per forward from the positions (not a buffer): cheap, and never rounded by model.to(bfloat16)."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    angles = position_ids[..., None].float() * (1.0 / theta**exponents)  # (B, T, hd/2)
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rotary(x, cos, sin):
    """Rotate each (x[i], x[i + hd/2]) pair of x (B, T, heads, hd) by its angle: the "rotate half" layout of
    GPT-NeoX and Hugging Face Llama, so their checkpoints load without permuting q and k."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class Layout:
    """How one forward's tokens are laid out (see the module docstring); shared by every layer."""
    cu_seqlens: Optional[torch.Tensor] = None  # packed: (n + 1,) int32 offsets into the row of N tokens
    max_seqlen: int = 0
    cache: Optional[KVCache] = None
    slots: Optional[tuple] = None  # cached: (row, position) (N,) each, where the new keys and values go
    kv_lengths: Optional[torch.Tensor] = None  # cached, dense idx: (B,) cache lengths including the new tokens
    new_lengths: Optional[list] = None  # cached: each row's length once this forward's tokens are stored


def _plain_attention(q, k, v, *, causal=False, mask=None):
    """Plain-PyTorch attention of q (B, T, nh, hd) over k, v (B, S, nkv, hd) -> (B, T, nh, hd)."""
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T or S, hd)
    if group > 1:  # each key/value head serves `group` query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).transpose(1, 2)


def _packed_mask(cu_seqlens, total, device):
    """(N, N) bool: token i sees token j iff both are in one sequence and j <= i."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    position = torch.arange(total, device=device)
    return (sequence[:, None] == sequence[None, :]) & (position[None, :] <= position[:, None])


def _cache_mask(kv_lengths, new_tokens, cache_len):
    """(B, 1, T, S) bool: new token i of row b (at cache position kv_lengths[b] - T + i) sees positions <= its own."""
    position = kv_lengths[:, None].long() - new_tokens + torch.arange(new_tokens, device=kv_lengths.device)
    keys = torch.arange(cache_len, device=kv_lengths.device)
    return (keys[None, None, :] <= position[:, :, None])[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_size
        self.use_kernels = config.use_kernels
        # q, k and v of every head in one matmul: (C) -> ((nh + 2 nkv) hd)
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # No dropout on the attention probabilities: the fused kernels never hold them.

    def forward(self, x, rope, layout):
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if layout.cache is not None:
            k_cache, v_cache = layout.cache.store(self.layer_idx, k, v, layout.slots)  # (B', S, nkv, hd)
        if layout.cu_seqlens is not None:  # packed (a prefill's cache was empty: its keys are exactly k, v)
            cu, most = layout.cu_seqlens, layout.max_seqlen
            if self.use_kernels:
                y = ops.attention_varlen(q[0], k[0], v[0], cu, cu, most, most, causal=True)[None]
            else:
                y = _plain_attention(q, k, v, mask=_packed_mask(cu, T, x.device))
        elif layout.cache is not None:  # the new tokens against each row's cached prefix
            if self.use_kernels:
                y = ops.attention_decode(q, k_cache, v_cache, layout.kv_lengths, causal=True)
            else:
                y = _plain_attention(q, k_cache, v_cache, mask=_cache_mask(layout.kv_lengths, T, k_cache.shape[1]))
        else:
            y = ops.attention(q, k, v, causal=True) if self.use_kernels else _plain_attention(q, k, v, causal=True)
        y = y.reshape(B, T, nh * hd)  # (B, T, nh, hd) -> (B, T, nh hd)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.approximate = config.gelu_approximate
        width = config.mlp_width
        # SwiGLU's gate and up projections are one matmul: (C) -> (2 width), split after.
        self.c_fc = nn.Linear(config.n_embd, 2 * width if self.swiglu else width, bias=config.bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, width) or (B, T, 2 width)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)).

    Written on (sub-layer output, residual stream) pairs so that each residual add runs inside the norm that
    follows it (one fused pass instead of an add and a norm); the last block's add happens in GPT's ln_f."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)

    def forward(self, x, residual, rope, layout):
        h, residual = self.ln_1(x, residual)  # residual += x; h = ln_1(residual)
        x = self.attn(h, rope, layout)
        h, residual = self.ln_2(x, residual)
        return self.mlp(h), residual


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                       ln_f=Norm(config))
        self.transformer = nn.ModuleDict(modules)
        # A tied head has no parameter of its own (lm_head_weight is wte.weight): one tensor, one key.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's last projection by 1/sqrt(2 n_layer), so the stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection (V, C): the token embedding when tied."""
        return self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self, non_embedding=True) -> int:
        """Parameter count; by default without the position embedding (as nanoGPT counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ---- forward ----
    def forward(self, idx, targets=None, *, position_ids=None, cu_seqlens=None, cache=None, return_logits=False,
                ignore_index=-100):
        """idx (B, T) token ids -> (logits (B, T, V), None), or with targets (B, T) -> (None, loss).

        With targets the loss is the fused linear cross-entropy over the hidden states (mean over tokens whose
        target is not ignore_index, fp32): the (B, T, V) logits are never materialised, and returned only if
        return_logits=True. position_ids, cu_seqlens and cache as in hidden_states.
        """
        hidden = self.hidden_states(idx, position_ids=position_ids, cu_seqlens=cu_seqlens, cache=cache)
        if targets is None:
            return F.linear(hidden, self.lm_head_weight), None
        if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape or targets.dtype.is_floating_point:
            shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must be an integer tensor of idx's shape {tuple(idx.shape)}, got {shape}")
        weight = self.lm_head_weight
        if self.config.use_kernels:
            loss = ops.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index)
            return (F.linear(hidden, weight) if return_logits else None), loss
        logits = F.linear(hidden, weight)  # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=ignore_index)
        return (logits if return_logits else None), loss

    def hidden_states(self, idx, *, position_ids=None, cu_seqlens=None, cache=None):
        """The final normed hidden states (B, T, C) of idx (B, T), for the fused-linear losses (PPO, DPO).

        position_ids (B, T): default 0..T-1 per row (per sequence when packed; after the cached tokens with a
        cache). cu_seqlens (n + 1,) integer offsets: idx is (1, N) holding n sequences back to back (see the
        module docstring). cache: a KVCache; the new tokens' keys and values are stored and its lengths
        advanced (with cu_seqlens it must be empty and hold n rows: a prefill).
        """
        layout, position_ids = self._layout(idx, position_ids, cu_seqlens, cache)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.position == "learned":
            x = x + self.transformer.wpe(position_ids)
        else:
            rope = rotary_cos_sin(position_ids, self.config.head_size, self.config.rope_theta)
        x = self.transformer.drop(x)
        residual = None
        for block in self.transformer.h:
            x, residual = block(x, residual, rope, layout)
        hidden, _ = self.transformer.ln_f(x, residual)  # (B, T, C)
        if cache is not None:
            cache.advance(layout)
        return hidden

    def _layout(self, idx, position_ids, cu_seqlens, cache):
        """Check the arguments; return the Layout and the (B, T) position ids."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype.is_floating_point or (
                idx.dtype == torch.bool):
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a 2-D integer tensor (batch, tokens), got {shape}")
        B, T = idx.shape
        device = idx.device
        if position_ids is not None and (not isinstance(position_ids, torch.Tensor) or position_ids.shape != idx.shape):
            shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
            raise ValueError(f"position_ids must be a tensor of idx's shape {tuple(idx.shape)}, got {shape}")
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a fastllm.model.KVCache, got {type(cache).__name__}")
        block_size = self.config.block_size
        if cu_seqlens is not None:
            lengths = _check_cu_seqlens(cu_seqlens, idx)
            longest = max(lengths, default=0)
            if longest > block_size:
                raise ValueError(f"a packed sequence has {longest} tokens, more than block_size = {block_size}")
            cu = cu_seqlens.to(device=device, dtype=torch.int32)
            within = torch.arange(T, device=device) - torch.repeat_interleave(
                cu[:-1].long(), torch.tensor(lengths, device=device))  # position inside its own sequence
            if position_ids is None:
                position_ids = within[None]
            layout = Layout(cu_seqlens=cu, max_seqlen=longest)
            if cache is not None:
                if cache.batch_size != len(lengths) or any(cache.lengths):
                    raise ValueError(f"a packed forward with a cache is a prefill: the cache must be empty and hold "
                                     f"{len(lengths)} rows, got {cache.batch_size} rows of lengths {cache.lengths}")
                if longest > cache.max_len:
                    raise ValueError(f"a packed sequence has {longest} tokens, more than the cache holds "
                                     f"({cache.max_len})")
                rows = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                               torch.tensor(lengths, device=device))
                layout.cache, layout.slots, layout.new_lengths = cache, (rows, within), lengths
            return layout, position_ids
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"idx has {B} rows but the cache holds {cache.batch_size}")
            after = [length + T for length in cache.lengths]
            if max(after) > cache.max_len:
                raise ValueError(f"the cache holds {cache.max_len} positions per row; {T} more tokens would need "
                                 f"{max(after)}")
            start = torch.tensor(cache.lengths, device=device)
            positions = start[:, None] + torch.arange(T, device=device)  # (B, T)
            if position_ids is None:
                if max(after) > block_size:
                    raise ValueError(f"positions up to {max(after) - 1} exceed block_size = {block_size}")
                position_ids = positions
            rows = torch.arange(B, device=device)[:, None].expand(B, T)
            layout = Layout(cache=cache, slots=(rows.reshape(-1), positions.reshape(-1)),
                            kv_lengths=torch.tensor(after, device=device, dtype=torch.int32), new_lengths=after)
            return layout, position_ids
        if T > block_size:
            raise ValueError(f"cannot forward a sequence of {T} tokens: block_size is {block_size}")
        if position_ids is None:
            position_ids = torch.arange(T, device=device)[None].expand(B, T)
        return Layout(), position_ids

    # ---- generation ----
    def generate(self, prompts, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
                 return_logprobs=False, generator=None, use_cache=True):
        """Sample continuations of `prompts` (a list of token-id lists of any lengths, or a 2-D tensor).

        Returns a fastllm.model.Generation: .tokens (the new tokens of each prompt, a stop token included),
        .logprobs (with return_logprobs: fp32 tensors, log softmax(logits / temperature) of each new token),
        .stopped. See fastllm.model.generate.generate.
        """
        return generate(self, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        stop_tokens=stop_tokens, return_logprobs=return_logprobs, generator=generator,
                        use_cache=use_cache)

    # ---- weights on disk ----
    def save_pretrained(self, directory):
        """Write directory/config.json and directory/model.safetensors, each atomically (a temporary file in the
        same directory, then os.replace: a reader sees the old file or the new one, never a partial one)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        _atomic_write(os.path.join(directory, WEIGHTS_NAME),
                      lambda path: save_file(state, path, metadata={"format": "pt"}))
        text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        _atomic_write(os.path.join(directory, CONFIG_NAME), lambda path: _write_text(path, text))

    @classmethod
    def from_pretrained(cls, directory, *, use_kernels=None, device=None, dtype=None) -> "GPT":
        """The model written by save_pretrained. use_kernels overrides the saved config's."""
        config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found: {directory!r} is not a directory written by "
                                        f"GPT.save_pretrained")
        try:
            with open(config_path) as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
        if use_kernels is not None:
            data = {**data, "use_kernels": use_kernels}
        model = cls(GPTConfig.from_dict(data))
        model.load_checked(read_safetensors(weights_path), source=weights_path)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_hf(cls, path, **kwargs) -> "GPT":
        """GPT-2 or Llama weights from a local Hugging Face folder: fastllm.model.hf.from_hf."""
        from .hf import from_hf

        return from_hf(path, **kwargs)

    def load_checked(self, state, source="state dict"):
        """load_state_dict, with a ValueError naming every missing, unexpected or misshapen tensor."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        misshapen = [f"{k}: {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in own
                     if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or misshapen:
            raise ValueError(f"{source} does not match the model: missing {missing}, unexpected {unexpected}, "
                             f"wrong shape {misshapen}")
        self.load_state_dict(state)


def _check_cu_seqlens(cu_seqlens, idx):
    """The sequence lengths of a packed row, checked: cu_seqlens is an integer (n + 1,) tensor of
    non-decreasing offsets from 0 to idx.shape[1], and idx is one row."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or (
            cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool):
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor of n + 1 >= 2 offsets, got {shape}")
    if idx.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, idx must be one packed row (1, N), got {tuple(idx.shape)}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != idx.shape[1]:
        raise ValueError(f"cu_seqlens must run from 0 to the number of tokens ({idx.shape[1]}), got "
                         f"{offsets[0]} .. {offsets[-1]}")
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")
    return lengths


def read_safetensors(path):
    """All tensors of a safetensors file, with a ValueError (not a Rust panic message) if it is corrupt."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own SafetensorError or OSError subclasses
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def _atomic_write(path, write):
    """write(temporary path) in path's directory, flush it to disk, then rename it over path."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
