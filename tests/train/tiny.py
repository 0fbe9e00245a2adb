"""A tiny language model and an in-memory batch source for testing the training loop without fastllm.model/data.

Also imported by the torchrun worker script of the DDP test (put this folder on PYTHONPATH)."""
import os
import signal

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, SEQ = 32, 12


class TinyLM(nn.Module):
    """Embedding -> dropout -> Linear+GELU -> LayerNorm -> tied output head; forward(x, y) -> (logits, loss)."""

    def __init__(self, vocab=VOCAB, dim=16, dropout=0.0, tie=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(SEQ, dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.wte.weight

    def forward(self, x, y=None):
        pos = torch.arange(x.shape[1], device=x.device)
        h = self.drop(self.wte(x) + self.wpe(pos))
        h = self.norm(h + F.gelu(self.fc(h)))
        logits = self.head(h)
        loss = None if y is None else F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        return logits, loss


def make_tokens(n_windows=64, seed=0):
    """A learnable sequence set: each window is an arithmetic progression mod VOCAB with a random start/stride."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n_windows, 1), generator=g)
    stride = torch.randint(1, 4, (n_windows, 1), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


class Batches:
    """batch(index, batch_size, rank, world_size): rows index*bs*ws + rank*bs + [0, bs) of the window table
    (mod its length), so rank r of w reads a disjoint shard and w=2 x bs equals w=1 x 2bs row for row.

    Test hooks: sigint_at / raise_at (micro-batch indices) send SIGINT or raise RuntimeError when that batch
    is read; poison_at makes the batch carry a NaN factor (for `poisoned_loss`)."""

    def __init__(self, windows, *, sigint_at=None, raise_at=None, poison_at=None):
        self.windows, self.sigint_at, self.raise_at, self.poison_at = windows, sigint_at, raise_at, poison_at
        self.seen = []

    def batch(self, index, batch_size, *, rank=0, world_size=1):
        self.seen.append(index)
        if index == self.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)
        if index == self.raise_at:
            raise RuntimeError(f"simulated crash at batch {index}")
        start = index * batch_size * world_size + rank * batch_size
        rows = self.windows[torch.arange(start, start + batch_size) % len(self.windows)]
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if self.poison_at is not None:
            return x, y, torch.tensor(float("nan") if index == self.poison_at else 1.0)
        return x, y


def poisoned_loss(model, batch):
    x, y, factor = batch if len(batch) == 3 else (*batch, torch.tensor(1.0))
    return model(x, y)[1] * factor, {"factor": factor}


# A fake `fastllm` subcommand (registered by test_cli) that fails the way a training run can.
def add_arguments(parser):
    parser.add_argument("--fail", choices=["interrupt", "diverge", "bug"], required=True)


def main(args):
    from fastllm.train import TrainingDiverged, TrainingInterrupted

    if args.fail == "interrupt":
        raise TrainingInterrupted(3, "out/checkpoints/step_00000003")
    if args.fail == "diverge":
        raise TrainingDiverged("loss is nan at step 4")
    raise AssertionError("a bug, not a user error")
