"""fastllm in Hugging Face transformers models: one call swaps in fastllm's norms, attention and fused loss.

    from fastllm.integrations import transformers as fastllm_hf

    model = AutoModelForCausalLM.from_pretrained(path)
    model = fastllm_hf.apply(model)                    # the same object, patched in place
    fastllm_hf.llama(model, attention=False)           # per architecture: a ValueError for any other

    with fastllm_hf.patch_classes("llama"):            # or before loading: every model built inside is patched
        model = LlamaForCausalLM.from_pretrained(path)

Three parts, each optional:
  norm       every RMSNorm/LayerNorm module becomes fastllm.nn.RMSNorm/LayerNorm holding the SAME Parameter
             objects: state_dict keys, weight tying and optimizer references are unchanged.
  attention  "fastllm" is registered in transformers' AttentionInterface (and its mask interface) and set as the
             model's attn_implementation. Dense batches run fastllm.ops.attention; padded ones (left or right, in
             training, prefill and decoding with a cache) and packed ones (position_ids restarting, or flash
             attention's cu_seq_lens_q/k kwargs) run fastllm.ops.attention_varlen on the unpadded tokens. What
             fastllm cannot express (a custom 4-D mask, attention dropout, softcapping, sinks) goes to
             transformers' sdpa, with one warning naming the reason.
  loss       in training (labels given, model.training, grad enabled) the forward computes the causal-LM loss as
             fastllm.ops.linear_cross_entropy of the final hidden states and the LM head: the (tokens, vocab)
             logits are never materialised, and the output's logits are None. Labels are shifted as
             transformers' ForCausalLMLoss does (ignore_index -100, shift_labels, num_items_in_batch: a sum over
             that count). Without labels, in eval, or with a custom loss_function, the original forward runs.

The model stays a plain transformers model: save_pretrained, from_pretrained, generate and Trainer work as
before. What each architecture needs is one row of ARCHITECTURES; nothing is changed until every requested part
has been checked, so a failure leaves the model as it was.
"""
import dataclasses
import functools
import importlib
import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, modeling_outputs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.masking_utils import (AttentionMaskInterface, causal_mask_function, find_packed_sequence_indices,
                                       flash_attention_mask, sdpa_mask)
from transformers.modeling_utils import AttentionInterface, slice_logits_to_keep

from .. import nn as fastllm_nn
from .. import ops
from ..ops.attention import MAX_HEAD_DIM

ATTENTION = "fastllm"  # the name registered in transformers' attention and mask interfaces
PARTS = ("norm", "attention", "loss")


# ---------------------------------------------------------------------------------------------------------
# The registry: one row per architecture
# ---------------------------------------------------------------------------------------------------------
def _rms_norm(old):
    """transformers' <Arch>RMSNorm (weight, variance_epsilon) -> fastllm.nn.RMSNorm with the same Parameter."""
    new = fastllm_nn.RMSNorm(old.weight.shape[0], eps=old.variance_epsilon, device="meta")
    new.weight = old.weight
    return new


def _layer_norm(old):
    """torch.nn.LayerNorm -> fastllm.nn.LayerNorm with the same Parameters."""
    new = fastllm_nn.LayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                               bias=old.bias is not None, device="meta")
    new.weight, new.bias = old.weight, old.bias
    return new


NORM_SWAPS = {"rms": _rms_norm, "layer": _layer_norm}  # how to swap: norm kind -> old module -> new module


@dataclass(frozen=True)
class Architecture:
    """What fastllm patches in one transformers architecture (keyed in ARCHITECTURES by config.model_type).

    causal_lm: "module:Class" of the *ForCausalLM class (patch_classes wraps its __init__; loss needs it).
    norms: ("module:Class", kind) of every norm module class to swap, kind a key of NORM_SWAPS; matched by
        exact type, so fastllm's own subclasses are never swapped twice.
    head: the attribute holding the LM head (an nn.Linear whose weight the fused loss reads).
    output: the transformers.modeling_outputs class the original forward returns.
    loss: the LOSS_MAPPING entry the fused loss replaces; a model with any other loss_function is left to it.
    """
    causal_lm: str
    norms: tuple
    output: str = "CausalLMOutputWithPast"
    head: str = "lm_head"
    loss: str = "ForCausalLM"


