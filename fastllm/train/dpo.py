"""DPO (and IPO, hinge) from preference pairs, against a frozen reference, on the fused linear-head loss.

    fastllm dpo --data pairs.jsonl --init runs/sft --out runs/dpo [--loss-type sigmoid|ipo|hinge --beta 0.1]

Per micro-batch the pairs' chosen and rejected sequences run packed in one row (varlen attention); the
hidden states at each response's positions are gathered into (pairs, length, C) blocks, and
fastllm.ops.linear_dpo_loss computes the sequence log-probs and the loss from them and the output weight in
chunks of whole pairs, so the logits are never materialised. The reference's sequence log-probs come from
the same layout under no_grad (linear_token_logprobs). Loss formulas: fastllm.ops.rl.
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.nn as nn

from fastllm import ops

from .chat import (IGNORE_INDEX, ChatTemplate, PreferencePair, export_model, find_tokenizer, load_gpt,
                   read_preferences, split_holdout)
from .config import TrainConfig, add_config_arguments, config_from_args
from .distributed import init_distributed
from .loop import Trainer, resolve_precision
from .parallel import full_copy, head_weight, is_fsdp, parallelize
from .reward import PreferenceData

TRAIN_DEFAULTS = dict(steps=100, batch_size=8, lr=1e-5, min_lr=1e-6, warmup_steps=5, weight_decay=0.0,
                      eval_interval=50, eval_iters=5, checkpoint_interval=100)


class HiddenStates(nn.Module):
    """The policy seen by the loop: forward = GPT.hidden_states, so DDP's gradient hooks (and FSDP's
    gathering of the root's parameters) see the forward; the fused loss then reads gpt.lm_head_weight outside
    it (through parallel.head_weight). Checkpoints hold "gpt."-prefixed keys; the
    exported final/ folder is the plain GPT."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    @property
    def config(self):
        """The GPT's config: checkpoints then hold config.json, and `fastllm export` rebuilds the GPT."""
        return self.gpt.config

    def forward(self, idx, cu_seqlens=None):
        return self.gpt.hidden_states(idx, cu_seqlens=cu_seqlens)


