"""Data parallelism applied from outside the model (torchtitan-style): the model code never knows.

    model = parallelize(model, "fsdp", dist, precision="bf16", activation_checkpointing=True)

ddp   every process holds the whole model, its gradients and its optimizer state; gradients are all-reduced
      (torch DistributedDataParallel). Fastest while the model fits a device several times over.
fsdp  FSDP2 (torch.distributed.fsdp.fully_shard): each transformer block, then the root, is sharded along
      dim 0 over the processes, so a process keeps 1/world_size of the parameters, gradients and AdamW
      state. A block's parameters are all-gathered just before its forward (and again for its backward) and
      freed after; gradients are reduce-scattered (averaged, in fp32 with bf16 parameters). The root group
      (embeddings, final norm, output head) stays gathered from its forward to the end of the backward.
      On gloo (CPU) the all-gather and reduce-scatter are fastllm.train.collectives' (shared memory between
      the processes of one host, gloo's broadcast and send/recv across hosts).

A transformer block is each child of an nn.ModuleList whose children are all one class (GPT's transformer.h,
a Hugging Face model's model.layers); pass blocks= for another layout.

Losses outside the forward. The fused linear-head losses (ops.linear_cross_entropy / _token_logprobs /
_ppo_loss / _dpo_loss) read the output weight after the model returned its hidden states. Under fsdp that
weight is correct to use as it is when the root ran its forward in this step (model(...) or any method
registered with register_forward_method: GPT.hidden_states is): the root then holds it gathered, and its
gradient is reduce-scattered with the others at the end of the backward. `head_weight(weight)` is the safe
way to read it in general: a weight that is still a sharded DTensor (the root's forward did not run) is
all-gathered with a backward that averages the processes' gradients onto the shards, as FSDP does.

Generation: `with unsharded(model): model.generate(...)` gathers every block once for all the decoding
steps and reshards after (without it each token would all-gather every block again). Inside, the processes
may decode different numbers of tokens: nothing in there communicates.

A loop of its own (PPO/GRPO) on sharded models: parallelize policy, critic and reference (frozen before);
roll out in `unsharded(policy)`; score with policy.hidden_states(...) and the fused losses on
head_weight(policy.lm_head_weight); every process must make the same sequence of sharded forward/backward
calls (each one is collective), so equal numbers of micro-batches per rank; no_gradient_sync for all but the
last micro-batch, clip_grad_norm, and checkpoint.save_sharded_checkpoint(models=..., optimizers=...,
owners=...).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
import weakref

import torch
import torch.distributed as torch_dist
from torch import nn

from fastllm.train.collectives import fsdp_collectives

PARALLEL_MODES = ("ddp", "fsdp")
_SKELETONS = weakref.WeakKeyDictionary()  # sharded model -> its unsharded structure on the meta device
_RESHARD_AFTER_FORWARD = weakref.WeakKeyDictionary()  # FSDP module -> its setting, restored after `unsharded`


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of `model`: children of each nn.ModuleList whose children share one class."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if any(next(m.parameters(), None) is not None for m in module):
                blocks.extend(module)
    return blocks


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def parallelize(model: nn.Module, mode: str, dist, *, precision: str = "fp32", activation_checkpointing: bool = False,
                blocks: list[nn.Module] | None = None, forward_methods=("hidden_states",)) -> nn.Module:
    """The model in its parallel form, on dist.device. Returns the module to call for training: a
    DistributedDataParallel wrapper of `model` (ddp, more than one process), `model` itself sharded in
    place (fsdp, more than one process), or `model` (one process: nothing to parallelise).

    precision "bf16" under fsdp: a MixedPrecisionPolicy with bf16 parameters in forward/backward and fp32
    gradient reduction (the sharded master weights and the optimizer stay fp32); run without autocast.
    activation_checkpointing: each block's activations are recomputed in the backward instead of kept.
    forward_methods: methods other than forward that run the model (registered with FSDP so that they
    gather the root's parameters too)."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    blocks = transformer_blocks(model) if blocks is None else list(blocks)
    if not any(p.is_meta for p in model.parameters()):
        # A model built on the meta device is sharded as it is (no process ever holds it whole); the caller
        # then materialises its shards with model.to_empty(device=...) and initialises them.
        model = model.to(dist.device)
    if mode == "fsdp" and dist.enabled:
        _SKELETONS[model] = meta_skeleton(model)  # before any hook is added: for full_copy
        # Block outputs are (x, residual) pairs that may be views: FSDP2 warns in case the caller modifies
        # one in place (GPT never does).
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if activation_checkpointing:
        if not blocks:
            raise ValueError(f"activation_checkpointing: found no transformer blocks in {type(model).__name__} "
                             f"(no nn.ModuleList of one block class); pass blocks=")
        from torch.distributed._composable import checkpoint

        for block in blocks:
            checkpoint(block)  # composable: the parameter names (and so the checkpoints) stay the same
    if not dist.enabled:
        return model
    if mode == "ddp":
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
              else MixedPrecisionPolicy())
    for block in blocks:
        # The last block's backward comes right after its forward: resharding it in between would only
        # gather it again (as torchtitan does; one all-gather less per step, no higher peak).
        _RESHARD_AFTER_FORWARD[block] = block is not blocks[-1]
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=_RESHARD_AFTER_FORWARD[block])
    fully_shard(model, mesh=mesh, mp_policy=policy)
    _RESHARD_AFTER_FORWARD[model] = False  # FSDP2's default for the root
    if torch_dist.get_backend() == "gloo":
        all_gather, reduce_scatter = fsdp_collectives(mesh.get_group())
        for m in fsdp_modules(model):
            m.set_custom_all_gather(all_gather)
            m.set_custom_reduce_scatter(reduce_scatter)
    for name in forward_methods:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def uses_autocast(mode: str, dist, precision: str) -> bool:
    """Whether the loop should run bf16 autocast: not when FSDP's mixed-precision policy already casts."""
    return not (mode == "fsdp" and dist.enabled and precision == "bf16")


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, enabled: bool = True):
    """Inside: backward accumulates gradients locally without averaging them over the processes (all but
    the last micro-batch of a gradient-accumulation step). DDP's no_sync, or FSDP2's
    set_requires_gradient_sync(False); nothing for a plain model."""
    if not enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over every process's shards under fsdp); returns it before clipping."""
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


