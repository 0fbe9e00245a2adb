"""The training loop every stage reuses.

    trainer = Trainer(model, TrainConfig(...), train_data, val_data)
    summary = trainer.fit()

model: any nn.Module; by default `model(x, y)` returns (logits, loss) (or the loss). A stage with another
objective passes `loss_fn(model, batch) -> loss` or `(loss, {"metric": value})`.
train_data / val_data: anything with `batch(index, batch_size, *, rank=0, world_size=1)` returning the batch
(a tensor, or a tuple/list/dict of tensors) for micro-batch `index`, deterministic in its arguments, rank r
of world_size w reading its own shard. The data position is then one integer, (steps done) x grad_accum,
and a resumed run reads exactly the batches the uninterrupted run would have read.

Per optimizer step: grad_accum micro-batches (forward under bf16 autocast when enabled, backward of
loss / grad_accum; the gradient averaging over processes runs only on the last one), all-reduce of the loss
for logging and for the NaN check, gradient clipping, then the update. The loss and gradient norm are
checked before the update, so a NaN/inf never reaches the weights nor a checkpoint.

Under torchrun, config.parallel picks DDP or FSDP2 (fastllm.train.parallel); with "fsdp" checkpoints are
sharded (torch.distributed.checkpoint), and a run resumes from one with any number of processes.
"""
from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (CheckpointError, capture_rng_state, find_checkpoint, load_checkpoint, restore_rng_state,
                         save_checkpoint, save_sharded_checkpoint, step_dir_name)
from .config import TrainConfig
from .distributed import DistContext, init_distributed
from .log import MetricsLogger
from .optim import build_optimizer, lr_at, set_lr
from .parallel import clip_grad_norm, full_copy, is_fsdp, no_gradient_sync, parallelize, uses_autocast


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the weights were not updated with it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT): a checkpoint of the last completed step was saved before this was raised."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted after step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def default_loss(model: nn.Module, batch):
    """(x, y) -> model(x, y), whose output is (logits, loss) or the loss."""
    x, y = batch
    out = model(x, y)
    return out[1] if isinstance(out, (tuple, list)) else out


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def count_tokens(batch) -> int:
    """Tokens in a batch: the size of its first tensor (the inputs), or of "input_ids" in a dict."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        return count_tokens(batch.get("input_ids", next(iter(batch.values()), None)))
    if isinstance(batch, (tuple, list)) and batch:
        return count_tokens(batch[0])
    return 0


def resolve_precision(device: torch.device, precision: str) -> str:
    """"bf16" when asked or, for "auto", on CUDA devices that support bf16; else "fp32"."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast when asked ("bf16") or, for "auto", on CUDA devices that support bf16; else nothing."""
    if resolve_precision(device, precision) != "bf16":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def warn_changed_settings(path, state: dict, config: dict, dist, ignore=(), stacklevel: int = 4) -> None:
    """Warn (rank 0) when a run resumes from `path` with settings or a process count other than it was saved
    with: it continues, but will not match an uninterrupted run (the data order depends on both). `ignore`:
    settings the caller knows make no difference."""
    saved = state.get("config", {})
    skip = {"resume", "progress", "plot", "device", "activation_checkpointing", *ignore}
    changed = {k: (saved[k], v) for k, v in config.items() if k in saved and saved[k] != v and k not in skip}
    if state.get("world_size", 1) != dist.world_size:
        changed["world_size"] = (state.get("world_size", 1), dist.world_size)
    if changed and dist.is_main:
        warnings.warn(f"resuming {path} with changed settings {changed} (saved, now): the run will not "
                      f"match an uninterrupted one", stacklevel=stacklevel)


