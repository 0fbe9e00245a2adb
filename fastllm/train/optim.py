"""AdamW with weight-decay groups, and the warm-up + cosine learning-rate schedule.

Decay shrinks weights towards zero; that regularises matrices but only distorts biases and norm gains
(their scale is the thing they learn), so those never decay. Embedding tables are matrices but are
read one row at a time; whether to decay them is a choice (`decay_embeddings`), off by default.
"""
from __future__ import annotations

import math

import torch
from torch import nn

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def _is_norm(module: nn.Module) -> bool:
    # fastllm.nn.LayerNorm/RMSNorm and a model's own norm classes are recognised by name.
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float, *, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups: {"params": decay, "weight_decay": wd} and {"params": no_decay, "weight_decay": 0}.

    A parameter shared by several modules (tied embeddings and output head) is placed once, by its first owner.
    """
    seen, decay, no_decay = set(), [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            skip = (p.ndim < 2 or name.endswith("bias") or _is_norm(module)
                    or (isinstance(module, nn.Embedding) and not decay_embeddings))
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; `config` is a TrainConfig (lr, weight_decay, beta1/2, eps)."""
    groups = param_groups(model, config.weight_decay, decay_embeddings=config.decay_embeddings)
    if not groups:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to lr over warmup_steps, then a
    half cosine from lr down to min_lr at total_steps, then min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
