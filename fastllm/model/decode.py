"""The decode step, prepared once per generate call: one new token per row against the KV cache.

GPT.hidden_states runs every layout through the modules and fastllm.ops, whose public functions check their
arguments and pick a backend at each call: right for training, but at one token per row those checks cost
about as much as the kernels. A Decoder does that work once, when generation starts:
  - the backend (cpp or triton) is resolved and its norm and attention kernels are called directly;
  - each weight matrix is laid out once for the batch size (CPU fp32 and bf16, see decode_linear), and the layouts
    are kept for the model's next calls until its weights change (cached_linear);
  - RoPE's cos / sin are computed for every cache position up front and gathered per step;
  - positions, cache lengths and cache slots are device tensors advanced in place (no host round trip).
Everything the public ops would check (shapes, dtypes, devices, lengths within the cache) holds by
construction here: the cache is sized by generate, which checks the prompts and max_new_tokens.

section_times() times each kind of work of the steps decoded inside it (the decode-step split that
bench.generate reports).
"""
import contextlib
import time
import weakref

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ..ops._common import kernels
from ..ops.attention import window_bounds
from .gpt import rotary_cos_sin

KERNEL_BACKENDS = ("cpp", "triton")
_timings = None  # while section_times() is active: {section: seconds}
_layouts = weakref.WeakKeyDictionary()  # model -> (batch size, {weight name: entry}), see cached_linear


@contextlib.contextmanager
def section_times():
    """{section: seconds} of the Decoders built (and the tokens sampled) inside the block. CPU timing: kernels
    are synchronous there; on CUDA the launches are timed, not the kernels."""
    global _timings
    previous, _timings = _timings, {}
    try:
        yield _timings
    finally:
        _timings = previous


def timed(fn, section):
    """fn, adding its wall time to `section` when called inside section_times(); fn itself otherwise."""
    if _timings is None:
        return fn
    timings = _timings

    def run(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[section] = timings.get(section, 0.0) + time.perf_counter() - start
        return out

    return run


def decode_linear(weight, bias, batch):
    """x (batch, in) -> F.linear(x, weight, bias), with the weight laid out once for this batch size.

    On CPU in fp32, at one row: the transposed weight, contiguous, so the product reads it in the order it is
    stored (MKL's gemv on the (out, in) layout runs at about half the memory bandwidth); at several rows:
    oneDNN's blocked layout packed for `batch` rows (what torch.compile's CPU freezing pass uses), about 2x an
    MKL gemm that repacks the weight at every call. In bf16, at one row: MKL's bf16 x bf16 -> fp32 GEMM on the
    weight as stored (csrc/cpu/wide_matmul.cpp), rounded to bf16 once as F.linear's fp32 sum is: 2-6x
    F.linear, whose bf16 matrix-vector product reads the weight at about 11 GB/s here; at several rows,
    oneDNN's packed layout as in fp32 (2-2.5x). Anything else: F.linear on the weight as it is."""
    if weight.device.type != "cpu":
        return lambda x: F.linear(x, weight, bias)
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    if weight.dtype == torch.float32:
        if batch == 1:
            transposed = weight.t().contiguous()
            if bias is None:
                return lambda x: torch.mm(x, transposed)
            return lambda x: torch.addmm(bias, x, transposed)
        if torch.backends.mkldnn.is_available():
            return _packed_linear(weight, bias, batch)
    if weight.dtype == torch.bfloat16:
        if batch == 1:
            wide_gemm = _wide_gemm()
            if wide_gemm is not None:
                return _wide_linear(wide_gemm, weight, bias)
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return _packed_linear(weight, bias, batch)
    return lambda x: F.linear(x, weight, bias)


def _packed_linear(weight, bias, batch):
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _wide_gemm():
    """The C++ backend's bf16 x bf16 -> fp32 GEMM, as the fused heads find it, or None (no extension, or a torch
    without MKL)."""
    from .. import _cpp
    from ..ops._chunked_head import wide_gemm

    try:
        return wide_gemm("cpp", _cpp.load(), torch.bfloat16)
    except _cpp.CppUnavailable:
        return None


def _wide_linear(wide_gemm, weight, bias):
    transposed = weight.t()  # a view: the GEMM reads the (out, in) weight as stored
    wide_bias = None if bias is None else bias.float()[None]

    def linear(x):
        out = (torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32) if wide_bias is None
               else wide_bias.expand(x.shape[0], -1).clone())
        wide_gemm(out, x, transposed, 0.0 if wide_bias is None else 1.0)
        return out.to(torch.bfloat16)
    return linear


