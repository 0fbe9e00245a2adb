"""Tiny randomly initialised Hugging Face causal LMs built from configs (no downloads), shared by the transformers
integration tests: patched, unpatched and float64 copies of one model."""
import copy

import torch
import transformers

from fastllm.integrations import transformers as fastllm_hf

VOCAB = 101
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                            eos_token_id=0),
    "llama": lambda: transformers.LlamaConfig(**_SMALL),
    "mistral": lambda: transformers.MistralConfig(**_SMALL, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**_SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**_SMALL, head_dim=8),
}
ARCHITECTURES = list(CONFIGS)


def tiny_model(arch, **config_overrides):
    config = CONFIGS[arch]()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # norms away from their initial 1 / 0, so a dropped weight would show
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if name.endswith("bias") else 1.0))
    return model


def triple(arch):
    """(patched fp32, unpatched fp32, unpatched float64) copies of one random model."""
    model = tiny_model(arch)
    reference = copy.deepcopy(model).double()
    baseline = copy.deepcopy(model)
    return fastllm_hf.apply(model), baseline, reference
