"""Run by tests/parallel/test_fsdp.py under `torchrun --nproc_per_node=2` (gloo, CPU).

usage: fsdp_worker.py OUT_DIR main|kill|resume
main:   the FSDP runs the test compares with one process (GPT-2 / Llama presets, bf16 policy, SFT, DPO), a
        Ctrl-C and resume, the per-rank memory of DDP vs FSDP, the fused losses on sharded weights,
        generation in `unsharded`, and a patched Hugging Face Llama; results in OUT_DIR/results.json.
kill:   a run whose rank 0 is killed (SIGKILL) in the middle of writing its step-10 checkpoint.
resume: resumes the killed run, and two one-process runs (a sharded and a safetensors checkpoint) on 2;
        then `fastllm pretrain --parallel fsdp` end to end (tokenizer, data, training, final/, sample)."""
import copy
import gc
import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastllm.train import TrainingInterrupted, build_optimizer
from fastllm.train import checkpoint as ckpt_module
from fastllm.train.distributed import init_distributed
from fastllm.train import collectives
from fastllm.train.parallel import full_state_dict, head_weight, local_bytes, parallelize, unsharded
from runs import (CLI_PRETRAIN, STEPS, config, head_loss, pretrain_run, reference_head_grads, rows, run_stages,
                  tiny_gpt)


def save_full(trainer, path):
    state = full_state_dict(trainer.model)  # collective
    if state is not None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def memory(dist):
    """Per-rank bytes of parameters + gradients + AdamW state after one step, DDP vs FSDP, 8 blocks."""
    out = {}
    for mode in ("ddp", "fsdp"):
        model = tiny_gpt("llama", n_layer=8, n_embd=64)
        trained = parallelize(model, mode, dist)
        optimizer = build_optimizer(model, config("unused", world_size=2))
        x, y = rows(dist.rank)
        trained(x, y)[1].backward()
        optimizer.step()
        out[mode] = local_bytes(model, optimizer)
        del trained, optimizer, model
        gc.collect()  # the DDP reducer must go before the process group does
    return out


def fused_losses(dist):
    """Gradient error of each fused loss on a sharded model vs one process, with the head weight read in the
    root's scope and as a sharded DTensor; and what passing the DTensor directly raises."""
    from torch.distributed.tensor import DTensor

    from fastllm import ops

    errors, raised = {}, {}
    for preset in ("gpt2", "llama"):  # tied and untied head
        model = tiny_gpt(preset)
        reference = {kind: reference_head_grads(model, kind) for kind in ("cross_entropy", "token_logprobs", "ppo")}
        parallelize(model, "fsdp", dist)
        x, y = rows(dist.rank)
        for kind, expected in reference.items():
            for where in ("scope", "dtensor"):
                hidden = model.hidden_states(x)
                if where == "dtensor":
                    model.reshard()
                    assert isinstance(model.lm_head_weight, DTensor)
                head_loss(kind, hidden, head_weight(model.lm_head_weight), y).backward()
                errors[f"{preset}/{kind}/{where}"] = max(
                    (p.grad.full_tensor() - expected[n]).abs().max().item() / (1 + expected[n].abs().max().item())
                    for n, p in model.named_parameters())
                model.zero_grad(set_to_none=True)
        hidden = model.hidden_states(x)
        model.reshard()
        try:
            ops.linear_cross_entropy(hidden, model.lm_head_weight, y).backward()
            raised[preset] = None
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            raised[preset] = f"{type(e).__name__}: {e}"
        model.zero_grad(set_to_none=True)
    return errors, raised


