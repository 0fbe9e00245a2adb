"""Worker for test_trl.py's DDP test (run by torchrun in 2 processes, gloo): a DPOTrainer, patched vs unpatched.

Each rank trains on its own half of the data. After every backward (the pre-optimizer-step callback, so after
DDP's all-reduce) the gradients are recorded; the worker then checks, on each rank, that the patched run's
all-reduced gradients and logs match the unpatched run's (the error-ratio rule of test_trl.py against a
float64 run), that both ranks hold the same all-reduced gradients, and that the ranks' own data differ (so the
all-reduce had something to do). Prints "rank R: DDP OK" on success.
"""
import torch
import torch.distributed as dist
import transformers

from test_trl import ULPS, assert_same_logs, build_tokenizer, build_trainer, dpo_recipe, logged_steps  # noqa: I001


class GradientRecorder(transformers.TrainerCallback):
    """The flattened all-reduced gradient of every optimizer step."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append(torch.cat([p.grad.detach().double().flatten() for p in self.model.parameters()
                                     if p.grad is not None]))


def run(recipe, tokenizer, state, **kwargs):
    trainer = build_trainer(recipe, tokenizer, state=state, **kwargs)
    recorder = GradientRecorder(trainer.model)
    trainer.add_callback(recorder)
    return logged_steps(trainer), recorder.steps, trainer


def main():
    tokenizer = build_tokenizer()
    def recipe():
        return dpo_recipe("llama", tokenizer, loss_type=["sigmoid", "ipo"], per_device_train_batch_size=2)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in recipe()[0].state_dict().items()}
    ref_logs, ref_grads, _ = run(recipe, tokenizer, state, dtype=torch.float64)
    base_logs, base_grads, _ = run(recipe, tokenizer, state)
    logs, grads, trainer = run(recipe, tokenizer, state, patch=True)
    rank = dist.get_rank()
    assert dist.get_world_size() == 2 and trainer.accelerator.num_processes == 2
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(trainer.model_wrapped)
    assert_same_logs(logs, base_logs, ref_logs)
    assert len(grads) == len(base_grads) == len(ref_grads) >= 2
    for step, (p, u, r) in enumerate(zip(grads, base_grads, ref_grads)):
        error, yardstick = (p - r).norm().item(), (u - r).norm().item()
        assert error <= 2 * yardstick + ULPS * r.norm().item(), (
            f"rank {rank} step {step}: patched gradient error {error:.3g} vs unpatched {yardstick:.3g}")
        both = [torch.empty_like(p) for _ in range(2)]
        dist.all_gather(both, p)
        assert torch.equal(both[0], both[1]), f"step {step}: the ranks' all-reduced gradients differ"
    # the ranks saw different pairs: their log-probs differ before the all-reduce averages the gradients
    batch = next(iter(trainer.get_train_dataloader()))["input_ids"].double()
    sizes = [torch.zeros(2, dtype=torch.long) for _ in range(2)]
    dist.all_gather(sizes, torch.tensor(batch.shape))
    if torch.equal(sizes[0], sizes[1]):
        batches = [torch.empty_like(batch) for _ in range(2)]
        dist.all_gather(batches, batch)
        assert not torch.equal(batches[0], batches[1]), "both ranks trained on the same batch"
    print(f"rank {rank}: DDP OK", flush=True)


if __name__ == "__main__":
    main()
    # accelerate opened the process group; left open, gloo's threads can outlive the interpreter's teardown and
    # abort the process after its work passed (seen once: "terminate called without an active exception")
    dist.destroy_process_group()
