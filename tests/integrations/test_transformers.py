"""fastllm.integrations.transformers: patched models compute what the unpatched ones compute, and stay ordinary
transformers models (generate, Trainer, save/load). Tiny randomly initialised configs, built here: no downloads.

Every comparison is against a float64 copy of the unpatched model, with the unpatched fp32 model's own error as
the yardstick (numerics.assert_matches_reference).
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from hf_tiny import ARCHITECTURES, CONFIGS, VOCAB
from hf_tiny import tiny_model as _model
from hf_tiny import triple as _triple
from numerics import assert_matches_reference

import fastllm.nn
from fastllm.integrations import transformers as fastllm_hf

BATCH, SEQLEN = 2, 13


def test_registry_covers_the_tested_architectures():
    assert list(fastllm_hf.ARCHITECTURES) == ARCHITECTURES


def _batch():
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQLEN))
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    return input_ids, labels


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_apply_swaps_every_part_in_place(arch):
    model = _model(arch)
    keys = list(model.state_dict())
    params = {name: p for name, p in model.named_parameters()}
    same = fastllm_hf.apply(model)
    assert same is model
    assert model.config._attn_implementation == fastllm_hf.ATTENTION
    norms = [m for m in model.modules() if isinstance(m, (fastllm.nn.RMSNorm, fastllm.nn.LayerNorm))]
    expected = {"gpt2": 2 * 2 + 1, "qwen3": 2 * 4 + 1}.get(arch, 2 * 2 + 1)  # qwen3: q_norm and k_norm too
    assert len(norms) == expected
    assert not [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and "fastllm" not in
                type(m).__module__]
    assert list(model.state_dict()) == keys  # checkpoints load unchanged
    assert all(p is params[name] for name, p in model.named_parameters())  # optimizer references survive
    assert getattr(model.forward, fastllm_hf._FUSED)
    fastllm_hf.apply(model)  # twice: nothing more to do
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_loss_and_gradients_match_unpatched(arch, no_fallback):
    patched, baseline, reference = _triple(arch)
    input_ids, labels = _batch()

    for model in (patched, baseline, reference):
        model.eval()
    with torch.no_grad():
        logits = [m(input_ids=input_ids).logits for m in (patched, baseline, reference)]
    assert_matches_reference(f"{arch} logits", *logits)

    losses, grads = [], []
    for model in (patched, baseline, reference):
        model.train()
        out = model(input_ids=input_ids, labels=labels)
        out.loss.backward()
        losses.append(out.loss)
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert patched(input_ids=input_ids, labels=labels).logits is None  # the fused loss never formed them
    assert_matches_reference(f"{arch} loss", *losses)
    assert grads[0].keys() == grads[2].keys()
    for name in grads[2]:
        assert grads[0][name] is not None, f"{arch}: no gradient for {name}"
        assert_matches_reference(f"{arch} grad {name}", grads[0][name], grads[2][name], grads[1][name])


def test_fused_loss_matches_for_causal_lm_loss_options():
    """num_items_in_batch (gradient accumulation), shift_labels and ignore_index as ForCausalLMLoss has them."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    head = torch.nn.Linear(16, VOCAB, bias=True)
    hidden = torch.randn(BATCH, SEQLEN, 16)
    _, labels = _batch()
    shift = torch.randint(0, VOCAB, (BATCH, SEQLEN))
    shift[1, 3] = -1
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(7)}, {"num_items_in_batch": 7},
                   {"shift_labels": shift, "ignore_index": -1}):
        values = []
        for dtype in (torch.float32, torch.float64):
            values.append(ForCausalLMLoss(torch.nn.functional.linear(hidden.to(dtype), head.weight.to(dtype),
                                                                     head.bias.to(dtype)), labels, VOCAB, **kwargs))
        ours = fastllm_hf.causal_lm_loss(hidden, head, labels, **kwargs)
        assert_matches_reference(f"loss {sorted(kwargs)}", ours, values[1], values[0])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generate_gives_the_same_tokens(arch, no_fallback):
    patched, baseline, _ = _triple(arch)
    prompt = torch.randint(1, VOCAB, (1, 5))
    tokens = [m.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                pad_token_id=0) for m in (patched, baseline)]
    assert torch.equal(tokens[0], tokens[1])


