"""fastllm in Hugging Face TRL's trainers: one call, after the trainer is built and before it trains.

    import trl
    from fastllm.integrations import trl as fastllm_trl

    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset)
    fastllm_trl.apply(trainer)            # SFTTrainer, DPOTrainer, RewardTrainer or GRPOTrainer
    trainer.train()

What it changes, on the policy model and (GRPO, DPO) the reference model:
  the model    fastllm.integrations.transformers.apply: fastllm's norms and attention, and (causal LMs) the fused
               causal-LM loss for plain `model(..., labels=...)` calls. The parts can be turned off as there.
  the LM head  TRL 1.16 scores tokens through `model(..., labels=labels, fused_lm_head=True)` (trl's
               add_fused_lm_head, its public extension point): SFT's loss and accuracy, DPO's sequence log-probs,
               GRPO's per-token log-probs and entropies. apply() installs a forward that answers these calls with
               fastllm.ops.linear_token_logprobs(..., return_entropy=True) on the final hidden states and the head
               weight: the (tokens x vocabulary) logits never exist, in chunks of at most
               fastllm.ops.fused_linear.CHUNK_BYTES, and only the tokens whose label is not -100 are projected.
               The few per-token statistics TRL logs but never differentiates (is_top1 for token accuracy,
               mean_logits, log_sum_sq_probs for DPO's WPO weights) come from one extra no-grad pass over the same
               chunks, only for the trainers that ask for them (SFT, DPO).
  the loss     TRL's own: every GRPO loss_type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo), importance
               sampling level, KL, entropy bonus and mask, and every DPO loss_type, run unchanged on the exact
               per-token log-probs and entropies above, so patched and unpatched runs log the same numbers.

Why per-token log-probs (linear_token_logprobs) and not the one-pass scalar losses (linear_ppo_loss,
linear_dpo_loss): TRL's metrics and most of its loss types need per-token or per-sequence values the scalar ops
do not return (GRPO's clip_ratio/low_min and high_max are extrema of per-sequence means, its entropy mask is a
quantile over tokens, cispo/sapo/vespo/luspo and DPO's 15 loss types are not the ops' formulas), and using them
would mean replacing TRL's private _compute_loss. The price is the 4th matmul of the per-token schedule
(fused_linear.py's docstring), against TRL's own chunked head, which also recomputes in its backward.

What fastllm cannot compute exactly raises a ValueError naming it, before anything is changed: a final-logit
soft-cap (Gemma-2 style), an LM head that is not a plain nn.Linear, a head sharded as a DTensor (FSDP2),
DeepSpeed or FSDP training, a requested fused-head output this module does not know; the MoE load-balancing
loss raises at the call that asks for it. The supported TRL versions are SUPPORTED_TRL (also the `trl` extra of
fastllm's pyproject.toml); another version raises a RuntimeError saying which is installed.

Precision: under bf16 autocast (TRL's default) the head's matmuls run in bf16, as TRL's own head and F.linear
do, on the fp32 master weight, which the op takes uncast: the gradients of the weight and of the hidden states
come back in fp32, their products summed in fp32 without a bf16 rounding (as TRL's head sums them), and no bf16
copy of a gradient ever exists (fastllm/ops/_chunked_head.py).
"""
import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import convert_outputs_to_fp32
from packaging.version import Version
from torch.distributed.tensor import DTensor

from .. import ops
from ..ops.fused_linear import chunk_rows
from . import transformers as fastllm_hf

SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))  # [low, high): the fused_lm_head contract of TRL 1.16
IGNORE_INDEX = -100  # TRL's label for tokens that are not scored
# FusedCausalLMOutput fields: those with a gradient come from linear_token_logprobs, the rest from a no-grad pass
GRADIENT_OUTPUTS = ("log_probs", "entropy")
STATISTIC_OUTPUTS = ("is_top1", "mean_logits", "log_sum_sq_probs")
_FASTLLM_HEAD = "_fastllm_trl_head"  # marks a forward installed by this module, so nothing is wrapped twice


def check_trl_version(version=None):
    """Raise RuntimeError unless TRL (its installed version, or `version`) is in SUPPORTED_TRL."""
    if version is None:
        import trl
        version = trl.__version__
    low, high = SUPPORTED_TRL
    if not low <= Version(version) < high:
        raise RuntimeError(f"fastllm.integrations.trl supports trl>={low},<{high} (the `fastllm[trl]` extra), "
                           f"found trl {version}; install a supported version")


# ---------------------------------------------------------------------------------------------------------
# The registry: what each trainer asks of the fused head (as TRL 1.16 sets it up in its __init__)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Head:
    """How a trainer calls add_fused_lm_head on one model: z = logits * logit_scale / temperature."""
    temperature: float = 1.0
    cast_to_fp32: bool = False  # run the head in fp32 outside autocast (GRPO's cast_lm_head_to_fp32)
    outputs: tuple = ("log_probs",)