# ---------------------------------------------------------------------------------------------------------
# Sharded weights outside the forward

def head_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`weight` as a plain tensor a fused loss can take, with a correct gradient.

    A plain tensor (no sharding, or FSDP's gathered parameter inside the root's scope) is returned as it is.
    A sharded DTensor (FSDP parameter outside its module's forward) is all-gathered; in the backward each
    process's gradient of the full weight counts as its partial share and the shards receive the average
    over the processes (a reduce-scatter), the same reduction FSDP applies to the gradients of the forward.
    dtype: cast to this dtype (e.g. the hidden states' bf16 under a mixed-precision policy)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    if isinstance(weight, DTensor):
        if any(not isinstance(p, (Shard, Replicate)) for p in weight.placements):
            raise NotImplementedError(f"head_weight: a DTensor with placements {weight.placements} is not "
                                      f"supported (expected FSDP's Shard/Replicate)")
        full = weight.redistribute(weight.device_mesh, [Replicate()] * weight.device_mesh.ndim)
        weight = full.to_local(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
    return weight if dtype is None else weight.to(dtype)


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Gather every FSDP-sharded part of `model` for the duration of the block (generation, scoring), then
    reshard. Nothing to do for a model that is not sharded. Must be entered by every process together."""
    modules = fsdp_modules(model)
    if not modules:
        yield model
        return
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(_RESHARD_AFTER_FORWARD.get(m, m is not model), recurse=False)


# ---------------------------------------------------------------------------------------------------------
# Accounting and full weights

def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process holds for parameters, gradients and optimizer state, counted from its local
    shards (a DTensor counts its local part)."""
    from torch.distributed.tensor import DTensor

    def size(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list({id(p): p for p in model.parameters()}.values())
    out = {"params": sum(size(p) for p in params),
           "grads": sum(size(p.grad) for p in params if p.grad is not None), "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(size(v) for state in optimizer.state.values() for v in state.values()
                               if isinstance(v, torch.Tensor))
    return out


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device (no memory): its structure, to
    rebuild an unsharded model from a full state dict after `model` is sharded."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def full_copy(model: nn.Module) -> nn.Module | None:
    """An unsharded copy of an FSDP-sharded `model` (from parallelize) with its full weights, on the CPU of rank
    0; None on the other ranks. Collective: every process must call it. A model that is not sharded is
    returned as it is."""
    if not is_fsdp(model):
        return model
    if model not in _SKELETONS:
        raise ValueError(f"full_copy: {type(model).__name__} was not sharded by fastllm.train.parallel.parallelize")
    state = full_state_dict(model)
    if state is None:
        return None
    full = copy.deepcopy(_SKELETONS[model]).to_empty(device="cpu")
    full.load_state_dict(state)
    return full


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's full (unsharded) state dict on the CPU of rank 0; None on the other ranks. Collective
    under fsdp (every process must call it); on a plain or DDP model, its own state dict."""
    if not is_fsdp(model):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if torch_dist.get_rank() == 0 else None
