"""`fastllm generate`: sample from a trained checkpoint (a run folder, its checkpoints/ folder, or one step)."""
from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import STATE_FILE, CheckpointError, load_checkpoint, resolve_checkpoint


def load_for_generation(ckpt: str, device: str = "cpu"):
    """(model, tokenizer path) of the checkpoint `ckpt` designates."""
    from fastllm.model import GPT

    path = resolve_checkpoint(ckpt)
    if (path / STATE_FILE).is_file() and load_checkpoint(path).sharded:  # checks every file's recorded hash
        raise CheckpointError(f"{path} is a sharded (--parallel fsdp) checkpoint: write it as a model folder with "
                              f"`fastllm export --ckpt {path} --out DIR`, then sample with `fastllm generate --ckpt "
                              f"DIR` (a finished run also has one in its final/ folder)")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} cannot be sampled from: {name} is missing (a checkpoint written by "
                                  f"`fastllm pretrain` has config.json, model.safetensors and tokenizer.json)")
    try:
        model = GPT.from_pretrained(str(path), device=device)
    except ValueError as e:
        raise CheckpointError(f"cannot load the model in {path}: {e}") from e
    return model, path / "tokenizer.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a run folder, its checkpoints/ folder, or a step_* folder")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue; repeat the flag for several prompts (one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="(default: 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="0 = off (default: 50)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")


def main(args: argparse.Namespace) -> int:
    from fastllm.data import EOT_TOKEN, decode, encode, load_tokenizer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ValueError(f"--top-k must be >= 0 and --top-p in (0, 1], got {args.top_k} and {args.top_p}")
    model, tokenizer_path = load_for_generation(args.ckpt, args.device)
    tok = load_tokenizer(tokenizer_path)
    prompts = [encode(tok, p) for p in args.prompt]
    for text, ids in zip(args.prompt, prompts):
        if not ids:
            raise ValueError(f"--prompt {text!r} is empty after tokenisation")
        if len(ids) + args.max_new_tokens > model.config.block_size:
            raise ValueError(f"--prompt {text[:30]!r}... has {len(ids)} tokens; with --max-new-tokens "
                             f"{args.max_new_tokens} that exceeds the model's context of {model.config.block_size}")
    generator = torch.Generator(device=model.lm_head_weight.device).manual_seed(args.seed)
    out = model.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                         top_p=args.top_p if args.top_p < 1 else None, stop_tokens=(tok.token_to_id(EOT_TOKEN),),
                         generator=generator)
    for i, (text, new) in enumerate(zip(args.prompt, out.tokens)):
        if len(prompts) > 1:
            print(f"--- sample {i} ---", file=sys.stderr)
        print(text + decode(tok, new, skip_special=True))
    return 0
