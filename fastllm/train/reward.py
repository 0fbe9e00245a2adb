"""Reward model: the GPT with a scalar head, trained on preference pairs with the Bradley-Terry loss.

    fastllm reward --data pairs.jsonl --init runs/sft --out runs/rm

A pair (prompt, chosen, rejected) is scored as r(prompt + response) read at the response's last token (its
<|end|>: the only position that has seen the whole response), and the loss is

    -log sigmoid(r_chosen - r_rejected - m)        [Bradley & Terry 1952; Ouyang et al. 2022, eq. 1]

with m = margin_scale * the pair's "margin" field (0 when absent; Llama 2's margin, Touvron et al. 2023).
Both sequences of every pair are packed side by side in one row (varlen attention, no padding). The
held-out split's pairwise accuracy (share of pairs with r_chosen > r_rejected) is reported at the end.

The same ScalarHeadModel serves PPO as its separate critic (one value per token).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chat import (ChatTemplate, PreferencePair, batch_indices, find_tokenizer, load_gpt, model_dir, pack,
                   read_preferences, split_holdout, write_json)
from .config import TrainConfig, add_config_arguments, config_from_args
from .loop import Trainer

KIND = "scalar_head"
TRAIN_DEFAULTS = dict(steps=150, batch_size=16, lr=1e-4, min_lr=1e-5, warmup_steps=10, weight_decay=0.0,
                      eval_interval=50, eval_iters=5, checkpoint_interval=100)


class ScalarConfig:
    """What config.json holds for a ScalarHeadModel: the trunk's GPTConfig under "gpt"."""

    def __init__(self, gpt_config):
        self.gpt = gpt_config

    def to_dict(self) -> dict:
        return {"kind": KIND, "gpt": self.gpt.to_dict()}


class ScalarHeadModel(nn.Module):
    """A GPT trunk and a linear head (n_embd -> 1): one scalar per token. A reward model reads it at each
    sequence's last token; a critic reads it at every response position (the value of the state before that
    token is sampled). The trunk's output head is unused and frozen (requires_grad False), so DDP and the
    optimizer see only what is trained."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if gpt.lm_head is not None:
            gpt.lm_head.requires_grad_(False)
        self.config = ScalarConfig(gpt.config)

    def forward(self, idx, *, cu_seqlens=None, position_ids=None):
        """idx (B, T) (or (1, N) packed with cu_seqlens) -> fp32 (B, T) scalars."""
        hidden = self.gpt.hidden_states(idx, cu_seqlens=cu_seqlens, position_ids=position_ids)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def score(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """fp32 (n,) scalars at the last token of each sequence, all run packed in one forward."""
        device = self.head.weight.device
        batch = pack(sequences)
        cu = batch["cu_seqlens"].to(device)
        values = self(batch["input_ids"].to(device), cu_seqlens=cu)
        return values[0, cu[1:].long() - 1]

    def save_pretrained(self, directory) -> Path:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / ".model.safetensors.tmp"
        save_model(self, str(tmp))
        tmp.replace(directory / "model.safetensors")
        write_json(directory / "config.json", self.config.to_dict())
        return directory

    @classmethod
    def from_pretrained(cls, path, *, device=None) -> "ScalarHeadModel":
        """The model saved by save_pretrained or by a reward run's checkpoints (a run folder works too)."""
        from safetensors.torch import load_model

        from fastllm.model import GPT, GPTConfig

        folder = model_dir(path)
        data = json.loads((folder / "config.json").read_text())
        if data.get("kind") != KIND:
            raise ValueError(f"{folder} holds a plain GPT, not a reward model (its config.json has no "
                             f"\"kind\": \"{KIND}\"); train one with `fastllm reward`")
        model = cls(GPT(GPTConfig.from_dict(data["gpt"])))
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}/model.safetensors does not fit a reward model: missing {missing}, "
                             f"unexpected {unexpected}")
        return model.to(device)