def gloo_collectives(dist):
    """fastllm's FSDP collectives on gloo (shared memory on one host, broadcast and send/recv across hosts)
    against torch's own, on odd sizes in fp32 and bf16: the all-gather bit for bit (also as an async Work),
    the reduce-scatter (sum, average) to the output dtype's rounding (relative error). The shared-memory channel here is 4 KiB, so one call
    moves many pieces and both mailbox sets; the calls run back to back, reusing them."""
    import torch.distributed as torch_dist

    group, out = torch_dist.group.WORLD, {}
    small = collectives.SharedMemoryChannel.open(group, nbytes=4096)
    out["shared_memory_opened"] = small is not None and isinstance(
        collectives.fsdp_collectives(group)[0], collectives.SharedMemoryAllGather)
    out["left_in_dev_shm"] = [f for f in os.listdir(collectives.SHM_FOLDER) if f.startswith("fastllm-collectives-")]
    # Where some rank cannot map rank 0's file (another host, another /dev/shm), every rank falls back.
    from_file = torch.UntypedStorage.from_file
    if dist.rank == 1:
        torch.UntypedStorage.from_file = lambda *args, **kwargs: (_ for _ in ()).throw(OSError("not this host"))
    try:
        out["fallback_when_one_rank_cannot_map"] = collectives.SharedMemoryChannel.open(group) is None
    finally:
        torch.UntypedStorage.from_file = from_file
    kinds = {"gloo": (collectives.GlooAllGather(), collectives.GlooReduceScatter()),
             "shm": (collectives.SharedMemoryAllGather(small), collectives.SharedMemoryReduceScatter(small))}
    g = torch.Generator().manual_seed(dist.rank)
    world = dist.world_size
    for kind, (all_gather, reduce_scatter) in kinds.items():
        for dtype in (torch.float32, torch.bfloat16):
            for numel in (1, 1001, 4099):  # under one piece, several pieces, a piece and a ragged end
                shard = torch.randn(numel, generator=g).to(dtype)
                expected = torch.empty(numel * world, dtype=dtype)
                torch_dist.all_gather_into_tensor(expected, shard)
                got = torch.full((numel * world,), float("nan"), dtype=dtype)
                all_gather(got, shard, group)
                in_place = torch.full((numel * world,), float("nan"), dtype=dtype)  # FSDP's layout: input in output
                in_place.narrow(0, numel * dist.rank, numel).copy_(shard)
                work = all_gather(in_place, in_place.narrow(0, numel * dist.rank, numel), group, async_op=True)
                work.wait()
                out[f"{kind}_all_gather_{dtype}_{numel}"] = (torch.equal(got, expected) and torch.equal(in_place, expected)
                                                            and isinstance(work, torch_dist.Work))
                full = torch.randn(numel * world, generator=g).to(dtype)
                reference = torch.empty(numel, dtype=torch.float64)
                torch_dist.reduce_scatter_tensor(reference, full.double(), op=torch_dist.ReduceOp.SUM)
                for name, op in (("sum", torch_dist.ReduceOp.SUM), ("avg", torch_dist.ReduceOp.AVG)):
                    got = torch.full((numel,), float("nan"), dtype=dtype)
                    reduce_scatter(got, full, group, op)
                    expect = reference / (world if name == "avg" else 1)
                    relative = (got.double() - expect).abs() / expect.abs().clamp_min(1e-30)
                    out[f"{kind}_reduce_scatter_{name}_{dtype}_{numel}"] = relative.max().item()
    return out


def generation(dist):
    model = tiny_gpt("llama")
    full = copy.deepcopy(model)
    parallelize(model, "fsdp", dist)
    prompts, new_tokens = [[1, 2, 3], [4, 5 + dist.rank]], 6 - 3 * dist.rank  # the ranks decode apart
    with unsharded(model):
        sharded = model.generate(prompts, new_tokens, temperature=0).tokens
    from torch.distributed.tensor import DTensor

    return {"equal": sharded == full.generate(prompts, new_tokens, temperature=0).tokens,
            "resharded_after": isinstance(model.lm_head_weight, DTensor)}


def several_models_checkpoint(dist, root):
    """A PPO-like sharded checkpoint (policy + critic, an optimizer each) saved and loaded into fresh shards."""
    from fastllm.train.checkpoint import load_checkpoint, save_sharded_checkpoint

    def build(seed):
        models = {"model": tiny_gpt("llama", seed=seed), "critic": tiny_gpt("gpt2", seed=seed + 1)}
        optimizers = {}
        for name, key in (("model", "optimizer"), ("critic", "critic_optimizer")):
            parallelize(models[name], "fsdp", dist)
            optimizers[key] = build_optimizer(models[name], config("unused", world_size=2))
            x, y = rows(dist.rank)
            models[name](x, y)[1].backward()
            optimizers[key].step()
        return models, optimizers

    owners = {"critic_optimizer": "critic"}
    models, optimizers = build(0)
    save_sharded_checkpoint(root, 3, dist=dist, models=models, optimizers=optimizers, owners=owners)
    fresh, fresh_optimizers = build(10)
    ckpt = load_checkpoint(root)
    for name, module in fresh.items():
        ckpt.load_model(module, name)
    for key, opt in fresh_optimizers.items():
        ckpt.load_optimizer(opt, key, model=fresh[owners.get(key, "model")])
    same = all(torch.equal(a.full_tensor(), b.full_tensor()) for name in models
               for a, b in zip(models[name].parameters(), fresh[name].parameters()))
    for key in optimizers:
        for a, b in zip(optimizers[key].state.values(), fresh_optimizers[key].state.values()):
            same &= all(torch.equal(a[k].full_tensor(), b[k].full_tensor()) for k in ("exp_avg", "exp_avg_sq"))
    return same