def pair_layout(pairs: list[PreferencePair], device=None) -> dict:
    """The packed layout of pairs: input_ids (1, N) of [chosen_0, rejected_0, chosen_1, ...] (each sequence
    without its last token), cu_seqlens, and for each side an index (pairs, L) of the hidden-state columns that
    predict its response tokens, with labels (pairs, L) (IGNORE_INDEX on padding; index 0 there)."""
    sequences, sides = [], {"chosen": [], "rejected": []}
    offset = 0
    for p in pairs:
        for side, response in (("chosen", p.chosen), ("rejected", p.rejected)):
            seq = p.prompt + response[:-1]
            start = offset + len(p.prompt) - 1
            sides[side].append((list(range(start, start + len(response))), list(response)))
            sequences.append(seq)
            offset += len(seq)
    cu = [0]
    for s in sequences:
        cu.append(cu[-1] + len(s))
    out = {"input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.long)[None],
           "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    for side, rows in sides.items():
        longest = max(len(r[0]) for r in rows)
        index = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        for i, (cols, toks) in enumerate(rows):
            index[i, :len(cols)] = torch.tensor(cols)
            labels[i, :len(toks)] = torch.tensor(toks)
        out[f"{side}_index"], out[f"{side}_labels"] = index, labels
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


@torch.no_grad()
def sequence_logps(gpt, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs (pairs,) of `gpt` on a pair_layout batch."""
    hidden = gpt.hidden_states(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])[0]
    weight = head_weight(gpt.lm_head_weight)  # a sharded reference's: gathered by its forward
    out = []
    for side in ("chosen", "rejected"):
        labels = batch[f"{side}_labels"]
        logps = ops.linear_token_logprobs(hidden[batch[f"{side}_index"]], weight, labels)
        out.append(logps.sum(-1))  # ignored positions give 0
    if is_fsdp(gpt):
        gpt.reshard()  # no backward will: free the root's gathered embeddings and head now
    return out[0], out[1]


def make_dpo_loss(ref, *, beta: float, loss_type: str, label_smoothing: float = 0.0):
    def dpo_loss(model, batch):
        gpt = model.module.gpt if isinstance(model, nn.parallel.DistributedDataParallel) else model.gpt
        ref_chosen, ref_rejected = sequence_logps(ref, batch)
        hidden = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])[0]  # (N, C)
        weight = head_weight(gpt.lm_head_weight)  # read after the forward: gathered under fsdp
        out = ops.linear_dpo_loss(hidden[batch["chosen_index"]], hidden[batch["rejected_index"]], weight,
                                  batch["chosen_labels"], batch["rejected_labels"], ref_chosen, ref_rejected,
                                  beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        margin = out.chosen_rewards - out.rejected_rewards
        return out.loss, {"reward_margin": margin.mean().item(), "reward_accuracy": (margin > 0).float().mean().item(),
                          "chosen_reward": out.chosen_rewards.mean().item(),
                          "rejected_reward": out.rejected_rewards.mean().item()}
    return dpo_loss


@torch.no_grad()
def preference_margin(gpt, pairs: list[PreferencePair], ref=None, batch_size: int = 32) -> dict:
    """Mean log p(chosen) - log p(rejected) under `gpt` (and, with ref, the implicit reward margin
    (pi_c - ref_c) - (pi_r - ref_r) and the share of pairs where it is positive)."""
    margins, implicit = [], []
    for start in range(0, len(pairs), batch_size):
        batch = pair_layout(pairs[start:start + batch_size], gpt.lm_head_weight.device)
        c, r = sequence_logps(gpt, batch)
        margins.append(c - r)
        if ref is not None:
            rc, rr = sequence_logps(ref, batch)
            implicit.append((c - rc) - (r - rr))
    m = torch.cat(margins)
    out = {"logp_margin": m.mean().item(), "logp_accuracy": (m > 0).float().mean().item()}
    if implicit:
        u = torch.cat(implicit)
        out.update(implicit_margin=u.mean().item(), implicit_accuracy=(u > 0).float().mean().item())
    return out


def dpo(config: TrainConfig, *, data=None, init=None, model=None, ref_model=None, tokenizer=None, pairs=None,
        beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
        val_fraction: float = 0.1) -> dict:
    """Train `model` (or the GPT under `init`) with DPO against `ref_model` (default: a frozen copy of the
    starting model). Returns the loop's summary, the held-out margins before/after, and "final"."""
    from fastllm.data import load_tokenizer

    ops.rl.check_preference_args(beta, loss_type, label_smoothing)
    if model is None:
        if init is None:
            raise ValueError("dpo needs model= or init= (an SFT run folder or checkpoint)")
        model = load_gpt(init)
    if ref_model is None:
        ref_model = copy.deepcopy(model)
    ref_model.eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    tokenizer_path = find_tokenizer(init, tokenizer) if (init is not None or tokenizer) else None
    if pairs is None:
        if data is None or tokenizer_path is None:
            raise ValueError("dpo needs data= (a JSONL file) and a tokenizer, or pairs=")
        pairs = read_preferences(data, ChatTemplate(load_tokenizer(tokenizer_path)), model.config.block_size)
    train, held = split_holdout(pairs, val_fraction, config.seed) if val_fraction > 0 else (pairs, [])
    dist = init_distributed(config.device)
    try:
        ref_model.to(dist.device)
        # Before the Trainer shards the policy (under fsdp), while rank 0 can still run it alone.
        before = preference_margin(model.to(dist.device), held, ref_model) if held and dist.is_main else None
        sharded_ref = config.parallel == "fsdp" and dist.enabled
        if sharded_ref:  # the frozen reference sharded like the policy: 1/world_size of its weights per process
            parallelize(ref_model, "fsdp", dist, precision=resolve_precision(dist.device, config.precision))
        trainer = Trainer(HiddenStates(model), config, PreferenceData(train, config.seed, pair_layout),
                          PreferenceData(held, config.seed + 1, pair_layout) if held else None,
                          loss_fn=make_dpo_loss(ref_model, beta=beta, loss_type=loss_type,
                                                label_smoothing=label_smoothing),
                          log_name="dpo", dist=dist,
                          extra_files={"tokenizer.json": str(tokenizer_path)} if tokenizer_path else None,
                          run_info={"stage": "dpo", "data": str(data), "init": str(init), "pairs": len(train),
                                    "held_out": len(held), "beta": beta, "loss_type": loss_type})
        try:
            summary = trainer.fit(consolidate=True)  # under fsdp the full weights come to rank 0
        finally:
            trainer.close()  # before dist.close(): see Trainer.close
        if sharded_ref and held:  # the held-out margins after training run on rank 0 alone
            ref_model = full_copy(ref_model)
    finally:
        dist.close()
    if dist.is_main:
        final = trainer.final_model.gpt.to(dist.device)
        if held:
            after = preference_margin(final, held, ref_model)
            summary.update({f"val_{k}_before": v for k, v in before.items()})
            summary.update({f"val_{k}": v for k, v in after.items()})
            trainer.logger.log({"kind": "dpo_eval", "step": trainer.step, **after})
        summary["final"] = str(export_model(final, config.out_dir, tokenizer_path))
    return summary


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help='JSONL file of {"prompt", "chosen", "rejected"} lines')
    parser.add_argument("--init", required=True, help="the policy to start from (and the reference)")
    parser.add_argument("--ref", default=None, help="a different reference model (default: --init)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one next to --init)")
    parser.add_argument("--out", dest="out_dir", default="runs/dpo", help="run folder (default: runs/dpo)")
    parser.add_argument("--beta", type=float, default=0.1, help="(default: 0.1)")
    parser.add_argument("--loss-type", choices=ops.rl.LOSS_TYPES, default="sigmoid", help="(default: sigmoid)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO, sigmoid only")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="pairs held out (default: 0.1)")
    add_config_arguments(parser.add_argument_group("training"), skip=("out_dir",), defaults=TRAIN_DEFAULTS)


def main(args: argparse.Namespace) -> int:
    summary = dpo(config_from_args(args), data=args.data, init=args.init, tokenizer=args.tokenizer,
                  ref_model=load_gpt(args.ref) if args.ref else None, beta=args.beta, loss_type=args.loss_type,
                  label_smoothing=args.label_smoothing, val_fraction=args.val_fraction)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    return 0
