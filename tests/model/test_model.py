"""fastllm.model: the GPT in both styles, kernels vs plain PyTorch, KV-cache generation, safetensors and HF import.

Models are tiny and their weights are redrawn at a large scale (_randomize), so that logits are well separated:
with GPT-2's 0.02 init every token is nearly equally likely and greedy decoding would hinge on rounding.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_matches_reference, on_backend

from fastllm.model import GPT, GPTConfig, KVCache, decode, from_hf, restrict_logits, sample_next

VOCAB = 61
STYLES = {
    "gpt2": GPTConfig.gpt2_style(vocab_size=VOCAB, block_size=40, n_layer=2, n_head=4, n_embd=32),
    "llama": GPTConfig.llama_style(vocab_size=VOCAB, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                   rope_theta=500.0),
}
PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 40], [11], [6, 6, 30, 2, 9]]


def _with(config, **changes):
    return GPTConfig.from_dict({**config.to_dict(), **changes})


def _randomize(model, generator=None):
    """Redraw every parameter: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights ~ 1 + N(0, 0.2^2),
    biases ~ N(0, 0.1^2). Works on fastllm's and on Hugging Face's parameter names."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if p.dim() == 2:
                embedding = any(key in name for key in ("wte", "wpe", "embed_tokens"))
                p.copy_(noise if embedding else noise / min(p.shape) ** 0.5)
            elif any(key in name for key in ("ln", "norm")) and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def _model(style, **changes):
    torch.manual_seed(1)
    return _randomize(GPT(_with(STYLES[style], **changes))).eval()


def _copy(model, **changes):
    other = GPT(_with(model.config, **changes))
    other.load_state_dict(model.state_dict())
    return other.to(next(model.parameters()).dtype).train(model.training)


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------
def test_config_presets_and_json_round_trip():
    gpt2, llama = STYLES["gpt2"], STYLES["llama"]
    assert (gpt2.norm, gpt2.position, gpt2.mlp, gpt2.bias, gpt2.tie_embeddings) == (
        "layernorm", "learned", "gelu", True, True)
    assert (llama.norm, llama.position, llama.mlp, llama.bias, llama.tie_embeddings) == (
        "rmsnorm", "rope", "swiglu", False, False)
    assert (gpt2.mlp_width, gpt2.kv_heads, llama.kv_heads, llama.head_size) == (128, 4, 2, 8)
    for config in (gpt2, llama):
        assert GPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("changes,message", [
    (dict(n_head=5), "multiple of n_head"),
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(norm="batchnorm"), "GPTConfig.norm"),
    (dict(position="alibi"), "GPTConfig.position"),
    (dict(mlp="relu"), "GPTConfig.mlp"),
    (dict(dropout=1.5), "dropout"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layer=2.0), "n_layer"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(use_kernels="yes"), "use_kernels"),
    (dict(position="rope", head_dim=7, n_embd=28), "even head_dim"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_config_raises_clear_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig.gpt2_style(**{**dict(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=4, n_embd=32), **changes})


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown GPTConfig fields \['n_heads'\]"):
        GPTConfig.from_dict({**STYLES["gpt2"].to_dict(), "n_heads": 4})


# ---------------------------------------------------------------------------------------------------------
# Kernels vs plain PyTorch
# ---------------------------------------------------------------------------------------------------------
def _logits_loss_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets, return_logits=True)
    loss.backward()
    return logits, loss, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["cpp", "triton"])  # triton: in the interpreter without a GPU
@pytest.mark.parametrize("style", STYLES)
def test_kernels_match_plain_pytorch(style, backend):
    """Logits, loss and every parameter gradient: fastllm kernels (fp32) vs plain PyTorch, both judged against
    the plain model in float64: the kernels' error must be at most 2x plain PyTorch's own fp32 error."""
    model = _model(style).train()  # train mode: the loss path that training runs (dropout is 0)
    plain = _copy(model, use_kernels=False)
    oracle = _copy(model, use_kernels=False).double()
    assert list(model.state_dict()) == list(plain.state_dict())  # same keys, so checkpoints swap freely
    idx = torch.randint(0, VOCAB, (3, 19))
    targets = torch.randint(0, VOCAB, (3, 19))
    targets[0, :4] = -100  # ignored positions (a prompt, or padding)
    with on_backend(backend):  # strict: a kernel that cannot run raises instead of falling back to torch
        ours = _logits_loss_grads(model, idx, targets)
    base, expected = (_logits_loss_grads(m, idx, targets) for m in (plain, oracle))
    assert_matches_reference("logits", ours[0], expected[0], base[0])
    assert_matches_reference("loss", ours[1], expected[1], base[1])
    assert ours[2].keys() == expected[2].keys()
    for name in expected[2]:
        assert_matches_reference(f"grad of {name}", ours[2][name], expected[2][name], base[2][name])