def test_a_custom_4d_mask_falls_back_to_sdpa_with_a_reason():
    """An additive float mask of the user's own is what fastllm cannot express: sdpa runs it, with one warning."""
    patched, baseline, _ = _triple("llama")
    input_ids, _ = _batch()
    bias = torch.zeros(BATCH, 1, SEQLEN, SEQLEN).masked_fill(torch.ones(SEQLEN, SEQLEN).triu(1).bool(), -1e9)
    bias[:, :, :, 2] -= 3.0  # a soft penalty on one key: no boolean pattern
    fastllm_hf._warned.clear()
    with pytest.warns(UserWarning, match="neither padding nor packed sequences"):
        with torch.no_grad():
            out = patched.eval()(input_ids=input_ids, attention_mask=bias).logits
    with torch.no_grad():
        expected = baseline.eval()(input_ids=input_ids, attention_mask=bias).logits
    torch.testing.assert_close(out, expected)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n):
        self.ids = torch.randint(0, VOCAB, (n, SEQLEN))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trainer_steps_match_unpatched(arch, tmp_path, no_fallback):
    """Two optimizer steps of transformers.Trainer, each over two accumulated micro-batches (so the loss goes
    through num_items_in_batch): the parameters end where the unpatched model's do. SGD keeps the update linear
    in the gradient, so the comparison measures the gradients, not Adam's normalisation."""
    patched, baseline, reference = _triple(arch)
    data = _Tokens(8)
    final = []
    for i, model in enumerate((patched, baseline, reference)):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(i)), use_cpu=True, report_to="none",
                                              max_steps=2, per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5,
                                              lr_scheduler_type="constant", save_strategy="no", logging_steps=1,
                                              disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        result = trainer.train()
        assert torch.isfinite(torch.tensor(result.training_loss))
        final.append(dict(model.named_parameters()))
    for name in final[2]:
        assert_matches_reference(f"{arch} trained {name}", final[0][name].detach(), final[2][name].detach(),
                                 final[1][name].detach())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_and_reload(arch, tmp_path):
    patched, _, _ = _triple(arch)
    patched.save_pretrained(tmp_path)
    input_ids, _ = _batch()
    with torch.no_grad():
        expected = patched.eval()(input_ids=input_ids).logits

    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # an ordinary checkpoint
    assert not any(isinstance(m, (fastllm.nn.RMSNorm, fastllm.nn.LayerNorm)) for m in plain.modules())
    for key, value in plain.state_dict().items():
        assert torch.equal(value, patched.state_dict()[key]), key
    reloaded = fastllm_hf.apply(plain)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=input_ids).logits, expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patch_classes_before_loading(arch, tmp_path):
    source = _model(arch)
    source.save_pretrained(tmp_path)
    cls = type(source)
    original_init = cls.__init__
    with fastllm_hf.patch_classes(arch):
        assert cls.__init__ is not original_init
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert cls.__init__ is original_init  # restored on exit
    assert loaded.config._attn_implementation == fastllm_hf.ATTENTION
    assert any(isinstance(m, (fastllm.nn.RMSNorm, fastllm.nn.LayerNorm)) for m in loaded.modules())
    assert getattr(loaded.forward, fastllm_hf._FUSED)
    for key, value in source.state_dict().items():  # the weights were loaded into the swapped modules
        assert torch.equal(loaded.state_dict()[key], value), key
    after = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    assert not any(isinstance(m, (fastllm.nn.RMSNorm, fastllm.nn.LayerNorm)) for m in after.modules())


def test_patch_classes_options_and_undo():
    handle = fastllm_hf.patch_classes("llama", "qwen3", attention=False, loss=False)
    try:
        llama = _model("llama")
        gpt2 = _model("gpt2")
    finally:
        handle.undo()
    assert any(isinstance(m, fastllm.nn.RMSNorm) for m in llama.modules())
    assert llama.config._attn_implementation == "sdpa" and "forward" not in llama.__dict__
    assert not any(isinstance(m, fastllm.nn.LayerNorm) for m in gpt2.modules())  # not asked for


def _snapshot(model):
    return ([type(m) for m in model.modules()], model.config._attn_implementation, "forward" in model.__dict__)


def test_unknown_architecture_raises_and_changes_nothing():
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="supported model types: gpt2, llama, mistral, qwen2, qwen3"):
        fastllm_hf.apply(model)
    assert _snapshot(model) == before
    with pytest.raises(ValueError, match="supported: gpt2, llama"):
        fastllm_hf.patch_classes("llama", "opt")
    assert not getattr(transformers.LlamaForCausalLM.__init__, fastllm_hf._FUSED, False)  # llama untouched too


def test_per_architecture_function_checks_the_architecture():
    model = _model("gpt2")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="llama expects a llama model, got GPT2LMHeadModel"):
        fastllm_hf.llama(model)
    assert _snapshot(model) == before
    assert fastllm_hf.gpt2(model, attention=False) is model
    assert model.config._attn_implementation == "sdpa"


def test_a_part_that_cannot_apply_leaves_the_model_as_it_was():
    base = transformers.LlamaModel(CONFIGS["llama"]())  # no LM head: the loss part cannot apply
    before = _snapshot(base)
    with pytest.raises(ValueError, match="the fused loss patches LlamaForCausalLM, got LlamaModel"):
        fastllm_hf.apply(base)
    assert _snapshot(base) == before  # norms and attention were checked but not swapped
    fastllm_hf.apply(base, loss=False)
    assert base.config._attn_implementation == fastllm_hf.ATTENTION


def test_eval_with_labels_keeps_logits_and_custom_losses_are_respected():
    patched, baseline, _ = _triple("llama")
    input_ids, labels = _batch()
    with torch.no_grad():
        out = patched.eval()(input_ids=input_ids, labels=labels)
    assert out.logits is not None and torch.isfinite(out.loss)
    patched.train()
    patched.loss_function = lambda logits, labels, **kwargs: logits.sum() * 0  # a user's own loss wants logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = patched(input_ids=input_ids, labels=labels)
    assert out.logits is not None and out.loss.item() == 0


def test_checkout_root_does_not_shadow_hf_kernels():
    """`python -m` from a checkout puts its root, and so its kernels/ folder, on sys.path. transformers 5.25+
    imports Hugging Face's `kernels` package by that name (LlamaConfig and every model failed to import); the
    folder hands the top-level name over to the installed package and stays fastllm.kernels for fastllm."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = ("import importlib.metadata, json, kernels, fastllm.kernels, transformers\n"
              "transformers.LlamaConfig()\n"
              "try:\n    importlib.metadata.distribution('kernels'); installed = True\n"
              "except importlib.metadata.PackageNotFoundError:\n    installed = False\n"
              "print(json.dumps([installed, kernels.__file__, fastllm.kernels.__file__]))")
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    installed, top_level, ours = json.loads(result.stdout.strip().splitlines()[-1])
    assert ours == os.path.join(root, "kernels", "__init__.py")
    assert (top_level != ours) == installed  # HF's package where installed, else the folder itself (harmless)
