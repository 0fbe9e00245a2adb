"""Run by test_ddp.py under `torchrun --nproc_per_node=2`: one stage through the real `fastllm` command line, with
a spy on the stage's Trainer so that each rank can report the weights it ends with (only rank 0 exports them).

usage: ddp_cli_worker.py REPORT_PREFIX STAGE [fastllm STAGE arguments ...]
Each rank writes REPORT_PREFIX.rank{r}.pt: its trained parameters, by name, after the CLI returned."""
import importlib
import os
import sys

import torch

from fastllm.cli import COMMANDS, main as fastllm_cli


def main(report_prefix, stage, *args):
    torch.set_num_threads(1)
    module = importlib.import_module(COMMANDS[stage][0])
    trainers = []

    class SpiedTrainer(module.Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            trainers.append(self)

    module.Trainer = SpiedTrainer
    code = fastllm_cli([stage, *args])
    assert code == 0 and len(trainers) == 1, (code, len(trainers))
    params = {k: v.detach().clone() for k, v in trainers[0].model.named_parameters()}
    torch.save(params, f"{report_prefix}.rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
