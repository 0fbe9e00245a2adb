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
  attention  "fastllm" is registered in transformers' AttentionInterface (and its mask interface, with the sdpa
             mask) and set as the model's attn_implementation. It runs fastllm.ops.attention; whatever that op
             cannot express (an explicit mask from padding or packing, attention dropout, softcapping, sinks)
             goes to transformers' sdpa, with one warning naming the reason.
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, modeling_outputs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
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
# Attention: a function in transformers' AttentionInterface
# ---------------------------------------------------------------------------------------------------------
_warned = set()


def _warn_once(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastllm attention: {reason}; using transformers' sdpa for these calls", stacklevel=3)


def _fallback_reason(query, key, value, attention_mask, dropout, kwargs):
    """Why fastllm.ops.attention cannot compute this call exactly, or None."""
    if attention_mask is not None:
        # transformers drops the mask (None) whenever plain causal attention is exact; any mask that arrives
        # carries padding, packed sequences or a sliding window that the keys exceed.
        return "an explicit attention mask (padding, packed sequences or a sliding window)"
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


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' attention-function signature over fastllm.ops.attention.

    query: (batch, heads_q, seqlen_q, head_dim); key, value: (batch, heads_kv, seqlen_k, head_dim), heads_q a
    multiple of heads_kv. Returns ((batch, seqlen_q, heads_q, head_dim), None): no attention weights.
    """
    reason = _fallback_reason(query, key, value, attention_mask, dropout, kwargs)
    if reason is not None:
        _warn_once(reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    causal = seqlen_q > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if causal and seqlen_k > seqlen_q:
        # The mask is skipped this way only at prefill into an empty static cache, where transformers relies on
        # sdpa's top-left causal alignment: the keys past the queries are unfilled cache slots. (A single query,
        # decoding, sees every key either way; fastllm aligns queries to the end of the keys.)
        key, value = key[:, :, :seqlen_q], value[:, :, :seqlen_q]
    out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                        softmax_scale=scaling)
    return out, None


def register_attention():
    """Register "fastllm" in transformers' attention interface, and the sdpa mask for it (which is None whenever
    plain causal attention is exact). Idempotent; apply() and patch_classes() call it."""
    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


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