def _grpo_heads(trainer):
    policy = Head(trainer.temperature, trainer.args.cast_lm_head_to_fp32, ("log_probs", "entropy"))
    return policy, Head(policy.temperature, policy.cast_to_fp32)


def _dpo_heads(trainer):
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    return Head(outputs=outputs + (("log_sum_sq_probs",) if trainer.use_weighting else ())), Head()


def _sft_heads(trainer):
    return Head(outputs=("log_probs", "entropy", "is_top1")), None


def _reward_heads(trainer):
    return None, None  # a sequence-classification model: no LM head to fuse


# trainer class name -> trainer -> (policy Head or None, reference Head or None)
TRAINERS = {"GRPOTrainer": _grpo_heads, "DPOTrainer": _dpo_heads, "SFTTrainer": _sft_heads,
            "RewardTrainer": _reward_heads}


def _trainer_kind(trainer):
    import trl

    for name in TRAINERS:
        if isinstance(trainer, getattr(trl, name)):
            return name
    raise TypeError(f"fastllm.integrations.trl.apply expects one of trl's {', '.join(TRAINERS)}, got "
                    f"{type(trainer).__name__}")


# ---------------------------------------------------------------------------------------------------------
# The fused head
# ---------------------------------------------------------------------------------------------------------
def _logit_scale(config):
    """The multiplier TRL's fused head applies to the logits before the temperature (1.0 for most models)."""
    text = config.get_text_config()
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, name, None) is not None:
            return float(getattr(text, name))
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if text.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def _check_head(model, head):
    """ValueError naming whatever the fastllm head cannot compute exactly for `model`."""
    name = type(model).__name__
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"{name} soft-caps its logits (final_logit_softcapping={softcap}); fastllm's fused head "
                         f"computes log softmax(logits / temperature) without a soft-cap")
    unknown = [o for o in head.outputs if o not in GRADIENT_OUTPUTS + STATISTIC_OUTPUTS]
    if unknown:
        raise ValueError(f"fused-head outputs {unknown} are not computed by fastllm (known: "
                         f"{GRADIENT_OUTPUTS + STATISTIC_OUTPUTS})")
    scale = _logit_scale(model.config)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}'s logit scale must be a positive finite number for fastllm's head, got {scale}")
    lm_head = model.get_output_embeddings()
    if type(lm_head) is not torch.nn.Linear:
        raise ValueError(f"{name}'s output embeddings must be a plain nn.Linear for fastllm's fused head, got "
                         f"{type(lm_head).__name__}")
    if isinstance(lm_head.weight, DTensor):
        raise ValueError(f"{name}'s LM head is a sharded DTensor (FSDP2); fastllm's fused head needs the whole "
                         f"weight on one device")
    return scale


def _head_operands(hidden, lm_head, cast_to_fp32):
    """(hidden, weight, bias) for the fused op: fp32 when cast_lm_head_to_fp32 (GRPO), else in the weight's dtype;
    under autocast the op runs its matmuls in the autocast dtype, as F.linear (and TRL's head) do."""
    weight, bias = lm_head.weight, lm_head.bias
    dtype = torch.float32 if cast_to_fp32 else weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


