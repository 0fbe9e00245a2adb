"""`fastllm export`: a training checkpoint -> one model folder (config.json, model.safetensors, tokenizer.json)
that `fastllm generate`, GPT.from_pretrained (or ScalarHeadModel.from_pretrained for a reward model) load.

    fastllm export --ckpt runs/fsdp --out runs/fsdp/export      # the run's latest checkpoint
    fastllm export --ckpt runs/fsdp/checkpoints/step_00000500 --out model/

Sharded checkpoints (--parallel fsdp) are read with torch.distributed.checkpoint in this one process, whatever
the number of processes that wrote them; unsharded ones from their safetensors. A stage's training wrapper
(DPO's, whose keys carry "gpt.") exports as the plain GPT.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint

_WRAPPER_PREFIXES = ("", "gpt.")  # a stage's wrapper module around the GPT (dpo.HiddenStates)


def build_model(config: dict):
    """The (randomly initialised) model a checkpoint's config.json describes: a GPT or a reward model."""
    from fastllm.model import GPT, GPTConfig

    from .reward import KIND, ScalarHeadModel

    if config.get("kind") == KIND:
        return ScalarHeadModel(GPT(GPTConfig.from_dict(config["gpt"])))
    return GPT(GPTConfig.from_dict(config))


def _saved_keys(ckpt) -> set[str]:
    if ckpt.sharded:
        return {k[len("model."):] for k in ckpt.sharded_keys() if k.startswith("model.")}
    from safetensors import safe_open

    with safe_open(str(ckpt.path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def export_checkpoint(ckpt_path, out) -> Path:
    """Write the model of the checkpoint `ckpt_path` designates (a run folder, its checkpoints/, a step folder)
    to the folder `out`; returns it."""
    ckpt = load_checkpoint(ckpt_path)  # checks every file against the hashes recorded at save
    config_file = ckpt.path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{ckpt.path} has no config.json (the model's configuration): it cannot be rebuilt")
    model = build_model(json.loads(config_file.read_text()))
    saved, own = _saved_keys(ckpt), set(model.state_dict())
    prefix = next((p for p in _WRAPPER_PREFIXES if {p + k for k in own} <= saved), None)
    if prefix is None:
        raise CheckpointError(f"the weights in {ckpt.path} do not fit the model its config.json describes "
                              f"(e.g. missing {sorted(own - saved)[:3]})")
    ckpt.load_model(model, prefix=prefix)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer = ckpt.path / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a run folder, its checkpoints/ folder, or a step_* folder")
    parser.add_argument("--out", required=True, help="the model folder to write")


def main(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.ckpt, args.out)
    print(f"exported {args.ckpt} to {out}")
    return 0
