"""Import GPT-2 and Llama weights from a local Hugging Face checkpoint folder (config.json + safetensors).

No transformers import: the folder's config.json is read as JSON and its tensors are renamed into GPT's
state_dict. The mapping, per architecture (i: layer; ours on the left):

GPT-2 (HF keys with or without the "transformer." prefix; Conv1D stores weights as (in, out): transposed)
    transformer.wte / wpe / ln_f           <- wte / wpe / ln_f
    h.i.ln_1, h.i.ln_2                     <- h.i.ln_1, h.i.ln_2
    h.i.attn.c_attn, h.i.attn.c_proj       <- h.i.attn.c_attn.T, h.i.attn.c_proj.T
    h.i.mlp.c_fc, h.i.mlp.c_proj           <- h.i.mlp.c_fc.T, h.i.mlp.c_proj.T
Llama (and models with its layout)
    transformer.wte, ln_f, lm_head         <- model.embed_tokens, model.norm, lm_head
    h.i.ln_1, h.i.ln_2                     <- model.layers.i.input_layernorm, post_attention_layernorm
    h.i.attn.c_attn                        <- cat(q_proj, k_proj, v_proj)     (one matmul for q, k and v)
    h.i.attn.c_proj                        <- o_proj
    h.i.mlp.c_fc                           <- cat(gate_proj, up_proj)         (one matmul for both halves)
    h.i.mlp.c_proj                         <- down_proj
HF's rotary embedding rotates (x[i], x[i + hd/2]) pairs, as fastllm's does, so q and k need no permutation.
"""
import json
import os

import torch

from .config import GPTConfig
from .gpt import GPT, read_safetensors

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def from_hf(path, *, use_kernels=True, device=None, dtype=None) -> GPT:
    """A GPT with the weights of the Hugging Face GPT-2 or Llama checkpoint in folder `path`."""
    hf_config = read_hf_config(path)
    config = config_from_hf(hf_config, use_kernels=use_kernels)
    tensors = _read_hf_tensors(path)
    model = GPT(config)
    if hf_config["model_type"] == "gpt2":
        state, used = _gpt2_state(tensors, config)
    else:
        state, used = _llama_state(tensors, config)
    leftover = sorted(k for k in set(tensors) - used if not _ignorable(k))
    if leftover:
        raise ValueError(f"{path}: tensors with no place in the model: {leftover[:8]}"
                         f"{' ...' if len(leftover) > 8 else ''}")
    model.load_checked(state, source=path)
    return model.to(device=device, dtype=dtype)


def read_hf_config(path) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: not a Hugging Face checkpoint folder")
    try:
        with open(config_path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc


def config_from_hf(hf: dict, *, use_kernels=True) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 or Llama config.json (as a dict); ValueError for what GPT lacks."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        activation = hf.get("activation_function", "gelu_new")
        if activation not in _GELU:
            raise ValueError(f"GPT-2 activation_function {activation!r} is not supported; expected one of "
                             f"{sorted(_GELU)}")
        if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
            raise ValueError("GPT-2 checkpoints with scale_attn_by_inverse_layer_idx=True or scale_attn_weights="
                             "False are not supported (fastllm scales attention by 1/sqrt(head_dim))")
        return GPTConfig.gpt2_style(
            vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
            n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"), gelu_approximate=_GELU[activation],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
            use_kernels=use_kernels)
    if model_type == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama hidden_act {hf['hidden_act']!r} is not supported; expected 'silu'")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"Llama rope scaling {rope_type!r} is not supported (only plain rotary embeddings)")
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if attention_bias != mlp_bias:
            raise ValueError(f"Llama checkpoints with attention_bias={attention_bias} but mlp_bias={mlp_bias} are not "
                             f"supported (fastllm's bias option covers every linear layer)")
        return GPTConfig.llama_style(
            vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads"), n_embd=hf["hidden_size"],
            head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta), bias=bool(attention_bias),
            tie_embeddings=hf.get("tie_word_embeddings", False), use_kernels=use_kernels)
    raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; expected 'gpt2' or 'llama'")


def _read_hf_tensors(path) -> dict:
    """Every tensor of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors(os.path.join(path, shard)))
        return tensors
    raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json (only "
                            f"safetensors checkpoints are read, never pickles)")


def _ignorable(name):
    """Buffers some checkpoints carry that are not weights: GPT-2's causal masks, rotary frequencies."""
    parts = name.split(".")
    return name.endswith("rotary_emb.inv_freq") or (len(parts) >= 2 and parts[-2] == "attn" and
                                                     parts[-1] in ("bias", "masked_bias"))


class _Reader:
    """Takes tensors by name from a checkpoint, remembering which were used."""

    def __init__(self, tensors, prefix=""):
        self.tensors, self.prefix, self.used = tensors, prefix, set()

    def __call__(self, name):
        key = self.prefix + name
        if key not in self.tensors:
            raise ValueError(f"the checkpoint has no tensor {key!r}")
        self.used.add(key)
        return self.tensors[key]

    def has(self, name):
        return self.prefix + name in self.tensors


def _gpt2_state(tensors, config):
    prefix = "transformer." if "transformer.wte.weight" in tensors else ""
    take = _Reader(tensors, prefix)
    state = {"transformer.wte.weight": take("wte.weight"), "transformer.wpe.weight": take("wpe.weight"),
             "transformer.ln_f.weight": take("ln_f.weight"), "transformer.ln_f.bias": take("ln_f.bias")}
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"h.{i}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            state[ours + name] = take(theirs + name)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            state[ours + name + ".weight"] = take(theirs + name + ".weight").t().contiguous()  # Conv1D: (in, out)
            state[ours + name + ".bias"] = take(theirs + name + ".bias")
    used = take.used
    if "lm_head.weight" in tensors:  # a tied head saved anyway must be the embedding
        if config.tie_embeddings and not torch.equal(tensors["lm_head.weight"], state["transformer.wte.weight"]):
            raise ValueError("tie_word_embeddings is set but lm_head.weight differs from the token embedding")
        if not config.tie_embeddings:
            state["lm_head.weight"] = tensors["lm_head.weight"]
        used = used | {"lm_head.weight"}
    return state, used


def _llama_state(tensors, config):
    take = _Reader(tensors)
    state = {"transformer.wte.weight": take("model.embed_tokens.weight"),
             "transformer.ln_f.weight": take("model.norm.weight")}
    if not config.tie_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    elif take.has("lm_head.weight"):
        take("lm_head.weight")  # a tied head saved anyway: the same tensor as the embedding
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        state[ours + "ln_1.weight"] = take(theirs + "input_layernorm.weight")
        state[ours + "ln_2.weight"] = take(theirs + "post_attention_layernorm.weight")
        kinds = ("weight", "bias") if config.bias else ("weight",)
        for kind in kinds:
            attn, mlp = theirs + "self_attn.", theirs + "mlp."
            state[ours + f"attn.c_attn.{kind}"] = torch.cat([take(attn + f"{p}_proj.{kind}") for p in "qkv"])
            state[ours + f"attn.c_proj.{kind}"] = take(attn + f"o_proj.{kind}")
            state[ours + f"mlp.c_fc.{kind}"] = torch.cat([take(mlp + f"gate_proj.{kind}"),
                                                          take(mlp + f"up_proj.{kind}")])
            state[ours + f"mlp.c_proj.{kind}"] = take(mlp + f"down_proj.{kind}")
    return state, take.used