def cached_linear(model, name, module_or_weight, batch):
    """decode_linear of a weight of `model`, kept on the model for the next generate calls at this batch size.

    Laying a weight out is a copy (about as long as a few decode steps), so it is redone only when the weight
    changed. A changed tensor (model.to, a new parameter) or version counter (an in-place optimizer step,
    load_state_dict) says so at no cost; writes the counter misses (through .data, into FSDP's all-gather
    buffers) are caught by a fingerprint: the weight times a random vector drawn for this entry, recomputed
    each call (one read of the weight, about one decode step's matmul) and compared bit for bit. The model
    holds one batch size's layouts at a time, about one more copy of its linear weights (freed with the
    model, or by release_layouts(model))."""
    weight, bias = ((module_or_weight.weight, module_or_weight.bias) if isinstance(module_or_weight, torch.nn.Module)
                    else (module_or_weight, None))
    layouts = _layouts.get(model)
    if layouts is None or layouts[0] != batch:
        layouts = _layouts[model] = (batch, {})
    key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype, weight.device)
    entry = layouts[1].get(name)
    if entry is not None and entry["key"] == key and torch.equal(weight.detach() @ entry["probe"], entry["print"]) and (
            (bias is None and entry["bias"] is None) or (
            bias is not None and entry["bias"] is not None and torch.equal(bias, entry["bias"]))):
        return entry["linear"]
    probe = torch.randn(weight.shape[1], dtype=weight.dtype, device=weight.device)
    layouts[1][name] = entry = {"key": key, "probe": probe, "print": weight.detach() @ probe,
                                "bias": None if bias is None else bias.detach().clone(),
                                "linear": decode_linear(weight, bias, batch)}
    return entry["linear"]


def release_layouts(model):
    """Free the weight layouts cached for `model` (cached_linear)."""
    _layouts.pop(model, None)


def can_decode(model, device, dtype):
    """Whether a Decoder runs this model: fastllm kernels on (the cpp or triton backend), no autocast or
    torch.compile trace, plain tensors as weights (not DTensor shards)."""
    if not model.config.use_kernels or torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled():
        return False
    if any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in model.parameters()):
        return False
    return _backend.resolve(device, dtype) in KERNEL_BACKENDS


