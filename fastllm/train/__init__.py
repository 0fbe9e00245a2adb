"""Training: one loop (fastllm.train.loop.Trainer) and the stages built on it (pretrain; sft, reward, ppo, dpo next).

How a stage plugs in:
- a batch source: any object with batch(index, batch_size, *, rank=0, world_size=1), deterministic in its
  arguments (the data position is then just the step, and resume is exact);
- an objective: Trainer(..., loss_fn=f) with f(model, batch) -> loss or (loss, {"metric": value}); metrics are
  averaged and logged (val_* in evaluation). A frozen reference model is simply captured by f;
- another evaluation: subclass Trainer and override evaluate() -> {"val_loss": ..., ...};
- a loop of its own (PPO's rollouts): reuse build_optimizer / lr_at, save_checkpoint(models={...},
  optimizers={...}, state=...) / load_checkpoint, MetricsLogger (plot_keys picks the PNG panels),
  init_distributed, and the CLI registry (fastllm.cli.COMMANDS: module with add_arguments and main).
"""
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import DistContext, init_distributed
from .log import MetricsLogger
from .loop import Trainer, TrainingDiverged, TrainingInterrupted
from .optim import build_optimizer, lr_at, param_groups

__all__ = ["Checkpoint", "CheckpointError", "DistContext", "MetricsLogger", "TrainConfig", "Trainer",
           "TrainingDiverged", "TrainingInterrupted", "build_optimizer", "init_distributed", "load_checkpoint",
           "lr_at", "param_groups", "resolve_checkpoint", "save_checkpoint"]