class Trainer:
    def __init__(self, model: nn.Module, config: TrainConfig, train_data, val_data=None, *, loss_fn=None,
                 dist: DistContext | None = None, extra_files: dict[str, str] | None = None,
                 run_info: dict | None = None, log_name: str = "metrics"):
        self.config = config
        self.train_data, self.val_data = train_data, val_data
        self.loss_fn = loss_fn or default_loss
        self._owns_dist = dist is None
        self.dist = dist or init_distributed(config.device)
        self.device = self.dist.device
        self.extra_files = dict(extra_files or {})
        self.run_info = dict(run_info or {})
        self.out_dir = Path(config.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        # self.model: the module the caller passed (under fsdp sharded in place): saved, evaluated.
        # self.train_model: what the training forward calls (the DDP wrapper under ddp).
        precision = resolve_precision(self.device, config.precision)
        self.model = model.to(self.device)
        self.train_model = parallelize(self.model, config.parallel, self.dist, precision=precision,
                                       activation_checkpointing=config.activation_checkpointing)
        self.sharded_checkpoints = config.parallel == "fsdp"
        self.optimizer = build_optimizer(self.model, config)
        self.autocast = autocast_context(self.device, precision if uses_autocast(config.parallel, self.dist, precision)
                                         else "fp32")
        self.logger = MetricsLogger(self.out_dir, log_name, enabled=self.dist.is_main, plot=config.plot)
        self.step = 0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.last_eval: dict = {}
        self._stop_requested = False  # set by the signal handler, on this process
        self._stop_agreed = False  # some process asked to stop: all-reduced with the step's loss, same on every rank
        self._saved_step = -1
        self.final_model: nn.Module | None = None  # set by fit(consolidate=True)

        rng = None
        if config.resume:
            rng = self._resume()
        if rng is not None:
            restore_rng_state(rng)
        else:
            # Same seed on every process would give every rank the same dropout masks; offset by rank.
            seed = config.seed + self.dist.rank + (self.step * 1_000_003 if config.resume else 0)
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)

    # ---------------------------------------------------------------------------------------------------
    def _resume(self):
        found = find_checkpoint(self.out_dir) if self.out_dir.exists() else None
        if found is None:
            raise CheckpointError(f"resume=True but there is no checkpoint in {self.out_dir} "
                                  f"(expected {self.ckpt_root}/latest); drop --resume to start a new run")
        ckpt = load_checkpoint(found)
        if ckpt.sharded:  # resharded to this run's processes
            ckpt.load_model(self.model)
            ckpt.load_optimizer(self.optimizer, model=self.model)
        elif is_fsdp(self.model):
            ckpt.load_into_sharded(self.model, self.optimizer)
        else:
            ckpt.load_model(self.model)
            ckpt.load_optimizer(self.optimizer)
        state = ckpt.state
        self.step = state["step"]
        self.tokens_seen = state.get("tokens_seen", 0)
        self.last_checkpoint = ckpt.path
        self._saved_step = self.step
        warn_changed_settings(ckpt.path, state, self.config.to_dict(), self.dist)
        if state.get("data_index", self.step * self.config.grad_accum) != self.step * self.config.grad_accum:
            raise CheckpointError(f"{ckpt.path}: data_index {state['data_index']} is not step {self.step} x "
                                  f"grad_accum {self.config.grad_accum}; resume with the grad_accum it was saved with")
        self.logger.truncate_after(self.step)
        return ckpt.rng_state(self.dist.rank)

    def state(self) -> dict:
        return {"step": self.step, "data_index": self.step * self.config.grad_accum, "tokens_seen": self.tokens_seen,
                "world_size": self.dist.world_size, "config": self.config.to_dict(), "schedule_step": self.step,
                "last_eval": self.last_eval, "run_info": self.run_info}

    def save(self, *, collective: bool = True) -> Path | None:
        """Checkpoint the last completed step (rank 0 writes; every rank's RNG state is gathered when
        `collective`, which needs all ranks to call save at the same step). Sharded checkpoints are always
        collective: without it (a process stopped alone) nothing is saved."""
        if self.sharded_checkpoints and self.dist.enabled and not collective:
            return None
        rng = capture_rng_state()
        rng_states = self.dist.gather_objects(rng) if collective else [rng]
        if self.sharded_checkpoints:
            self.last_checkpoint = save_sharded_checkpoint(
                self.ckpt_root, self.step, dist=self.dist, models={"model": self.model},
                optimizers={"optimizer": self.optimizer},
                state=self.state(), rng_states=rng_states, extra_files=self.extra_files,
                keep=self.config.keep_checkpoints)
        elif not self.dist.is_main:
            self.last_checkpoint = self.ckpt_root / step_dir_name(self.step)  # where rank 0 writes it
        else:
            self.last_checkpoint = save_checkpoint(
                self.ckpt_root, self.step, models={"model": self.model}, optimizers={"optimizer": self.optimizer},
                state=self.state(), rng_states=rng_states, extra_files=self.extra_files,
                keep=self.config.keep_checkpoints)
        self._saved_step = self.step
        return self.last_checkpoint

    # ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss over eval_iters batches (each rank its shard), its perplexity, and the mean of
        each metric loss_fn returns, as val_{name}. A stage with another evaluation overrides this method."""
        if self.val_data is None:
            return {}
        cfg = self.config
        was_training = self.model.training
        self.model.eval()
        loss_sum, metric_sums = torch.zeros((), dtype=torch.float64, device=self.device), {}
        for i in range(cfg.eval_iters):
            batch = to_device(self.val_data.batch(i, cfg.eval_batch_size or cfg.batch_size, rank=self.dist.rank,
                                                  world_size=self.dist.world_size), self.device)
            with self.autocast():
                loss, metrics = self._loss(self.model, batch)
            loss_sum += loss.double()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
        self.model.train(was_training)
        keys = sorted(metric_sums)  # the same keys on every rank: one all-reduce for everything
        totals = torch.stack([loss_sum, *(torch.tensor(metric_sums[k], dtype=torch.float64, device=self.device)
                                          for k in keys)])
        totals = (self.dist.all_reduce_sum(totals) / (cfg.eval_iters * self.dist.world_size)).tolist()
        val_loss = totals[0]
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)),
                **{f"val_{k}": v for k, v in zip(keys, totals[1:])}}

    def _loss(self, model, batch):
        out = self.loss_fn(model, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError(f"loss_fn must return a scalar tensor (or (loss, metrics)), got {type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        return loss, metrics

    def _eval_and_log(self, pbar=None):
        result = self.evaluate()
        if result:
            self.last_eval = {"step": self.step, **result}
            self.logger.log({"kind": "eval", "step": self.step, **result})
            self.logger.flush()
            if pbar is not None:
                pbar.set_postfix_str(f"val {result['val_loss']:.4f}", refresh=False)
        return result

    # ---------------------------------------------------------------------------------------------------
    def fit(self, *, consolidate: bool = False) -> dict:
        """Train to config.steps (from the resumed step), evaluate, checkpoint; returns a summary.
        consolidate: then also keep the trained model with its full weights as self.final_model (see
        consolidated_model), before a process group this trainer owns is closed."""
        cfg = self.config
        started = time.perf_counter()
        if self.step == 0 and self.val_data is not None:
            self._eval_and_log()
        pbar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.dist.is_main),
                    desc="train", dynamic_ncols=True)
        previous = self._install_sigint()
        last = {}
        try:
            while self.step < cfg.steps:
                last = self._train_step()
                if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                    self.logger.log({"kind": "train", "step": self.step, **last})
                pbar.update(1)
                pbar.set_postfix_str(f"loss {last['loss']:.4f}" + (f" val {self.last_eval['val_loss']:.4f}"
                                                                    if self.last_eval else ""), refresh=False)
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < cfg.steps:
                    self._eval_and_log(pbar)
                if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and self.step < cfg.steps:
                    self.save()
                if self._stop_agreed:
                    raise KeyboardInterrupt
            if self.val_data is not None and self.last_eval.get("step") != self.step:
                self._eval_and_log(pbar)
            if self._saved_step != self.step:
                self.save()
            if consolidate:
                self.final_model = self.consolidated_model()
        except KeyboardInterrupt:
            # The signal handler lets the step in flight finish, so the state is consistent and all ranks stop
            # at the same step; a KeyboardInterrupt raised otherwise (a second Ctrl-C) may land mid-update.
            if self._saved_step != self.step and not self._in_update:
                self.save(collective=self._stop_agreed)
            if self.dist.is_main:
                pbar.write(f"interrupted after step {self.step}; latest checkpoint: {self.last_checkpoint}; "
                           f"continue with --resume")
            raise TrainingInterrupted(self.step, self.last_checkpoint) from None
        finally:
            pbar.close()
            self._restore_sigint(previous)
            self.logger.flush()
            if self._owns_dist:
                self.close()
        return {"step": self.step, **{k: v for k, v in last.items() if k in ("loss", "lr")},
                **{k: v for k, v in self.last_eval.items() if k != "step"},
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "seconds": round(time.perf_counter() - started, 1)}

    def consolidated_model(self) -> nn.Module | None:
        """The trained model with its full weights: self.model, or under fsdp (collective: every process calls
        it) an unsharded copy on rank 0's CPU and None on the other ranks. For what a stage does with the
        model after fit() on rank 0 alone (export, sampling, held-out scoring)."""
        return full_copy(self.model) if is_fsdp(self.model) else self.model

    def close(self) -> None:
        """Release the DDP wrapper, then (if this trainer created it) the process group. The order matters: a
        DDP reducer outliving its gloo group hangs in the group's destructor when it is freed later."""
        if self.train_model is not self.model:
            self.train_model = self.model
            gc.collect()
        if self._owns_dist:
            self.dist.close()

    _in_update = False

    def _train_step(self) -> dict:
        cfg, dist = self.config, self.dist
        t0 = time.perf_counter()
        lr = lr_at(self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
        set_lr(self.optimizer, lr)
        self.model.train()
        # [sum of micro-batch losses, stop flag], on the device: nccl reduces only CUDA tensors.
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        tokens, metrics = 0, {}
        for micro in range(cfg.grad_accum):
            index = self.step * cfg.grad_accum + micro
            batch = self.train_data.batch(index, cfg.batch_size, rank=dist.rank, world_size=dist.world_size)
            tokens += count_tokens(batch)
            batch = to_device(batch, self.device)
            # Gradients are averaged over the processes on backward; only the last micro-batch needs it.
            with no_gradient_sync(self.train_model, enabled=micro < cfg.grad_accum - 1):
                with self.autocast():
                    loss, m = self._loss(self.train_model, batch)
                (loss / cfg.grad_accum).backward()
            stats[0] += loss.detach().double()
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / cfg.grad_accum
        stats[1] = float(self._stop_requested)
        dist.all_reduce_sum(stats)  # every rank then agrees on the loss, the NaN verdict and whether to stop
        loss_sum, stop = stats.tolist()
        loss_value = loss_sum / (cfg.grad_accum * dist.world_size)
        self._stop_agreed = stop > 0
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = clip_grad_norm(self.model, cfg.grad_clip)
        bad = [name for name, v in (("loss", loss_value), ("gradient norm", grad_norm))
               if v is not None and not math.isfinite(v)]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            where = (f"the last good checkpoint, left untouched, is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint had been saved yet")
            raise TrainingDiverged(
                f"{bad[0]} is {loss_value if bad[0] == 'loss' else grad_norm} at step {self.step + 1} (lr {lr:.3g}); "
                f"training stopped before the update, {where}. Lower the learning rate, lengthen the warm-up, "
                f"tighten grad_clip or check the data, then resume.")
        self._in_update = True
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._in_update = False
        tokens *= dist.world_size
        self.tokens_seen += tokens
        dt = time.perf_counter() - t0
        record = {"loss": loss_value, "lr": lr, "tokens": self.tokens_seen, "tokens_per_s": tokens / max(dt, 1e-9),
                  "step_s": dt, **metrics}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    # ---------------------------------------------------------------------------------------------------
    def _install_sigint(self):
        """First Ctrl-C (SIGINT) or SIGTERM: finish the current step, checkpoint, stop. A second one: the usual
        KeyboardInterrupt. SIGTERM counts because torchrun turns a Ctrl-C into SIGTERM for its workers (which
        run in their own session), and it is what clusters send before pre-empting a job."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _restore_sigint(self, previous):
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)
