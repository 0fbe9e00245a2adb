"""Supervised fine-tuning: prompt/response pairs, loss on the response tokens only, packed batches.

    fastllm sft --data sft.jsonl --init runs/pretrain --out runs/sft
    torchrun --nproc_per_node=2 -m fastllm sft --data sft.jsonl --init runs/pretrain --out runs/sft

Batches are packed, not padded: the micro-batch's sequences sit side by side in one row with cu_seqlens, so
attention is varlen (fastllm.ops.attention_varlen: each sequence sees only itself, its positions restart at
0) and no compute is spent on padding. The labels are the next tokens of the response (its <|end|> included)
and -100 on the prompt, and the loss is the model's fused linear cross-entropy (the logits never exist),
a mean over the micro-batch's response tokens.
"""
from __future__ import annotations

import argparse
import json

from .chat import (IGNORE_INDEX, ChatTemplate, SFTExample, batch_indices, export_model, find_tokenizer, load_gpt,
                   pack, read_sft, split_holdout)
from .config import TrainConfig, add_config_arguments, config_from_args
from .loop import Trainer

TRAIN_DEFAULTS = dict(steps=200, batch_size=16, lr=3e-4, min_lr=3e-5, warmup_steps=10, weight_decay=0.0,
                      eval_interval=50, eval_iters=5, checkpoint_interval=100)


def sft_sequence(example: SFTExample) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: the model reads prompt + response minus its last token and is
    scored on predicting the response tokens only."""
    tokens = example.prompt + example.response
    labels = [IGNORE_INDEX] * (len(example.prompt) - 1) + example.response
    return tokens[:-1], labels


class SFTData:
    """Packed micro-batches of SFT examples, deterministic in (index, rank, world_size) as the loop requires."""

    def __init__(self, examples: list[SFTExample], seed: int = 0):
        if not examples:
            raise ValueError("SFTData needs at least one example")
        self.examples, self.seed = examples, seed
        self.sequences = [sft_sequence(e) for e in examples]

    def __len__(self):
        return len(self.examples)

    def batch(self, index: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> dict:
        chosen = batch_indices(len(self.sequences), index, batch_size, self.seed, rank, world_size)
        return pack([self.sequences[i][0] for i in chosen], [self.sequences[i][1] for i in chosen])


def sft_loss(model, batch):
    """The model's fused linear cross-entropy on the packed batch (response tokens only)."""
    _, loss = model(batch["input_ids"], batch["labels"], cu_seqlens=batch["cu_seqlens"])
    n = int((batch["labels"] != IGNORE_INDEX).sum())
    return loss, {"response_tokens": n}


def sft(config: TrainConfig, *, data=None, init=None, model=None, tokenizer=None, examples=None,
        val_fraction: float = 0.05) -> dict:
    """Fine-tune `model` (or the GPT saved under `init`) on SFT examples; returns the loop's summary plus
    "final", the exported model folder (out_dir/final: config.json, model.safetensors, tokenizer.json).

    data: a JSONL file of {"prompt", "response"} lines (or pass `examples`, already tokenised). tokenizer: a
    tokenizer.json path (default: the one next to `init`). val_fraction of the examples are held out for
    the validation loss."""
    from fastllm.data import load_tokenizer

    if model is None:
        if init is None:
            raise ValueError("sft needs a model: pass model= or init= (a pretrain run folder or checkpoint)")
        model = load_gpt(init)
    tokenizer_path = find_tokenizer(init, tokenizer) if (init is not None or tokenizer) else None
    if examples is None:
        if data is None or tokenizer_path is None:
            raise ValueError("sft needs data= (a JSONL file) and a tokenizer, or examples=")
        template = ChatTemplate(load_tokenizer(tokenizer_path))
        examples = read_sft(data, template, model.config.block_size)
    train, held = split_holdout(examples, val_fraction, config.seed) if val_fraction > 0 else (examples, [])
    trainer = Trainer(model, config, SFTData(train, config.seed), SFTData(held, config.seed + 1) if held else None,
                      loss_fn=sft_loss, log_name="sft",
                      extra_files={"tokenizer.json": str(tokenizer_path)} if tokenizer_path else None,
                      run_info={"stage": "sft", "data": str(data), "init": str(init), "examples": len(train),
                                "held_out": len(held)})
    summary = trainer.fit(consolidate=True)  # under fsdp the full weights come to rank 0
    if trainer.dist.is_main:
        summary["final"] = str(export_model(trainer.final_model, config.out_dir, tokenizer_path))
    return summary


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help='JSONL file of {"prompt": ..., "response": ...} lines')
    parser.add_argument("--init", required=True, help="the model to fine-tune: a run folder, checkpoint or export")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one next to --init)")
    parser.add_argument("--out", dest="out_dir", default="runs/sft", help="run folder (default: runs/sft)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="examples held out (default: 0.05)")
    add_config_arguments(parser.add_argument_group("training"), skip=("out_dir",), defaults=TRAIN_DEFAULTS)


def main(args: argparse.Namespace) -> int:
    summary = sft(config_from_args(args), data=args.data, init=args.init, tokenizer=args.tokenizer,
                  val_fraction=args.val_fraction)
    if "final" in summary:
        print(json.dumps(summary))
    return 0
