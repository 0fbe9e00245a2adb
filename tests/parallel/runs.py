"""Tiny training runs shared by the FSDP tests (pytest, one process) and their torchrun worker (2 processes).

Every run reads the same rows per optimizer step whatever its process count: the per-process batch is
BATCH / (world_size x grad_accum), and the batch sources give rank r of w the slice r of the rows one
process would read (see tests/train/tiny.py and fastllm.train.chat.batch_indices)."""
import copy
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from tiny import SEQ, VOCAB, Batches, make_tokens  # noqa: E402

from fastllm import ops  # noqa: E402
from fastllm.model import GPT, GPTConfig  # noqa: E402
from fastllm.train import TrainConfig, Trainer  # noqa: E402
from fastllm.train.chat import PreferencePair, SFTExample  # noqa: E402

STEPS, BATCH = 20, 4
# `fastllm pretrain` on a slice of the embedded corpus, as small as it goes.
CLI_PRETRAIN = ["--max-bytes", "200000", "--vocab-size", "320", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
                "--block-size", "32", "--batch-size", "4", "--steps", "4", "--warmup-steps", "1", "--eval-interval",
                "2", "--eval-iters", "2", "--checkpoint-interval", "2", "--no-progress", "--no-plot",
                "--sample-prompt", "def "]


def tiny_gpt(preset="gpt2", n_layer=2, n_embd=32, seed=0):
    torch.manual_seed(seed)
    make = GPTConfig.gpt2_style if preset == "gpt2" else GPTConfig.llama_style
    return GPT(make(vocab_size=VOCAB, n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=SEQ, dropout=0.0))


def config(out, *, world_size, grad_accum=1, batch=BATCH, **kw):
    # eps 1e-6, not 1e-8: some gradients are zero up to rounding (the key bias: softmax ignores it) and AdamW
    # with a tiny eps turns that noise into full-size steps, which two process counts would then not share.
    kw = {"lr": 1e-2, "min_lr": 1e-3, "eps": 1e-6, "warmup_steps": 2, "eval_interval": 0, "eval_iters": 1,
          "checkpoint_interval": 10, "progress": False, "plot": False, "parallel": "fsdp", **kw}
    return TrainConfig(out_dir=str(out), steps=STEPS, batch_size=batch // (world_size * grad_accum),
                       grad_accum=grad_accum, **kw)


def losses(out, name="metrics") -> list[float]:
    with open(Path(out) / f"{name}.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


def pretrain_run(out, preset="gpt2", *, world_size, grad_accum=1, sigint_at=None, hook=None, **kw) -> Trainer:
    """Train tiny_gpt(preset) for STEPS steps; returns the Trainer (raises TrainingInterrupted on Ctrl-C).
    hook(model): called on the bare model before the Trainer parallelises it."""
    model = tiny_gpt(preset)
    if hook is not None:
        hook(model)
    trainer = Trainer(model, config(out, world_size=world_size, grad_accum=grad_accum, **kw),
                      Batches(make_tokens(64, seed=1), sigint_at=sigint_at))
    trainer.fit()
    return trainer


def stage_config(out, world_size, **kw):
    """SFT and DPO average per-micro-batch means: one process runs 2 micro-batches where 2 processes run 1."""
    return config(out, world_size=world_size, grad_accum=2 // world_size, batch=4, **kw)


def sft_examples(n=24, seed=0):
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(VOCAB) for _ in range(k)]  # noqa: E731
    return [SFTExample(prompt=tok(rng.randint(2, 4)), response=tok(rng.randint(2, 5))) for _ in range(n)]


def preference_pairs(n=24, seed=1):
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(VOCAB) for _ in range(k)]  # noqa: E731
    return [PreferencePair(prompt=tok(rng.randint(2, 3)), chosen=tok(rng.randint(2, 4)), rejected=tok(rng.randint(2, 4)))
            for _ in range(n)]


def run_stages(out, world_size):
    """SFT, the reward model and DPO (each from a fresh tiny GPT) through the stage functions and the Trainer."""
    from fastllm.train.dpo import dpo
    from fastllm.train.reward import train_reward_model
    from fastllm.train.sft import sft

    sft(stage_config(Path(out) / "sft", world_size), model=tiny_gpt("llama"), examples=sft_examples(),
        val_fraction=0)
    train_reward_model(stage_config(Path(out) / "reward", world_size), model=tiny_gpt("llama"),
                       pairs=preference_pairs(), val_fraction=0)
    # held-out pairs: the margins after training come from the sharded reference, gathered onto rank 0
    dpo(stage_config(Path(out) / "dpo", world_size, lr=3e-3), model=tiny_gpt("gpt2"), pairs=preference_pairs(),
        val_fraction=0.2)


# ---------------------------------------------------------------------------------------------------------
# Fused linear-head losses reading the head weight outside the forward

def rows(rank=None, world_size=2, n=4, seed=3):
    """(x, y) token rows; with rank: that process's share."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return (x, y) if rank is None else (x.chunk(world_size)[rank], y.chunk(world_size)[rank])


def head_loss(kind, hidden, weight, labels):
    """One of the fused losses of `hidden` (B, T, C) and the head `weight`, as a scalar."""
    g = torch.Generator().manual_seed(int(labels.sum()))  # the same extra inputs for the same rows
    if kind == "cross_entropy":
        return ops.linear_cross_entropy(hidden, weight, labels)
    if kind == "token_logprobs":
        return ops.linear_token_logprobs(hidden, weight, labels).mean()
    old = -torch.rand(labels.shape, generator=g) - 2.5
    advantages = torch.randn(labels.shape, generator=g)
    mask = torch.rand(labels.shape, generator=g) > 0.2
    return ops.linear_ppo_loss(hidden, weight, labels, old, advantages, mask).loss


def reference_head_grads(model, kind, world_size=2):
    """Gradients of the mean over processes of head_loss on each process's rows, on an unsharded copy."""
    model = copy.deepcopy(model)
    loss = sum(head_loss(kind, model.hidden_states(x), model.lm_head_weight, y)
               for x, y in (rows(r, world_size) for r in range(world_size))) / world_size
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}
