"""Padded and packed batches run on fastllm's attention (attention_varlen), in training and in generate(), with
the unpatched model's outputs, gradients and tokens. Every comparison is against a float64 copy of the unpatched
model, with the unpatched fp32 model's error as the yardstick; the no_fallback fixture fails any call that would
go to transformers' sdpa instead.

The padded positions themselves match too: sdpa gives a left-padded query (which sees no key) 0, as fastllm's ops
do, and a right-padded query every valid key of its row, which fastllm computes the same way."""
import pytest
import torch
import transformers
from hf_tiny import VOCAB, triple
from numerics import assert_matches_reference

from fastllm.integrations import transformers as fastllm_hf

ARCHS = ["llama", "qwen2", "gpt2"]
BATCH, SEQLEN = 3, 11


def _padded_batch(side):
    """input_ids, attention_mask and labels of a batch with rows of 11, 7 and 4 tokens padded on `side`."""
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQLEN))
    mask = torch.zeros(BATCH, SEQLEN, dtype=torch.long)
    for row, length in enumerate((SEQLEN, 7, 4)):
        if side == "left":
            mask[row, SEQLEN - length:] = 1
        else:
            mask[row, :length] = 1
    input_ids = input_ids.masked_fill(mask == 0, 0)
    return input_ids, mask, input_ids.masked_fill(mask == 0, -100)


def _forward_backward(models, **batch):
    """Each model's logits (eval, no grad) and its training loss and parameter gradients on `batch`."""
    results = []
    labels = batch.pop("labels")
    for model in models:
        model.eval()
        with torch.no_grad():
            logits = model(**batch).logits
        model.train()
        model.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        results.append((logits, loss, {name: p.grad for name, p in model.named_parameters()}))
    return results


def _assert_all_match(arch, results):
    (logits, loss, grads), (base_logits, base_loss, base_grads), (ref_logits, ref_loss, ref_grads) = results
    assert_matches_reference(f"{arch} logits", logits, ref_logits, base_logits)
    assert_matches_reference(f"{arch} loss", loss, ref_loss, base_loss)
    for name in ref_grads:
        assert_matches_reference(f"{arch} grad {name}", grads[name], ref_grads[name], base_grads[name])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_training_matches_unpatched(arch, side, no_fallback):
    input_ids, mask, labels = _padded_batch(side)
    _assert_all_match(arch, _forward_backward(triple(arch), input_ids=input_ids, attention_mask=mask, labels=labels))


def _packed_batch():
    """Three sequences of 5, 4 and 2 tokens packed into one row, as DataCollatorWithFlattening packs them (with
    position_ids and flash attention's cu_seq_lens / max_length keyword arguments)."""
    features = [{"input_ids": torch.randint(1, VOCAB, (n,)).tolist()} for n in (5, 4, 2)]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")
    return collator(features)


@pytest.mark.parametrize("kwargs", ["position_ids", "flash_kwargs"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_training_matches_unpatched(arch, kwargs, no_fallback):
    batch = dict(_packed_batch())
    if kwargs == "position_ids":
        batch = {key: batch[key] for key in ("input_ids", "position_ids", "labels")}
    # Without a cache, for the unpatched model's sake: with one, transformers looks for packing no more and sdpa
    # attends across the sequences (test_packed_position_ids_are_honoured_with_a_cache).
    models = triple(arch)
    results = _forward_backward(models, **batch, use_cache=False)
    _assert_all_match(arch, results)
    # and each sequence alone gives the same logits: nothing leaks across the packed boundaries
    bounds = [0, 5, 9, 11]
    for start, end in zip(bounds, bounds[1:]):
        with torch.no_grad():
            alone = [m.eval()(input_ids=batch["input_ids"][:, start:end]).logits for m in (models[2], models[1])]
        assert_matches_reference(f"{arch} sequence {start}", results[0][0][:, start:end], *alone)


def test_packed_position_ids_are_honoured_with_a_cache(no_fallback):
    """With use_cache left on (a DynamicCache, empty, even in training) transformers looks for packing no more and
    sdpa attends across the sequences; fastllm finds them from position_ids as flash attention does, so it gives
    what the unpatched model gives with use_cache=False."""
    patched, baseline, reference = triple("llama")
    batch = _packed_batch()
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    with torch.no_grad():
        logits = patched.eval()(**inputs).logits
        expected = [m.eval()(**inputs, use_cache=False).logits for m in (reference, baseline)]
    assert_matches_reference("packed logits with a cache", logits, *expected)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_generate_gives_the_same_tokens(arch, side, no_fallback):
    """Greedy decoding from a padded batch: prefill and every decode step with per-row lengths."""
    patched, baseline, _ = triple(arch)
    input_ids, mask, _ = _padded_batch(side)
    tokens = [m.eval().generate(input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
              for m in (patched, baseline)]
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("arch", [*ARCHS, "qwen3"])
def test_padded_batch_under_bf16_autocast(arch, no_fallback):
    """The GRPO case: under bf16 autocast RoPE hands q, k over in fp32 and v in bf16; fastllm casts them as sdpa
    does, so the padded logits match the unpatched model's under autocast (qwen3: its q/k norms see bf16)."""
    patched, baseline, reference = triple(arch)
    input_ids, mask, _ = _padded_batch("left")
    logits = []
    for model in (patched, baseline, reference):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=model is not reference):
            logits.append(model.eval()(input_ids=input_ids, attention_mask=mask).logits)
    assert logits[0].dtype == logits[1].dtype == torch.bfloat16
    assert_matches_reference("autocast logits", logits[0], logits[2], logits[1])


def test_static_cache_generate_gives_the_same_tokens(no_fallback):
    """A static cache hands attention every cache slot, the unfilled ones included, with a shorter 2-D mask."""
    patched, baseline, _ = triple("llama")
    input_ids, mask, _ = _padded_batch("left")
    tokens = [m.eval().generate(input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                cache_implementation="static") for m in (patched, baseline)]
    assert torch.equal(tokens[0], tokens[1])


def test_what_fastllm_cannot_express_falls_back_once_naming_it():
    """Padding on bidirectional attention is not causal varlen: sdpa runs it, with one warning naming it."""
    patched, baseline, _ = triple("llama")
    input_ids, mask, _ = _padded_batch("right")
    for model in (patched, baseline):
        for layer in model.model.layers:
            layer.self_attn.is_causal = False
    fastllm_hf._warned.clear()
    with pytest.warns(UserWarning, match="bidirectional") as caught:
        with torch.no_grad():
            out = patched.eval()(input_ids=input_ids, attention_mask=mask).logits
    assert len([w for w in caught if "fastllm attention" in str(w.message)]) == 1  # once, not once per layer
    with torch.no_grad():
        expected = baseline.eval()(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(out, expected)