@pytest.mark.parametrize("style", STYLES)
def test_loss_without_logits_and_hidden_states(style):
    model = _model(style)
    idx, targets = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9))
    logits, loss = model(idx, targets)
    assert logits is None  # the fused loss never builds them
    full, _ = model(idx)
    torch.testing.assert_close(loss, F.cross_entropy(full.view(-1, VOCAB), targets.view(-1)))
    hidden = model.hidden_states(idx)
    assert hidden.shape == (2, 9, 32)
    torch.testing.assert_close(hidden @ model.lm_head_weight.t(), full)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "plain"])
@pytest.mark.parametrize("style", STYLES)
def test_packed_forward_equals_separate_sequences(style, use_kernels):
    """A packed row (cu_seqlens) gives each sequence the logits it has alone: no attention across sequences and
    positions restarting at 0."""
    model = _model(style, use_kernels=use_kernels)
    tokens = [torch.tensor(p) for p in PROMPTS]
    cu_seqlens = torch.tensor([0] + [len(p) for p in PROMPTS]).cumsum(0)
    packed, _ = model(torch.cat(tokens)[None], cu_seqlens=cu_seqlens)
    separate = torch.cat([model(t[None])[0][0] for t in tokens])
    torch.testing.assert_close(packed[0], separate, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("style", STYLES)
def test_dropout_only_in_train_mode(style):
    model = _model(style, dropout=0.5)
    idx = torch.randint(0, VOCAB, (2, 8))
    no_dropout = _copy(model, dropout=0.0).eval()
    torch.testing.assert_close(model.eval()(idx)[0], no_dropout(idx)[0])
    assert not torch.allclose(model.train()(idx)[0], no_dropout(idx)[0], atol=1e-3)


def test_bf16_autocast_training_step():
    """Under CPU bf16 autocast the residual stream stays fp32 while the linears return bf16: the fused norms and
    attention must accept the mix, and the loss and gradients must be finite and close to fp32's."""
    model = _model("llama").train()
    idx, targets = torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, targets)
    loss.backward()
    _, loss32 = _copy(model)(idx, targets)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(loss.item() - loss32.item()) < 0.05 * loss32.item(), (loss.item(), loss32.item())


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "plain"])
@pytest.mark.parametrize("style", STYLES)
def test_generation_with_cache_equals_recompute(style, use_kernels):
    model = _model(style, use_kernels=use_kernels)
    cached = model.generate(PROMPTS, 12, temperature=0)
    recomputed = model.generate(PROMPTS, 12, temperature=0, use_cache=False)
    assert cached.tokens == recomputed.tokens
    assert [len(t) for t in cached.tokens] == [12] * len(PROMPTS)
    # Sampling too: the same generator state draws the same tokens from the same distributions.
    draws = [model.generate(PROMPTS, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3),
                            use_cache=use_cache).tokens for use_cache in (True, False)]
    assert draws[0] == draws[1]


def test_generation_on_triton_backend():
    """The varlen prefill and the decode kernel of the Triton backend (interpreted without a GPU)."""
    model = _model("llama")
    with on_backend("triton"):
        tokens = model.generate(PROMPTS[:2], 4, temperature=0).tokens
    assert tokens == model.generate(PROMPTS[:2], 4, temperature=0, use_cache=False).tokens


@pytest.mark.parametrize("style", STYLES)
def test_batched_prompts_equal_one_by_one(style):
    model = _model(style)
    batched = model.generate(PROMPTS, 10, temperature=0)
    for prompt, tokens in zip(PROMPTS, batched.tokens):
        assert model.generate([prompt], 10, temperature=0).tokens == [tokens]
    # Kernels and plain PyTorch decode the same tokens.
    assert _copy(model, use_kernels=False).generate(PROMPTS, 10, temperature=0).tokens == batched.tokens