# ---------------------------------------------------------------------------------------------------------
def reward_layout(pairs: list[PreferencePair]) -> dict:
    """Pairs packed as [chosen_0, rejected_0, chosen_1, rejected_1, ...], with each pair's margin."""
    out = pack([s for p in pairs for s in (p.prompt + p.chosen, p.prompt + p.rejected)])
    out["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return out


class PreferenceData:
    """Micro-batches of preference pairs, deterministic in (index, rank, world_size), laid out by `layout`
    (the reward model's packing by default; DPO passes its own)."""

    def __init__(self, pairs: list[PreferencePair], seed: int = 0, layout=reward_layout):
        if not pairs:
            raise ValueError("PreferenceData needs at least one pair")
        self.pairs, self.seed, self.layout = pairs, seed, layout

    def __len__(self):
        return len(self.pairs)

    def batch(self, index: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> dict:
        chosen = batch_indices(len(self.pairs), index, batch_size, self.seed, rank, world_size)
        return self.layout([self.pairs[i] for i in chosen])


def bradley_terry_loss(chosen, rejected, margin=None):
    """mean -log sigmoid(chosen - rejected - margin) over pairs."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def make_reward_loss(margin_scale: float = 1.0):
    def reward_loss(model, batch):
        cu = batch["cu_seqlens"]
        scores = model(batch["input_ids"], cu_seqlens=cu)[0, cu[1:].long() - 1]  # (2 pairs,)
        chosen, rejected = scores[0::2], scores[1::2]
        loss = bradley_terry_loss(chosen, rejected, margin_scale * batch["margin"] if margin_scale else None)
        accuracy = (chosen > rejected).float().mean()
        return loss, {"accuracy": accuracy.item(), "reward_gap": (chosen - rejected).mean().item()}
    return reward_loss


@torch.no_grad()
def pairwise_accuracy(model: ScalarHeadModel, pairs: list[PreferencePair], batch_size: int = 32) -> dict:
    """Share of pairs scored r_chosen > r_rejected (ties count as wrong), and the mean score gap."""
    was_training = model.training
    model.eval()
    correct, gaps = 0, []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        scores = model.score([s for p in chunk for s in (p.prompt + p.chosen, p.prompt + p.rejected)])
        gap = scores[0::2] - scores[1::2]
        correct += int((gap > 0).sum())
        gaps.append(gap)
    model.train(was_training)
    gap = torch.cat(gaps)
    return {"accuracy": correct / len(pairs), "reward_gap": gap.mean().item(), "pairs": len(pairs)}


def train_reward_model(config: TrainConfig, *, data=None, init=None, model=None, tokenizer=None, pairs=None,
                       val_fraction: float = 0.1, margin_scale: float = 1.0) -> dict:
    """Train a reward model on preference pairs; returns the loop's summary plus the held-out accuracy
    ("val_accuracy") and "final", the exported folder (out_dir/final).

    model: a GPT trunk or a ScalarHeadModel (default: the GPT saved under `init`, with a new head)."""
    from fastllm.data import load_tokenizer

    if model is None:
        if init is None:
            raise ValueError("train_reward_model needs model= or init= (an SFT or pretrain run folder/checkpoint)")
        model = load_gpt(init)
    if not isinstance(model, ScalarHeadModel):
        model = ScalarHeadModel(model)
    tokenizer_path = find_tokenizer(init, tokenizer) if (init is not None or tokenizer) else None
    if pairs is None:
        if data is None or tokenizer_path is None:
            raise ValueError("train_reward_model needs data= (a JSONL file) and a tokenizer, or pairs=")
        pairs = read_preferences(data, ChatTemplate(load_tokenizer(tokenizer_path)), model.gpt.config.block_size)
    train, held = split_holdout(pairs, val_fraction, config.seed) if val_fraction > 0 else (pairs, [])
    trainer = Trainer(model, config, PreferenceData(train, config.seed),
                      PreferenceData(held, config.seed + 1) if held else None, loss_fn=make_reward_loss(margin_scale),
                      log_name="reward",
                      extra_files={"tokenizer.json": str(tokenizer_path)} if tokenizer_path else None,
                      run_info={"stage": "reward", "data": str(data), "init": str(init), "pairs": len(train),
                                "held_out": len(held), "margin_scale": margin_scale})
    summary = trainer.fit(consolidate=True)
    model = trainer.final_model  # under fsdp: the full weights, on rank 0 (None elsewhere)
    if trainer.dist.is_main:
        summary["train_accuracy"] = pairwise_accuracy(model, train[:512])["accuracy"]
        if held:
            result = pairwise_accuracy(model, held)
            summary["val_accuracy"] = result["accuracy"]
            trainer.logger.log({"kind": "rm_eval", "step": trainer.step, "val_accuracy": result["accuracy"],
                                "val_reward_gap": result["reward_gap"], "train_accuracy": summary["train_accuracy"]})
        final = model.save_pretrained(Path(config.out_dir) / "final")
        if tokenizer_path:
            import shutil

            shutil.copyfile(tokenizer_path, final / "tokenizer.json")
        summary["final"] = str(final)
    return summary


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help='JSONL file of {"prompt", "chosen", "rejected", "margin" (optional)} lines')
    parser.add_argument("--init", required=True, help="the trunk: an SFT/pretrain run folder, checkpoint or export")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one next to --init)")
    parser.add_argument("--out", dest="out_dir", default="runs/reward", help="run folder (default: runs/reward)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="pairs held out for the accuracy (default: 0.1)")
    parser.add_argument("--margin-scale", type=float, default=1.0,
                        help="multiplies each pair's 'margin' field in the loss; 0 ignores margins (default: 1.0)")
    add_config_arguments(parser.add_argument_group("training"), skip=("out_dir",), defaults=TRAIN_DEFAULTS)


def main(args: argparse.Namespace) -> int:
    summary = train_reward_model(config_from_args(args), data=args.data, init=args.init, tokenizer=args.tokenizer,
                                 val_fraction=args.val_fraction, margin_scale=args.margin_scale)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    return 0