def _rms_architecture(name, prefix):
    module = f"transformers.models.{name}.modeling_{name}"
    return Architecture(causal_lm=f"{module}:{prefix}ForCausalLM", norms=((f"{module}:{prefix}RMSNorm", "rms"),))


ARCHITECTURES = {
    "gpt2": Architecture(causal_lm="transformers.models.gpt2.modeling_gpt2:GPT2LMHeadModel",
                         norms=(("torch.nn:LayerNorm", "layer"),), output="CausalLMOutputWithCrossAttentions"),
    "llama": _rms_architecture("llama", "Llama"),
    "mistral": _rms_architecture("mistral", "Mistral"),
    "qwen2": _rms_architecture("qwen2", "Qwen2"),
    "qwen3": _rms_architecture("qwen3", "Qwen3"),  # q_norm and k_norm are Qwen3RMSNorm too
}


def _resolve(qualified):
    module, name = qualified.split(":")
    return getattr(importlib.import_module(module), name)


def _supported():
    return ", ".join(ARCHITECTURES)


def _check_parts(parts):
    for name, value in parts.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")


def _architecture_of(model, expected=None):
    """The registry key of `model` (its config.model_type), or a ValueError saying what is supported."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"fastllm does not support {type(model).__name__} (model_type {model_type!r}); supported "
                         f"model types: {_supported()}")
    if expected is not None and model_type != expected:
        raise ValueError(f"fastllm.integrations.transformers.{expected} expects a {expected} model, got "
                         f"{type(model).__name__} (model_type {model_type!r}); use apply() to dispatch on the type")
    return model_type


# ---------------------------------------------------------------------------------------------------------
# Attention: a function in transformers' AttentionInterface, and the mask function it reads
# ---------------------------------------------------------------------------------------------------------
_warned = set()


def _warn_once(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastllm attention: {reason}; using transformers' sdpa for these calls", stacklevel=3)


def make_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                        attention_mask=None, **kwargs):
    """The mask transformers hands to attention_forward. For plain causal attention it is what flash attention
    gets: the 2-D padding mask (batch, seen tokens), or None without padding, never a (tokens x tokens) tensor.
    Any other pattern (packed sequences found from position_ids, sliding windows, custom mask functions) gets
    sdpa's 4-D boolean mask, which attention_forward runs varlen when it is packed causal, else hands to sdpa."""
    if mask_function is causal_mask_function:
        return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                    attention_mask, **kwargs)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs)


def _fallback_reason(query, key, value, dropout, kwargs):
    """Why fastllm's attention ops cannot compute this call exactly, whatever its mask, or None."""
    if dropout:
        return f"attention dropout {dropout}"
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            return f"{name} is not supported"
    if kwargs.get("output_attentions"):
        return "output_attentions=True (fused attention never forms the weights)"
    if key.shape[-1] != value.shape[-1] or not 1 <= query.shape[-1] <= MAX_HEAD_DIM:
        return f"head dims q {query.shape[-1]}, k {key.shape[-1]}, v {value.shape[-1]}"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {query.dtype}"
    return None