@pytest.mark.parametrize("temperature", [0, 0.7])
@pytest.mark.parametrize("style", STYLES)
def test_logprobs_equal_full_forward(style, temperature):
    """The returned log-prob of each sampled token is log_softmax(logits / temperature) of a full forward over
    prompt + continuation (temperature 0: of the logits), at that token."""
    model = _model(style)
    out = model.generate(PROMPTS, 9, temperature=temperature, top_p=0.9, return_logprobs=True,
                         generator=torch.Generator().manual_seed(0))
    for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
        sequence = torch.tensor(prompt + tokens)
        logits, _ = model(sequence[None])
        scaled = logits[0, len(prompt) - 1:-1] / (temperature or 1.0)
        expected = scaled.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        assert logprobs.dtype == torch.float32 and logprobs.shape == (len(tokens),)
        torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)


def test_stop_tokens_end_each_prompt_at_its_first_stop():
    model = _model("llama")
    free = model.generate(PROMPTS, 12, temperature=0).tokens
    stop = free[1][3]
    out = model.generate(PROMPTS, 12, temperature=0, stop_tokens=[stop], return_logprobs=True)
    for tokens, full, stopped, logprobs in zip(out.tokens, free, out.stopped, out.logprobs):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert tokens == full[:end] and stopped == (stop in full) and len(logprobs) == len(tokens)
    assert out.stopped[1]
    # Everything stops at once: generation ends early.
    first = [f[0] for f in free]
    assert model.generate(PROMPTS, 12, temperature=0, stop_tokens=set(first)).tokens == [[t] for t in first]


