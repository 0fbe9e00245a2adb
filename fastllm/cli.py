"""The `fastllm` command: one subcommand per entry of COMMANDS.

A stage adds itself with one line in COMMANDS: the module must define `add_arguments(parser)` and
`main(args) -> int`. Modules are imported only to build the parser, so `fastllm --help` stays cheap to keep.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fastllm.demo.pipeline", "the whole pipeline at small scale: tokenizer, pretrain, SFT, reward, PPO, GRPO, DPO"),
    "pretrain": ("fastllm.train.pretrain", "pretrain a GPT on a corpus (default: the embedded stdlib corpus)"),
    "sft": ("fastllm.train.sft", "supervised fine-tuning on prompt/response pairs (JSONL)"),
    "reward": ("fastllm.train.reward", "train a reward model on preference pairs (JSONL)"),
    "ppo": ("fastllm.train.rl", "RL: PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++, GSPO against a reward model or "
                                "reward functions"),
    "dpo": ("fastllm.train.dpo", "direct preference optimisation against a frozen reference"),
    "generate": ("fastllm.train.generate", "sample text from a trained checkpoint"),
    "export": ("fastllm.train.export", "write a checkpoint (sharded or not) as one safetensors model folder"),
}


def _user_errors():
    """Errors that mean "the user asked for something wrong": printed as one line, no traceback."""
    from fastllm.train import CheckpointError, TrainingDiverged

    return (ValueError, FileNotFoundError, NotADirectoryError, CheckpointError, TrainingDiverged)


def build_parser(commands: dict[str, tuple[str, str]] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastllm",
                                     description="Fast LLM training and alignment on fastllm's kernels.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help) in commands.items():
        p = sub.add_parser(name, help=help, description=help)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(f"fastllm {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if args.traceback or os.environ.get("FASTLLM_TRACEBACK") == "1":
            raise
        print(f"fastllm {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