def hugging_face(dist):
    """Patched HF Llama under FSDP2 vs the unpatched one in one process: per-step losses of 3 AdamW steps."""
    import torch.distributed as torch_dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastllm.integrations.transformers import apply

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    reference = copy.deepcopy(model)
    apply(model)
    parallelize(model, "fsdp", dist)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference)]
    out = {"sharded": [], "unsharded": []}
    for step in range(3):
        x, y = rows(dist.rank, seed=10 + step)
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        mean = loss.detach().clone()
        torch_dist.all_reduce(mean)
        out["sharded"].append(mean.item() / dist.world_size)
        ref_loss = sum(reference(input_ids=a, labels=b).loss for a, b in (rows(r, seed=10 + step) for r in range(2))) / 2
        ref_loss.backward()
        out["unsharded"].append(ref_loss.item())
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    return out


def main(out, phase):
    out = Path(out)
    dist = init_distributed("cpu")
    results = {}
    if phase == "main":
        for preset, accum in (("gpt2", 1), ("llama", 2)):
            save_full(pretrain_run(out / f"pt-{preset}", preset, world_size=2, grad_accum=accum), out / f"pt-{preset}.st")
        dtypes = set()
        trainer = pretrain_run(out / "pt-llama-bf16", "llama", world_size=2, precision="bf16",
                               hook=lambda m: m.transformer.h[0].register_forward_hook(
                                   lambda mod, i, o: dtypes.add(str(o[0].dtype))))
        results["bf16"] = {"block_output": sorted(dtypes),
                           "master": sorted({str(p.dtype) for p in trainer.model.parameters()})}
        try:
            pretrain_run(out / "pt-gpt2-sigint", world_size=2, sigint_at=7)
        except TrainingInterrupted as e:
            results["sigint_step"] = e.step
        save_full(pretrain_run(out / "pt-gpt2-sigint", world_size=2, resume=True), out / "pt-gpt2-sigint.st")
        results["activation_checkpointing"] = pretrain_run(
            out / "pt-llama-ac", "llama", world_size=2, grad_accum=2, activation_checkpointing=True).step
        run_stages(out, world_size=2)
        results["memory"] = memory(dist)
        results["fused_errors"], results["fused_raised"] = fused_losses(dist)
        results["generation"] = generation(dist)
        results["gloo_collectives"] = gloo_collectives(dist)
        results["several_models_checkpoint"] = several_models_checkpoint(dist, out / "ppo-like" / "checkpoints")
        results["hugging_face"] = hugging_face(dist)
    elif phase == "kill":
        finish = ckpt_module._finish

        def killed_mid_save(root, tmp, name, *args):
            if name == ckpt_module.step_dir_name(10):  # the shards are written; die before the rename
                ckpt_module._fsync = lambda path: os.kill(os.getpid(), signal.SIGKILL)
            return finish(root, tmp, name, *args)

        ckpt_module._finish = killed_mid_save
        pretrain_run(out / "pt-gpt2-kill", world_size=2, checkpoint_interval=5)
    else:
        save_full(pretrain_run(out / "pt-gpt2-kill", world_size=2, checkpoint_interval=5, resume=True),
                  out / "pt-gpt2-kill.st")
        for name in ("one-fsdp", "one-ddp"):
            save_full(pretrain_run(out / name, world_size=2, resume=True), out / f"{name}-on-2.st")
        from fastllm import cli

        results["cli"] = cli.main(["pretrain", "--out", str(out / "cli-pretrain"), "--parallel", "fsdp", *CLI_PRETRAIN])
    if dist.is_main:
        (out / f"results-{phase}.json").write_text(json.dumps({"steps": STEPS, **results}))
    dist.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