def _frequencies(probs, n=4000, **kwargs):
    logits = torch.tensor(probs).log()[None].expand(n, -1)
    tokens, _ = sample_next(logits, generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.bincount(tokens, minlength=len(probs)).double() / n


@pytest.mark.parametrize("kwargs,expected", [
    (dict(top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
    (dict(top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # 0.5 < 0.7 needs the second token; then 0.8 >= 0.7
    (dict(top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (dict(top_k=3, top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
    (dict(top_k=1), [1, 0, 0, 0]),
    (dict(temperature=2.0), [p**0.5 / sum(q**0.5 for q in (0.5, 0.3, 0.15, 0.05)) for p in (0.5, 0.3, 0.15, 0.05)]),
    (dict(temperature=0), [1, 0, 0, 0]),
], ids=["top_k", "top_p", "top_p_wider", "both", "top_k_1", "temperature", "greedy"])
def test_sampling_restrictions_and_temperature(kwargs, expected):
    """4000 seeded draws: excluded tokens never appear, the others keep their renormalised odds (within 5 standard
    deviations, ~0.04)."""
    freq = _frequencies([0.5, 0.3, 0.15, 0.05], **kwargs)
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.equal(freq == 0, expected == 0), (freq, expected)
    assert (freq - expected).abs().max() < 0.04, (freq, expected)


def test_restrict_logits_keeps_the_top_token_and_ties():
    logits = torch.tensor([[3.0, 1.0, 1.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    kept = torch.isfinite(restrict_logits(logits, top_p=0.01))
    assert kept[0].tolist() == [True, False, False, False] and kept[1].sum().item() == 1
    assert torch.isfinite(restrict_logits(logits, top_k=2)).sum(-1).tolist() == [3, 4]  # ties at the k-th stay


def test_generation_restores_train_mode():
    model = _model("gpt2", dropout=0.3).train()
    out = model.generate([[1, 2]], 3, temperature=0)
    assert model.training and out.tokens == _copy(model, dropout=0.0).eval().generate([[1, 2]], 3, temperature=0).tokens


def test_kv_cache_decodes_like_a_full_forward():
    """Driving the cache by hand: prefill with two prompts of different lengths, then one step with both."""
    model = _model("llama")
    cache = KVCache(model.config.n_layer, 2, 12)
    a, b = [3, 4, 5, 6], [7, 8]
    model.hidden_states(torch.tensor([a + b]), cu_seqlens=torch.tensor([0, 4, 6]), cache=cache)
    assert cache.lengths == [4, 2]
    step = model.hidden_states(torch.tensor([[9], [10]]), cache=cache)  # (2, 1, C)
    assert cache.lengths == [5, 3]
    torch.testing.assert_close(step[0, 0], model.hidden_states(torch.tensor([a + [9]]))[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], model.hidden_states(torch.tensor([b + [10]]))[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decoder_rotation_is_apply_rotary_to_the_bit(dtype):
    """The decoder's RoPE (two products on full-width tables) rounds exactly as gpt.apply_rotary does, on a
    real model's tables at every cache position."""
    from fastllm.model.gpt import apply_rotary, rotary_cos_sin

    model = _model("llama").to(dtype)
    cache = KVCache(model.config.n_layer, 1, 40)
    with torch.no_grad():
        model.hidden_states(torch.tensor([[1, 2, 3]]), cu_seqlens=torch.tensor([0, 3]), cache=cache)
    decoder = decode.Decoder(model, cache)
    hd, positions = model.config.head_size, torch.tensor([0, 17, 39])
    x = torch.randn(3, model.config.n_head + model.config.kv_heads, hd).to(dtype)
    cos, sin = rotary_cos_sin(positions[None], hd, model.config.rope_theta)  # (1, 3, 1, hd/2)
    expected = apply_rotary(x[None], cos, sin)[0]  # x as (1, T = 3, heads, hd)
    got = decoder._rotary(x, decoder.cos[positions], decoder.sin[positions])
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3], ids=["one_row", "rows"])  # the two CPU weight layouts
@pytest.mark.parametrize("style", STYLES)
def test_decoder_steps_equal_the_cached_forward(style, batch, dtype):
    """decode.Decoder (kernels called directly, weights laid out for the batch, RoPE table, device positions)
    gives the hidden states of GPT.hidden_states with a cache, step by step, rows of different lengths (in bf16
    up to a few bf16 roundings: the two sides' matmuls sum in different orders)."""
    model = _model(style).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    prompts = PROMPTS[1:1 + batch]
    assert decode.can_decode(model, torch.device("cpu"), dtype)
    caches = [KVCache(model.config.n_layer, batch, 16) for _ in range(2)]
    lengths = torch.tensor([len(p) for p in prompts])
    packed = torch.tensor([[t for p in prompts for t in p]])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    with torch.no_grad():
        for cache in caches:
            model.hidden_states(packed, cu_seqlens=cu, cache=cache)
        decoder = decode.Decoder(model, caches[0])
        tokens = torch.tensor([3, 14, 15])[:batch]
        for _ in range(4):
            expected = model.hidden_states(tokens[:, None], cache=caches[1])[:, 0]
            torch.testing.assert_close(decoder.step(tokens), expected, atol=tolerance, rtol=tolerance)
            tokens = (tokens * 7 + 1) % VOCAB
    decoder.finish()
    assert caches[0].lengths == caches[1].lengths == (lengths + 4).tolist()


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("batch", [1, 3], ids=["one_row", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_linear_matches_float64(dtype, batch, with_bias):
    """Each CPU weight layout of the decode step (fp32: transposed / oneDNN-packed; bf16: MKL's bf16 x bf16 ->
    fp32 GEMM / oneDNN-packed) is within 2x F.linear's own rms error against float64, in F.linear's dtype."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(301, 67, generator=generator).to(dtype)
    bias = torch.randn(301, generator=generator).to(dtype) if with_bias else None
    x = torch.randn(batch, 67, generator=generator).to(dtype)
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    ours = decode.decode_linear(weight, bias, batch)(x)
    theirs = F.linear(x, weight, bias)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    ours_error, theirs_error = ((t.double() - exact).norm() for t in (ours, theirs))  # rms: max is one draw
    assert ours_error <= 2 * theirs_error, f"{ours_error:.3g} vs F.linear's {theirs_error:.3g}"


def test_decoder_weight_layouts_follow_weight_updates():
    """The weight layouts kept between generate calls are redone when a weight changes in place (an optimizer
    step) or is replaced (model.to), so generation always uses the current weights."""
    model = _model("llama")
    for batch in (1, 4):
        prompts = PROMPTS[:batch]
        model.generate(prompts, 3, temperature=0)  # lays the weights out
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.5)
        assert model.generate(prompts, 8, temperature=0).tokens == model.generate(prompts, 8, temperature=0,
                                                                                  use_cache=False).tokens
    with torch.no_grad():  # a write that the version counter does not see (FSDP's all-gather writes so, too)
        model.transformer.h[0].mlp.c_fc.weight.data.mul_(-1.0)
    assert model.generate(PROMPTS, 8, temperature=0).tokens == model.generate(PROMPTS, 8, temperature=0,
                                                                               use_cache=False).tokens
    model = model.double().float()  # new tensors
    assert model.generate(PROMPTS, 8, temperature=0).tokens == model.generate(PROMPTS, 8, temperature=0,
                                                                               use_cache=False).tokens
    decode.release_layouts(model)


def test_draw_samples_the_distribution():
    """generate's CPU sampler (inverse CDF, one uniform per row): frequencies within 5 sigma of the
    probabilities, never an index of probability 0, unnormalised rows as their normalised selves, the same
    draws from the same seed, the input untouched; a row that is no distribution is refused."""
    from fastllm.model.generate import draw

    rows = 40000
    probs = torch.tensor([[0.5, 0.2, 0.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    batch = probs.repeat(rows // 2, 1)  # rows alternate between the two distributions
    original = batch.clone()
    tokens = draw(batch, torch.Generator().manual_seed(0))
    assert torch.equal(batch, original) and tokens.dtype == torch.int64 and tokens.shape == (rows,)
    assert torch.all(tokens[1::2] == 4)
    counts = torch.bincount(tokens[0::2], minlength=5).double()
    expected = probs[0] * rows / 2
    assert counts[2] == 0 and counts[4] == 0
    assert torch.all((counts - expected).abs() <= 5 * (expected * (1 - probs[0])).sqrt() + 1e-9), counts
    again = draw((batch * 3).float(), torch.Generator().manual_seed(0))
    assert (again != tokens).float().mean() < 1e-3  # the same uniforms: only float32 rounding moves a boundary
    assert torch.equal(draw(batch, torch.Generator().manual_seed(0)), tokens)
    for bad in (torch.tensor([[0.5, float("nan")]]), torch.tensor([[0.5, -0.1, 0.6]]), torch.zeros(1, 3),
                torch.tensor([[float("inf"), 1.0]])):
        with pytest.raises(ValueError, match="probs must be finite and non-negative with a positive sum"):
            draw(bad)


def test_sampling_is_reproducible_with_a_seed():
    model = _model("llama")

    def draw(seed):
        out = model.generate(PROMPTS, 10, temperature=0.9, top_p=0.95, return_logprobs=True,
                             generator=torch.Generator().manual_seed(seed))
        return out.tokens, out.logprobs

    (tokens, logprobs), (again, logprobs_again) = draw(5), draw(5)
    assert tokens == again and all(torch.equal(a, b) for a, b in zip(logprobs, logprobs_again))
    assert draw(6)[0] != tokens


def test_max_new_tokens_and_finished_rows():
    """A row that stops keeps exactly its tokens up to the stop while the others run to max_new_tokens; with no
    stop every row gets exactly max_new_tokens, one new token included."""
    model = _model("gpt2")
    assert [len(t) for t in model.generate(PROMPTS, 1, temperature=0).tokens] == [1] * len(PROMPTS)
    free = model.generate(PROMPTS, 10, temperature=0).tokens
    stop = free[2][0]  # row 2 stops at once
    out = model.generate(PROMPTS, 10, temperature=0, stop_tokens=stop)
    for tokens, full, stopped in zip(out.tokens, free, out.stopped):
        assert stopped == (stop in full) and tokens == (full[:full.index(stop) + 1] if stopped else full)
    assert out.tokens[2] == [stop] and out.stopped[2]


# ---------------------------------------------------------------------------------------------------------
# Weights on disk
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
def test_save_load_round_trip_is_exact(style, tmp_path):
    model = _model(style)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temporary files left
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert list(state) == list(loaded_state)
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    idx = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(loaded.eval()(idx)[0], model(idx)[0])
    assert GPT.from_pretrained(tmp_path, use_kernels=False).config.use_kernels is False
    model.save_pretrained(tmp_path)  # overwriting in place works too
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_tied_head_is_one_tensor():
    model = _model("gpt2")
    assert model.lm_head_weight is model.transformer.wte.weight and "lm_head.weight" not in model.state_dict()
    untied = _model("gpt2", tie_embeddings=False)
    assert untied.lm_head_weight is untied.lm_head.weight


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)
    model = _model("gpt2")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        GPT.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**model.config.to_dict(), "n_layer": 3}))
    with pytest.raises(ValueError, match=r"missing \['transformer.h.2"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPT.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face import
# ---------------------------------------------------------------------------------------------------------
def _hf_models():
    import transformers  # a test dependency (pyproject's `test` extra); imported here, as it takes seconds

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=40, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=40, rope_theta=500.0, rms_norm_eps=1e-5, bos_token_id=None,
        eos_token_id=None, pad_token_id=None))
    return {"gpt2": gpt2, "llama": llama}


@pytest.mark.parametrize("style", STYLES)
def test_import_from_hugging_face_matches_transformers(style, tmp_path):
    """A random transformers model saved locally loads with from_hf and gives transformers' logits: the error
    against transformers in float64 is at most 2x transformers' own fp32 error."""
    torch.manual_seed(2)
    hf = _randomize(_hf_models()[style]).eval()
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path).eval()
    assert model.config.n_kv_head == (2 if style == "llama" else None)
    idx = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        base = hf(idx).logits
        expected = hf.double()(idx).logits
    assert_matches_reference("logits vs transformers", model(idx)[0], expected, base)
    # The same weights on plain PyTorch, and the same greedy continuation as transformers' generate.
    assert_matches_reference("plain logits vs transformers", from_hf(tmp_path, use_kernels=False)(idx)[0], expected,
                             base)
    # A batch of two: the decode step runs the C++ decode kernel, the no-dispatch call path (ops._common.call_op)
    # and the batched sampling, and must still pick transformers' tokens.
    hf_tokens = hf.float().generate(idx, max_new_tokens=8, do_sample=False)[:, 13:].tolist()
    assert model.generate(idx, 8, temperature=0).tokens == hf_tokens
    # One row: the decode step's other weight layout (decode.decode_linear).
    assert model.generate(idx[:1], 8, temperature=0).tokens == hf_tokens[:1]


def test_import_rejects_unsupported_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported Hugging Face model_type 'bert'"):
        from_hf(tmp_path)
    llama = {"model_type": "llama", "vocab_size": 10, "max_position_embeddings": 8, "num_hidden_layers": 1,
             "num_attention_heads": 2, "hidden_size": 8, "intermediate_size": 16,
             "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(ValueError, match="rope scaling 'llama3'"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**llama, "rope_scaling": None}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_hf(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,message", [
    (lambda m: m(torch.zeros(2, 41, dtype=torch.long)), "block_size is 40"),
    (lambda m: m(torch.zeros(2, 5)), "2-D integer tensor"),
    (lambda m: m(torch.zeros(5, dtype=torch.long)), "2-D integer tensor"),
    (lambda m: m(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)), "targets must be"),
    (lambda m: m(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 4])), "from 0 to the number"),
    (lambda m: m(torch.zeros(2, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 5])), "one packed row"),
    (lambda m: m(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 2, 5])), "non-decreasing"),
    (lambda m: m(torch.zeros(2, 5, dtype=torch.long), position_ids=torch.zeros(5, dtype=torch.long)),
     "position_ids must be"),
    (lambda m: m.generate([[1] * 35], 6), "exceeds block_size = 40"),
    (lambda m: m.generate([1, 2, 3], 4), r"prompts\[0\] must be a list"),
    (lambda m: m.generate([[1], []], 4), r"prompts\[1\] is empty"),
    (lambda m: m.generate([], 4), "non-empty list"),
    (lambda m: m.generate([[1, VOCAB]], 4), r"prompts\[0\]\[1\] = 61 is not a token id"),
    (lambda m: m.generate([[1]], 0), "max_new_tokens"),
    (lambda m: m.generate([[1]], 4, temperature=-1), "temperature"),
    (lambda m: m.generate([[1]], 4, top_k=0), "top_k"),
    (lambda m: m.generate([[1]], 4, top_p=0.0), "top_p"),
    (lambda m: m.generate([[1]], 4, top_p=1.5), r"top_p must be None or a number in \(0, 1\], got 1.5"),
    (lambda m: m.generate([[1]], 4, temperature=float("nan")), "temperature must be a finite number >= 0"),
    (lambda m: m.generate([[1]], 4, temperature=float("inf")), "temperature"),
    (lambda m: m.generate([[1]], 4, stop_tokens=[VOCAB]), "stop token 61"),
    (lambda m: m.generate([[1]], 4, stop_tokens="x"), "stop token 'x'"),
    (lambda m: m.hidden_states(torch.zeros(3, 1, dtype=torch.long), cache=KVCache(2, 2, 8)), "cache holds 2"),
    (lambda m: KVCache(2, 0, 8), "batch_size"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_raise_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(_model("gpt2"))
