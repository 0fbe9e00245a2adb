"""TrainConfig: every knob of the training loop in one dataclass, shared by all stages (pretrain, sft, ...).

The CLI builds its flags from the fields (`add_config_arguments`), so a new field is a new flag with no
other edit; each field's `help` metadata is the flag's help text.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    out_dir: str = _f("out", "directory for checkpoints, logs and plots")
    steps: int = _f(1000, "number of optimizer steps (the cosine schedule ends here)")
    batch_size: int = _f(8, "sequences per micro-batch on each process")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    lr: float = _f(3e-4, "peak learning rate")
    min_lr: float = _f(3e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(100, "linear warm-up steps from 0 to lr")
    weight_decay: float = _f(0.1, "AdamW weight decay for matrices (never for biases and norms)")
    decay_embeddings: bool = _f(False, "also apply weight decay to embedding tables")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0 = no clipping)")
    precision: str = _f("auto", "auto | bf16 | fp32: bf16 autocast (auto = bf16 on GPUs that support it)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    parallel: str = _f("ddp", "ddp | fsdp, under torchrun: ddp keeps a whole model, its gradients and optimizer "
                              "state on every process; fsdp (FSDP2) shards them over the processes (sharded "
                              "checkpoints; with bf16: bf16 parameters, fp32 gradient reduction)")
    activation_checkpointing: bool = _f(False, "recompute each transformer block's activations in the backward "
                                               "instead of keeping them (less memory, about 1/3 more compute)")
    eval_interval: int = _f(100, "evaluate on the validation split every N steps (0 = only at the end)")
    eval_iters: int = _f(20, "validation batches per evaluation")
    eval_batch_size: int = _f(0, "validation batch size (0 = batch_size)")
    log_interval: int = _f(1, "write a train record every N steps")
    checkpoint_interval: int = _f(500, "save a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "how many step checkpoints to keep on disk")
    seed: int = _f(1337, "random seed (process r uses seed + r for dropout)")
    resume: bool = _f(False, "continue from the latest checkpoint in out_dir")
    progress: bool = _f(True, "show a tqdm progress bar")
    plot: bool = _f(True, "write a PNG loss curve next to the logs")

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ValueError naming the field, the expectation and the value received."""
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "grad_accum", "eval_iters"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup_steps", "eval_interval", "eval_batch_size", "log_interval", "checkpoint_interval",
                     "keep_checkpoints"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "an integer >= 1")
        need(self.lr > 0, "lr", "> 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"between 0 and lr={self.lr}")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(0 <= self.beta1 < 1, "beta1", "in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "in [0, 1)")
        need(self.eps > 0, "eps", "> 0")
        need(self.grad_clip >= 0, "grad_clip", ">= 0")
        need(self.precision in ("auto", "bf16", "fp32"), "precision", "one of 'auto', 'bf16', 'fp32'")
        need(self.parallel in ("ddp", "fsdp"), "parallel", "one of 'ddp', 'fsdp'")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             "'auto', 'cpu', 'cuda' or 'cuda:N'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig, *, skip=(), defaults=None):
    """One flag per dataclass field (`--batch-size`, bools as `--flag/--no-flag`); values land in args under
    the field's name. `defaults` overrides the dataclass defaults (a stage's own choice of sizes)."""
    defaults = dict(defaults or {})
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata.get("help", "") + f" (default: {default})"
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help, metavar=f.name.upper())


def config_from_args(args: argparse.Namespace, cls=TrainConfig, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