@torch.no_grad()
def _statistics(hidden, weight, bias, labels, inv_temperature, wanted):
    """The no-grad per-token statistics in `wanted`, chunk by chunk: never more than one chunk of logits."""
    if not wanted:  # GRPO asks for none: no extra pass
        return {}
    rows = chunk_rows(weight.shape[0], torch.float32)
    out = {name: [] for name in wanted}
    for start in range(0, max(hidden.shape[0], 1), rows):  # one (empty) chunk when no token is scored
        z = F.linear(hidden[start:start + rows], weight, bias).float().mul_(inv_temperature)
        if "is_top1" in wanted:  # argmax takes the first of tied maxima, as TRL's kernel does
            out["is_top1"].append(z.argmax(-1) == labels[start:start + rows])
        if "mean_logits" in wanted:
            out["mean_logits"].append(z.mean(-1))
        if "log_sum_sq_probs" in wanted:  # log sum p^2 = logsumexp(2 z) - 2 logsumexp(z)
            out["log_sum_sq_probs"].append(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
        del z
    return {name: torch.cat(parts) for name, parts in out.items()}


def _scatter(values, mask):
    """Per valid token -> (batch, positions) with 0 (False) where the label is ignored; keeps the graph."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _fused_head_forward(inner, head, logit_scale):
    """A forward with TRL's fused_lm_head signature over fastllm; without fused_lm_head it calls `inner`."""
    from trl.trainer.utils import FusedCausalLMOutput

    temperature = head.temperature / logit_scale  # log softmax(scale z / T) = log softmax(z / (T / scale))
    statistics = tuple(o for o in STATISTIC_OUTPUTS if o in head.outputs)
    want_entropy = "entropy" in head.outputs

    @functools.wraps(inner)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            extra = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return inner(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        text_config = self.config.get_text_config()
        if kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False):
            raise ValueError("fastllm's fused head does not compute the MoE load-balancing loss "
                             "(output_router_logits); use an unpatched model for MoE training")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts label t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        labels = labels.to(lm_head.weight.device)
        mask = labels != IGNORE_INDEX
        autocast = torch.autocast(hidden.device.type, enabled=False) if head.cast_to_fp32 else nullcontext()
        with autocast:
            rows, weight, bias = _head_operands(hidden.to(lm_head.weight.device)[mask], lm_head, head.cast_to_fp32)
            targets = labels[mask]
            scored = ops.linear_token_logprobs(rows, weight, targets, bias, temperature=temperature,
                                               return_entropy=want_entropy)
            log_probs, entropy = scored if want_entropy else (scored, None)
            stats = _statistics(rows.detach(), weight.detach(), None if bias is None else bias.detach(), targets,
                                1.0 / temperature, statistics)
        per_token = {"log_probs": log_probs, "entropy": entropy, **stats}
        per_token = {name: None if v is None else _scatter(v, mask) for name, v in per_token.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-per_token["log_probs"].sum() / count, label_mask=mask, **per_token)

    setattr(forward, _FASTLLM_HEAD, True)
    return forward


# ---------------------------------------------------------------------------------------------------------
# Patching a trainer
# ---------------------------------------------------------------------------------------------------------
def _base(model):
    """The transformers model under a PEFT wrapper (add_fused_lm_head is applied there too)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _plan(model, head, parts, accelerator):
    """The changes for one model, as closures, after every check has passed."""
    model = _base(model)
    if head is None:
        parts = {**parts, "loss": False}  # no causal-LM head (reward models)
    scale = _check_head(model, head) if head is not None else None
    key = fastllm_hf._architecture_of(model)
    changes = fastllm_hf._plan(model, key, parts)

    def install_head():
        if not getattr(model.forward, _FASTLLM_HEAD, False):
            model.forward = _fused_head_forward(model.forward, head, scale).__get__(model)
    changes += [install_head] if head is not None else []
    # A model accelerate has prepared already (TRL prepares the reference model in its __init__) runs its forward
    # inside accelerate's mixed-precision wrapper (autocast, outputs to fp32); the patch goes under that wrapper.
    if "_original_forward" in model.__dict__:
        def unwrap():
            model.forward = model._original_forward

        def rewrap():
            model._original_forward = forward = model.forward

            @functools.wraps(forward)
            def mixed_precision_forward(*args, **kwargs):
                with accelerator.autocast():
                    return forward(*args, **kwargs)
            model.forward = convert_outputs_to_fp32(mixed_precision_forward)
        changes = [unwrap, *changes, rewrap]
    return changes


def apply(trainer, *, norm: bool = True, attention: bool = True, loss: bool = True):
    """Put a TRL trainer's models on fastllm: norms, attention, and the fused LM head (see the module docstring).

    trainer: a built trl SFTTrainer, DPOTrainer, RewardTrainer or GRPOTrainer (before train()); its policy and
    reference models are patched in place (the same objects, parameters and state_dict keys). norm, attention,
    loss: the parts of fastllm.integrations.transformers.apply. Returns the trainer. Applying twice changes
    nothing more. Raises RuntimeError for an unsupported TRL version, TypeError for another trainer, and
    ValueError (before changing anything) for a setting fastllm cannot compute exactly.
    """
    check_trl_version()
    parts = dict(norm=norm, attention=attention, loss=loss)
    fastllm_hf._check_parts(parts)
    kind = _trainer_kind(trainer)
    for engine in ("deepspeed", "fsdp"):
        if getattr(trainer, f"is_{engine}_enabled", False):
            raise ValueError(f"fastllm.integrations.trl runs single-process and DDP training; this {kind} uses "
                             f"{engine}, whose sharded weights fastllm's fused head cannot read")
    policy_head, reference_head = TRAINERS[kind](trainer)
    changes = _plan(trainer.model, policy_head, parts, trainer.accelerator)
    reference = getattr(trainer, "ref_model", None)
    if reference is not None:
        changes += _plan(reference, reference_head, parts, trainer.accelerator)
    for change in changes:
        change()
    return trainer


def patched(model) -> bool:
    """Whether `model`'s fused_lm_head calls run on fastllm (apply() installed its head)."""
    return bool(getattr(_base(model).forward, _FASTLLM_HEAD, False))