def _offsets(lengths):
    """(batch,) sequence lengths -> int32 (batch + 1,) offsets from 0, and the longest length as an int."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), int(lengths.max()) if lengths.numel() else 0


_mask_cache = {}  # kind -> (weakref to a mask, its version, key, what was derived from it)


def _per_mask(kind, mask, key, derive):
    """derive() once per mask object: every layer of a forward gets the same one, so the host syncs that read
    the mask happen once per forward, not once per layer."""
    entry = _mask_cache.get(kind)
    if entry is not None and entry[0]() is mask and entry[1] == mask._version and entry[2] == key:
        return entry[3]
    value = derive()
    _mask_cache[kind] = (weakref.ref(mask), mask._version, key, value)
    return value


class _PaddingPlan(NamedTuple):
    """How a padded batch runs unpadded: the flat indices of its valid keys and their offsets, and per group of
    queries (valid ones causal, right-padded ones seeing every valid key) their flat indices and offsets."""
    keys: torch.Tensor
    cu_k: torch.Tensor
    max_k: int
    queries: tuple  # of (flat indices, cu_q, max_q, causal)


def _padding_plan(padding, seqlen_q):
    """The _PaddingPlan of a (B, L) padding mask whose last seqlen_q tokens are the queries; None without
    padding; a string saying why when a padded query sits between valid tokens (sdpa gives it a prefix)."""
    if bool(padding.all()):
        return None
    seen = padding.shape[1]
    key_counts = padding.sum(1)
    query_valid = padding[:, seen - seqlen_q:]
    keys_before = padding.cumsum(1)[:, seen - seqlen_q:]  # valid keys at or before each query
    sees_all = ~query_valid & (keys_before == key_counts[:, None]) & (keys_before > 0)
    if bool((~query_valid & (keys_before > 0) & ~sees_all).any()):
        return "a padding mask with padded queries between valid tokens"
    groups = []
    for queries, causal in ((query_valid, True), (sees_all, False)):
        if bool(queries.any()):
            groups.append((queries.flatten().nonzero()[:, 0], *_offsets(queries.sum(1)), causal))
    return _PaddingPlan(padding.flatten().nonzero()[:, 0], *_offsets(key_counts), tuple(groups))


def _padded(q, k, v, padding, causal, scale):
    """Attention over a padded batch, unpadded: q (B, Q, Hq, D), k, v (B, K, Hkv, D); padding (B, L) bool over
    the L <= K tokens seen so far (keys past L are unfilled static-cache slots), the queries being the last Q
    of them. A valid query sees the valid keys up to itself; a padded one what sdpa gives it: nothing (before
    every valid key: left padding, output 0) or every valid key (after them all: right padding). Returns
    (out, None), or (None, why not) for what sdpa must do."""
    batch, seqlen_q = q.shape[:2]
    seen = padding.shape[1]
    k, v = k[:, :seen], v[:, :seen]
    plan = _per_mask("padding", padding, seqlen_q, lambda: _padding_plan(padding, seqlen_q))
    if plan is None:
        return ops.attention(q, k, v, causal=causal and seqlen_q > 1, softmax_scale=scale), None
    if not causal:
        return None, "a padding mask on bidirectional attention"
    if isinstance(plan, str):
        return None, plan
    keys, values = (t.flatten(0, 1).index_select(0, plan.keys) for t in (k, v))
    flat_q = q.flatten(0, 1)
    out = None
    for rows, cu_q, max_q, group_causal in plan.queries:
        part = ops.attention_varlen(flat_q.index_select(0, rows), keys, values, cu_q, plan.cu_k, max_q, plan.max_k,
                                    causal=group_causal, softmax_scale=scale)
        out = (part.new_zeros((batch * seqlen_q, *part.shape[1:])) if out is None else out).index_copy(0, rows, part)
    return out.view(batch, seqlen_q, *out.shape[1:]), None


class _Packing(NamedTuple):
    """Packed sequences over the batch's flattened tokens: where each starts, (batch * seqlen,) bool, and the
    offsets and longest length attention_varlen takes."""
    starts: torch.Tensor
    cu: torch.Tensor
    longest: int


def _packing(kwargs, batch, seqlen):
    """The _Packing that flash attention's cu_seq_lens_q kwarg gives, or position_ids that do not count up by one
    (transformers' own rule); None if the batch is not packed. Once per forward."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if kwargs.get("cu_seq_lens_k") is not None and not torch.equal(kwargs["cu_seq_lens_k"], cu):
            return None

        def from_offsets():
            starts = torch.zeros(batch * seqlen, dtype=torch.bool, device=cu.device)
            starts[cu[:-1].long()] = True
            return _Packing(starts, *_offsets(cu.diff()))
        return _per_mask("cu_seq_lens", cu, (batch, seqlen), from_offsets)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None

    def from_positions():
        sequence = find_packed_sequence_indices(position_ids.expand(batch, -1))
        if sequence is None:
            return None
        starts = F.pad(torch.diff(sequence, dim=-1) != 0, (1, 0), value=True).reshape(-1)
        bounds = F.pad(starts.nonzero()[:, 0], (0, 1), value=batch * seqlen)
        return _Packing(starts, *_offsets(bounds.diff()))
    return _per_mask("position_ids", position_ids, (batch, seqlen), from_positions)


def _is_packed_causal(mask, packing, batch, seqlen):
    """Whether a 4-D boolean mask is exactly causal attention within the packed sequences (once per forward)."""
    def compare():
        if mask.dtype != torch.bool or mask.shape != (batch, 1, seqlen, seqlen):
            return False
        sequence = packing.starts.view(batch, seqlen).cumsum(-1)
        position = torch.arange(seqlen, device=mask.device)
        expected = (sequence[:, :, None] == sequence[:, None, :]) & (position[None, :] <= position[:, None])
        return torch.equal(mask[:, 0], expected)

    return _per_mask("packed", mask, None, compare)


def _fastllm_attention(q, k, v, mask, causal, scale, kwargs):
    """(out, None) on fastllm's (batch, tokens, heads, head_dim) layout, or (None, why not) for what fastllm cannot
    express. mask: None, flash attention's 2-D padding mask, or sdpa's 4-D boolean mask. causal: the module's."""
    batch, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    if mask is not None and mask.dim() == 2:
        window = kwargs.get("sliding_window")
        if window is not None and mask.shape[1] > window:  # transformers gives sliding layers 4-D masks: a guard
            return None, f"a sliding window of {window} over a padded batch"
        return _padded(q, k, v, mask.bool(), causal, scale)
    # Packed sequences, as flash attention finds them: from its cu_seq_lens kwargs, or from position_ids also when
    # transformers did not look (with a cache, even an empty one in training, it builds no packed mask and sdpa
    # attends across the sequences).
    packing = _packing(kwargs, batch, seqlen_q) if seqlen_q == seqlen_k else None
    if mask is not None and (packing is None or not _is_packed_causal(mask, packing, batch, seqlen_q)):
        return None, "an attention mask that is neither padding nor packed sequences (a custom 4-D mask)"
    if packing is not None:
        flat = [t.flatten(0, 1) for t in (q, k, v)]
        out = ops.attention_varlen(*flat, packing.cu, packing.cu, packing.longest, packing.longest, causal=causal,
                                   softmax_scale=scale)
        return out.view(q.shape), None
    causal = causal and seqlen_q > 1
    if causal and seqlen_k > seqlen_q:
        # The mask is skipped this way only at prefill into an empty static cache, where transformers relies on
        # sdpa's top-left causal alignment: the keys past the queries are unfilled cache slots. (A single query,
        # decoding, sees every key either way; fastllm aligns queries to the end of the keys.)
        k, v = k[:, :seqlen_q], v[:, :seqlen_q]
    return ops.attention(q, k, v, causal=causal, softmax_scale=scale), None


def _sdpa_mask_for(mask, query, key):
    """sdpa's 4-D boolean mask for a 2-D padding mask made by make_attention_mask (sdpa reads no 2-D masks)."""
    if mask is None or mask.dim() != 2:
        return mask
    seen, seqlen_q = mask.shape[1], query.shape[2]
    return sdpa_mask(query.shape[0], seqlen_q, key.shape[2], q_offset=seen - seqlen_q, attention_mask=mask.bool(),
                     allow_is_causal_skip=False, device=query.device)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' attention-function signature over fastllm's attention ops.

    query: (batch, heads_q, seqlen_q, head_dim); key, value: (batch, heads_kv, seqlen_k, head_dim), heads_q a
    multiple of heads_kv; attention_mask as make_attention_mask() makes it. Dense batches run ops.attention, padded
    ones (training, prefill, decoding with per-row lengths) and packed ones ops.attention_varlen. Returns
    ((batch, seqlen_q, heads_q, head_dim), None): no attention weights.
    """
    reason = _fallback_reason(query, key, value, dropout, kwargs)
    if reason is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out, reason = _fastllm_attention(q, k, v, attention_mask, causal, scaling, kwargs)
        if out is not None:
            return out, None
    _warn_once(reason)
    return sdpa_attention_forward(module, query, key, value, _sdpa_mask_for(attention_mask, query, key),
                                  dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)


def register_attention():
    """Register "fastllm" in transformers' attention interface, and make_attention_mask() in its mask interface.
    Idempotent; apply() and patch_classes() call it."""
    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, make_attention_mask)


# ---------------------------------------------------------------------------------------------------------
# Loss: the causal-LM forward with the fused linear cross-entropy
# ---------------------------------------------------------------------------------------------------------
def causal_lm_loss(hidden, head, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_):
    """transformers' ForCausalLMLoss on logits = head(hidden), without forming them.

    hidden: (batch, seqlen, H); head: nn.Linear(H, V); labels: (batch, seqlen), shifted here so position t
    predicts label t + 1 (or shift_labels, already shifted). Mean over non-ignored tokens, or with
    num_items_in_batch the sum divided by it (gradient accumulation across micro-batches). fp32 scalar.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    weight = head.weight
    hidden = hidden.to(weight.dtype)  # the op takes one dtype; under autocast the head's weight sets it
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = ops.linear_cross_entropy(hidden, weight, shift_labels, head.bias, ignore_index=ignore_index,
                                    reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


_FUSED = "_fastllm_fused_forward"  # marks a forward made by _fused_forward, so nothing is wrapped twice


def _fused_forward(original, architecture):
    """The causal-LM class's `original` forward, with the loss computed by causal_lm_loss in training.

    It keeps the original's signature (functools.wraps): Trainer reads it to pick dataset columns and to decide
    whether the model takes num_items_in_batch.
    """
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    output_class = getattr(modeling_outputs, architecture.output)
    output_fields = {f.name for f in dataclasses.fields(output_class)}
    causal_lm_loss_function = LOSS_MAPPING[architecture.loss]

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        labels = arguments.get("labels")
        if (labels is None or not (self.training and torch.is_grad_enabled())
                or self.loss_function is not causal_lm_loss_function):
            return original(self, *args, **kwargs)
        arguments = dict(arguments)
        del arguments["self"], arguments["labels"]
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        extra = dict(arguments.pop(var_keyword, {})) if var_keyword else {}
        return_dict = extra.pop("return_dict", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        # The same call the original makes to the base model (the loss kwargs ride along, as there).
        outputs = self.base_model(**arguments, **extra, return_dict=True)
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        loss = causal_lm_loss(hidden, getattr(self, architecture.head), labels, **extra)
        kept = {name: value for name, value in outputs.items() if name in output_fields}
        output = output_class(loss=loss, logits=None, **kept)
        return output if return_dict else output.to_tuple()

    setattr(forward, _FUSED, True)
    return forward


# ---------------------------------------------------------------------------------------------------------
# Patching a model
# ---------------------------------------------------------------------------------------------------------
def _plan(model, key, parts):
    """Every change apply() will make, as closures, after checking all of them; raises before any change."""
    architecture = ARCHITECTURES[key]
    changes = []
    if parts["attention"]:
        if not model._can_set_attn_implementation():
            raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' "
                             f"AttentionInterface; pass attention=False")

        def set_attention():
            register_attention()
            model.set_attn_implementation(ATTENTION)
        changes.append(set_attention)
    if parts["norm"]:
        kinds = {_resolve(name): kind for name, kind in architecture.norms}
        found = [(parent, name, child, kinds[type(child)]) for parent in model.modules()
                 for name, child in parent.named_children() if type(child) in kinds]
        already = any(isinstance(m, (fastllm_nn.RMSNorm, fastllm_nn.LayerNorm)) for m in model.modules())
        if not found and not already:
            names = ", ".join(name.split(":")[1] for name, _ in architecture.norms)
            raise ValueError(f"found no {names} module in {type(model).__name__} to swap; pass norm=False")

        def swap_norms():
            for parent, name, old, kind in found:
                new = NORM_SWAPS[kind](old)
                new.train(old.training)
                setattr(parent, name, new)
        changes.append(swap_norms)
    if parts["loss"]:
        causal_lm = _resolve(architecture.causal_lm)
        if not isinstance(model, causal_lm):
            raise ValueError(f"the fused loss patches {causal_lm.__name__}, got {type(model).__name__}; pass "
                             f"loss=False")
        head = getattr(model, architecture.head, None)
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"{type(model).__name__}.{architecture.head} must be an nn.Linear for the fused loss, "
                             f"got {type(head).__name__}")
        if not getattr(model.forward, _FUSED, False):  # not patched already
            fused = _fused_forward(type(model).forward, architecture)
            changes.append(lambda: setattr(model, "forward", fused.__get__(model)))
    return changes


def _apply(model, key, parts):
    for change in _plan(model, key, parts):
        change()
    return model


def apply(model, *, norm=True, attention=True, loss=True):
    """Patch a loaded transformers model in place with fastllm's norms, attention and fused causal-LM loss.

    model: a model of a type in ARCHITECTURES (GPT-2, Llama, Mistral, Qwen2, Qwen3); `loss` needs the causal-LM
    class (e.g. LlamaForCausalLM). Returns the same object. Applying twice changes nothing more. Raises
    ValueError, before changing anything, for an unsupported model or a part that cannot be applied.
    """
    parts = dict(norm=norm, attention=attention, loss=loss)
    _check_parts(parts)
    return _apply(model, _architecture_of(model), parts)


def _architecture_function(key):
    def patch(model, *, norm=True, attention=True, loss=True):
        parts = dict(norm=norm, attention=attention, loss=loss)
        _check_parts(parts)
        return _apply(model, _architecture_of(model, expected=key), parts)

    patch.__name__ = patch.__qualname__ = key
    patch.__doc__ = (f"apply() for a {key} model ({ARCHITECTURES[key].causal_lm.split(':')[1]}); a ValueError "
                     f"for any other architecture.")
    return patch


gpt2 = _architecture_function("gpt2")
llama = _architecture_function("llama")
mistral = _architecture_function("mistral")
qwen2 = _architecture_function("qwen2")
qwen3 = _architecture_function("qwen3")


# ---------------------------------------------------------------------------------------------------------
# Patching the classes, before loading
# ---------------------------------------------------------------------------------------------------------
class ClassPatch:
    """The causal-LM classes of some architectures, patched so every instance built is patched by apply() at the
    end of its __init__ (from_pretrained then loads the weights into the swapped modules: the keys are the
    same). A context manager; undo() (or leaving the `with`) restores the classes, and models already built
    stay patched."""

    def __init__(self, keys, parts):
        self.parts = parts
        self._originals = {}
        for key in keys:
            cls = _resolve(ARCHITECTURES[key].causal_lm)
            if cls in self._originals or getattr(cls.__init__, _FUSED, False):
                continue
            self._originals[cls] = cls.__init__
            cls.__init__ = self._patched_init(cls.__init__, key)

    def _patched_init(self, original, key):
        parts = self.parts

        @functools.wraps(original)
        def __init__(model, *args, **kwargs):
            original(model, *args, **kwargs)
            if getattr(model.config, "model_type", None) == key:  # a subclass of another type is not ours
                _apply(model, key, parts)

        setattr(__init__, _FUSED, True)
        return __init__

    def undo(self):
        for cls, init in self._originals.items():
            cls.__init__ = init
        self._originals.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


def patch_classes(*architectures: str, norm: bool = True, attention: bool = True, loss: bool = True,
                  ) -> ClassPatch:
    """Patch the causal-LM classes of `architectures` (keys of ARCHITECTURES; none given: all of them) so models
    built or loaded afterwards come patched. Use as a context manager, or keep the returned ClassPatch and call
    undo(). Unknown names raise ValueError before any class is touched."""
    parts = dict(norm=norm, attention=attention, loss=loss)
    _check_parts(parts)
    unknown = [name for name in architectures if name not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"fastllm does not support {', '.join(map(repr, unknown))}; supported: {_supported()}")
    if parts["attention"]:
        register_attention()  # from_pretrained(attn_implementation="fastllm") needs the name too
    return ClassPatch(architectures or tuple(ARCHITECTURES), parts)
