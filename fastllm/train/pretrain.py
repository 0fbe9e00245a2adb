"""Pretraining: corpus -> tokenizer + token files (fastllm.data) -> GPT (fastllm.model) -> the training loop.

    fastllm pretrain --out runs/small                 # the embedded corpus (the stdlib's sources)
    fastllm pretrain --data docs/ --out runs/docs     # a file, folder or JSONL; or a prepared dataset folder
    fastllm pretrain --out runs/small --resume        # continue exactly where it stopped
    torchrun --nproc_per_node=2 -m fastllm pretrain --out runs/ddp
    torchrun --nproc_per_node=2 -m fastllm pretrain --parallel fsdp --out runs/fsdp   # sharded (FSDP2)

The defaults train a 1.3M-parameter GPT-2-style model (4 layers, 128 wide, 128-token context, 4096-token
BPE) on 2 CPU cores in a few minutes; the validation loss is evaluated and logged as it goes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, find_checkpoint
from .config import TrainConfig, add_config_arguments, config_from_args
from .distributed import init_distributed
from .loop import Trainer

# The loop's defaults are sized for GPUs; these suit the small CPU model (tried on 2 cores: see the README).
TRAIN_DEFAULTS = dict(steps=300, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=30, weight_decay=0.1,
                      eval_interval=50, eval_iters=10, checkpoint_interval=100, log_interval=1)
MODEL_DEFAULTS = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0)
PRESETS = ("gpt2", "llama")


def prepare_data(data: str, out_dir: Path, *, vocab_size: int, max_bytes: int | None, seed: int, dist,
                 show_progress: bool = True) -> Path:
    """The dataset folder to train on: `data` itself when it is already prepared (has meta.json), else
    out_dir/data, prepared there by rank 0 unless a previous run (same source and vocabulary) left it."""
    from fastllm.data import load_meta, prepare_dataset

    if data != "default" and (Path(data) / "meta.json").is_file():
        return Path(data)
    if data != "default" and not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder (or pass 'default' for the embedded corpus)")
    folder = out_dir / "data"
    want = "default: Python standard library sources" if data == "default" else str(Path(data).resolve())
    if dist.is_main:
        meta = load_meta(folder) if (folder / "meta.json").is_file() else None
        if not (meta and meta.get("source") == want and meta.get("requested_vocab_size") == vocab_size
                and meta.get("config", {}).get("max_bytes") == max_bytes):
            prepare_dataset(folder, None if data == "default" else data, vocab_size=vocab_size, max_bytes=max_bytes,
                            seed=seed, show_progress=show_progress)
    dist.barrier()
    return folder


def model_config(args: argparse.Namespace, vocab_size: int):
    from fastllm.model import GPTConfig

    make = GPTConfig.gpt2_style if args.preset == "gpt2" else GPTConfig.llama_style
    return make(vocab_size=vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_kv_head,
                n_embd=args.n_embd, block_size=args.block_size, dropout=args.dropout, use_kernels=args.kernels)


def pretrain(config: TrainConfig, *, data: str = "default", preset_args: argparse.Namespace | None = None,
             vocab_size: int = 4096, max_bytes: int | None = None, sample_prompt: str | None = "def ") -> dict:
    """The Python API behind `fastllm pretrain`. preset_args: the model flags (see add_arguments)."""
    from fastllm.data import TokenDataset, load_meta
    from fastllm.model import GPT, GPTConfig

    args = preset_args or parser_defaults()
    out = Path(config.out_dir)
    if config.resume and (not out.exists() or find_checkpoint(out) is None):  # fail before preparing any data
        raise CheckpointError(f"resume=True but there is no checkpoint in {out} (expected {out}/checkpoints/latest); "
                              f"drop --resume to start a new run")
    dist = init_distributed(config.device)
    try:
        folder = prepare_data(data, out, vocab_size=vocab_size, max_bytes=max_bytes, seed=config.seed, dist=dist,
                              show_progress=config.progress and dist.is_main)
        meta = load_meta(folder)
        # On resume the model is the checkpoint's, whatever the flags say now.
        ckpt = find_checkpoint(out) if config.resume and out.exists() else None
        if ckpt is not None and (ckpt / "config.json").is_file():
            mcfg = GPTConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
        else:
            mcfg = model_config(args, meta["vocab_size"])
        torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = GPT(mcfg)
        train = TokenDataset(folder / meta["files"]["train"], mcfg.block_size, seed=config.seed)
        val = TokenDataset(folder / meta["files"]["val"], mcfg.block_size, seed=config.seed)
        if dist.is_main:
            print(f"model: {model.num_params() / 1e6:.2f}M parameters ({args.preset if ckpt is None else 'resumed'}: "
                  f"{mcfg.n_layer} layers, {mcfg.n_embd} wide, context {mcfg.block_size}, vocab {mcfg.vocab_size}); "
                  f"data: {train.num_tokens:,} train / {val.num_tokens:,} val tokens from {folder}", file=sys.stderr)
        trainer = Trainer(model, config, train, val, dist=dist,
                          extra_files={"tokenizer.json": str(folder / meta["files"]["tokenizer"])},
                          run_info={"stage": "pretrain", "data": str(folder)})
        try:
            summary = trainer.fit(consolidate=True)
            model = trainer.final_model  # under fsdp: the full weights, on rank 0
        finally:
            trainer.close()  # before dist.close(): see Trainer.close
        if dist.is_main:
            if config.parallel == "fsdp":  # sharded checkpoints: `--init runs/pretrain` of the next stage reads final/
                from .chat import export_model

                summary["final"] = str(export_model(model, out, folder / meta["files"]["tokenizer"]))
            evals = [r for r in trainer.logger.records() if r["kind"] == "eval"]
            if evals:
                summary["val_loss_first"] = evals[0]["val_loss"]
            if sample_prompt:
                summary["sample"] = sample(model, folder / meta["files"]["tokenizer"], sample_prompt, 60, seed=0)
        return summary
    finally:
        dist.close()


def sample(model, tokenizer_path, prompt: str, max_new_tokens: int, *, temperature: float = 0.8,
           top_k: int | None = 50, top_p: float | None = None, seed: int = 0) -> str:
    from fastllm.data import EOT_TOKEN, decode, encode, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    ids = encode(tok, prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenisation; give at least one character")
    max_new_tokens = min(max_new_tokens, model.config.block_size - len(ids))
    if max_new_tokens < 1:
        raise ValueError(f"the prompt has {len(ids)} tokens, no room left in the context of {model.config.block_size}")
    device = model.lm_head_weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate([ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_tokens=(tok.token_to_id(EOT_TOKEN),), generator=gen)
    return prompt + decode(tok, out.tokens[0], skip_special=True)


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="default",
                        help="'default' (the Python standard library's sources), a text/JSONL file or folder, or a "
                             "dataset folder already prepared by fastllm.data.prepare_dataset (default: default)")
    parser.add_argument("--out", dest="out_dir", default="runs/pretrain", help="run folder (default: runs/pretrain)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: 4096)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="read at most this many bytes of the corpus, for quick runs (default: all)")
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=PRESETS, default="gpt2",
                       help="gpt2: LayerNorm, learned positions, GELU; llama: RMSNorm, RoPE, SwiGLU (default: gpt2)")
    for name, default in MODEL_DEFAULTS.items():
        model.add_argument("--" + name.replace("_", "-"), dest=name, type=type(default), default=default,
                           help=f"(default: {default})")
    model.add_argument("--n-kv-head", type=int, default=None, help="key/value heads, for grouped-query attention")
    model.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                       help="run the model on fastllm's kernels (--no-kernels: plain PyTorch) (default: on)")
    parser.add_argument("--sample-prompt", default="def ", help="print a sample continuing this text at the end")
    add_config_arguments(parser.add_argument_group("training"), skip=("out_dir",), defaults=TRAIN_DEFAULTS)


def parser_defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([])


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    summary = pretrain(config, data=args.data, preset_args=args, vocab_size=args.vocab_size, max_bytes=args.max_bytes,
                       sample_prompt=args.sample_prompt or None)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    if "sample" in summary:
        print("--- sample ---\n" + summary.pop("sample") + "\n--------------", file=sys.stderr)
    if summary.get("checkpoint"):
        first, last = summary.get("val_loss_first"), summary.get("val_loss")
        if first is not None and last is not None:
            print(f"validation loss {first:.3f} -> {last:.3f} (perplexity {summary.get('val_ppl', float('nan')):.1f}) "
                  f"in {summary['step']} steps, {summary['seconds']} s", file=sys.stderr)
        print(json.dumps(summary))
    return 0