class Decoder:
    """Decodes one token per row of a KVCache filled by the prefill (GPT.hidden_states with cu_seqlens).

    step(tokens (B,)) -> final normed hidden states (B, C) of those tokens, stored in the cache at each row's
    next position. Equal to model.hidden_states(tokens[:, None], cache=cache)[:, 0], without the per-op
    checks. Rows keep decoding after they stop (one static batch); generate drops their tokens."""

    def __init__(self, model, cache):
        config = model.config
        t = model.transformer
        weight = model.lm_head_weight
        self.device, dtype = weight.device, weight.dtype
        batch = cache.batch_size
        backend = _backend.resolve(self.device, dtype)
        norm_kernel = kernels(backend, "norm").norm_forward
        attention_kernel = kernels(backend, "attention").attention_forward
        self.batch, self.max_len = batch, cache.max_len
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_size
        self.swiglu, self.approximate = config.mlp == "swiglu", config.gelu_approximate
        self.rms = config.norm == "rmsnorm"
        self.scale, (self.window_left, self.window_right) = self.head_dim**-0.5, window_bounds(True, None)

        def linear(name, module, section="matmuls"):
            return timed(cached_linear(model, name, module, batch), section)

        self.layers = [(block.ln_1, linear(f"{i}.c_attn", block.attn.c_attn),
                        linear(f"{i}.attn.c_proj", block.attn.c_proj), block.ln_2, linear(f"{i}.c_fc", block.mlp.c_fc),
                        linear(f"{i}.mlp.c_proj", block.mlp.c_proj)) for i, block in enumerate(t.h)]
        self.ln_f, self.wte = t.ln_f, t.wte.weight
        self.head = linear("lm_head", weight, "head matmul")
        self.wpe = t.wpe.weight if config.position == "learned" else None
        if self.wpe is None:  # cos, sin for every position the cache can hold
            cos, sin = rotary_cos_sin(torch.arange(cache.max_len, device=self.device)[None], self.head_dim,
                                      config.rope_theta)
            # Full-width tables in the model's dtype, for _rotate's two products: [cos, cos] and [-sin, sin]
            cos, sin = cos[0].to(dtype), sin[0].to(dtype)
            self.cos, self.sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        # Flat (B * max_len, heads, hd) views of each layer's cache: row b's position p is slot b * max_len + p.
        self.keys = [k.view(-1, *k.shape[2:]) for k in cache.keys]
        self.values = [v.view(-1, *v.shape[2:]) for v in cache.values]
        self.positions = torch.tensor(cache.lengths, device=self.device)  # (B,) where the next token goes
        self.row_starts = torch.arange(batch, device=self.device) * cache.max_len
        self.kv_lengths = torch.tensor(cache.lengths, device=self.device, dtype=torch.int32)
        self.cache = cache
        self._norm_kernel = timed(norm_kernel, "norms")
        self._attention_kernel = timed(attention_kernel, "attention")
        self._rotate = timed(self._rotary, "rotary, embedding, activation")
        self._activate = timed(self._activation, "rotary, embedding, activation")
        self._store = timed(self._store_kv, "cache writes")

    def norm(self, norm, x, residual):
        """As Norm.forward: (norm(x + residual), x + residual), or (norm(x), x) without a residual."""
        y, residual_out, _, _ = self._norm_kernel(x, residual, norm.weight, norm.bias, norm.eps, 0.0, self.rms)
        return y, (x if residual is None else residual_out)

    def step(self, tokens):
        B, nh, nkv, hd = self.batch, self.n_head, self.n_kv_head, self.head_dim
        x = F.embedding(tokens, self.wte)  # (B, C)
        if self.wpe is not None:
            x = x + self.wpe[self.positions]
        else:
            rope = self.cos[self.positions], self.sin[self.positions]  # (B, 1, hd) each
        slots = self.row_starts + self.positions
        self.kv_lengths += 1  # the new token attends to itself
        residual = None
        for layer, (ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj) in enumerate(self.layers):
            h, residual = self.norm(ln_1, x, residual)
            qk, v = c_attn(h).split([(nh + nkv) * hd, nkv * hd], dim=-1)
            qk = qk.view(B, nh + nkv, hd)
            if self.wpe is None:  # q and k side by side: one rotation for both
                qk = self._rotate(qk, *rope)
            q, k = qk[:, :nh].contiguous(), qk[:, nh:]
            self._store(layer, slots, k, v.view(B, nkv, hd))
            y, _ = self._attention_kernel(q, self.keys[layer], self.values[layer], None, None, self.kv_lengths, 1,
                                          self.max_len, self.scale, self.window_left, self.window_right)
            h, residual = self.norm(ln_2, attn_proj(y.reshape(B, nh * hd)), residual)
            x = mlp_proj(self._activate(c_fc(h)))
        hidden, _ = self.norm(self.ln_f, x, residual)
        self.positions += 1
        return hidden

    def logits(self, hidden):
        return self.head(hidden)

    def _rotary(self, x, cos, sin):
        """apply_rotary of x (B, heads, hd), to the bit: x1 cos - x2 sin and x2 cos + x1 sin are x * [cos, cos] plus
        [x2, x1] * [-sin, sin], each product rounded once as there. Four tensor ops where apply_rotary takes ten
        (chunk, casts, four products, two sums, cat): at 6 layers, ~40 fewer calls a step."""
        return (x * cos).add_(x.roll(self.head_dim // 2, dims=-1) * sin)

    def _store_kv(self, layer, slots, k, v):
        self.keys[layer].index_copy_(0, slots, k)
        self.values[layer].index_copy_(0, slots, v)

    def _activation(self, h):
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate).mul_(up)
        return F.gelu(h, approximate=self.approximate)

    def finish(self):
        """Leave the cache's host lengths where the decoded tokens end (one device read)."""
        self.cache.lengths = self.positions.tolist()
