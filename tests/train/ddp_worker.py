"""Run by the DDP tests under `torchrun --nproc_per_node=2`: trains TinyLM with the loop's DDP path.

usage: ddp_worker.py OUT_DIR STEPS BATCH_SIZE GRAD_ACCUM [SIGTERM_AT [resume]]
SIGTERM_AT: rank 1 (only) sends itself SIGTERM when it reads that micro-batch index (-1: never)."""
import json
import os
import signal
import sys

import torch

from fastllm.train import TrainConfig, Trainer, TrainingInterrupted
from tiny import Batches, TinyLM, make_tokens


class RecordingBatches(Batches):
    def __init__(self, *args, sigterm_at=-1, **kw):
        super().__init__(*args, **kw)
        self.calls, self.sigterm_at = [], sigterm_at

    def batch(self, index, batch_size, *, rank=0, world_size=1):
        self.calls.append([index, rank, world_size])
        if rank == 1 and index == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().batch(index, batch_size, rank=rank, world_size=world_size)


def main(out_dir, steps, batch_size, grad_accum, sigterm_at=-1, resume=False):
    torch.manual_seed(0)
    model = TinyLM()
    train = RecordingBatches(make_tokens(64, seed=1), sigterm_at=sigterm_at)
    cfg = TrainConfig(out_dir=out_dir, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, min_lr=1e-3,
                      warmup_steps=2, eval_interval=0, eval_iters=2, checkpoint_interval=0, progress=False,
                      plot=False, resume=resume)
    rank = int(os.environ["RANK"])
    result = {"calls": train.calls, "world_size": int(os.environ["WORLD_SIZE"])}
    try:
        result["summary"] = Trainer(model, cfg, train, Batches(make_tokens(16, seed=2))).fit()
    except TrainingInterrupted as e:
        result["interrupted_at"] = e.step
    with open(os.path.join(out_dir, f"rank{rank}{'-resumed' if resume else ''}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:6]), resume=sys.argv[6:7] == ["resume"])
