"""FSDP2 training (fastllm.train.parallel) on 2 processes (torchrun, gloo, CPU) against one process.

Three launches of tests/parallel/fsdp_worker.py share one module fixture: "main" (every FSDP run and check
that needs the process group), "kill" (SIGKILL in the middle of a checkpoint save) and "resume" (the killed
run, and two one-process runs, continued on 2 processes). The one-process runs happen here."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastllm import cli
from fastllm.model import GPT
from fastllm.train import CheckpointError, TrainConfig, TrainingInterrupted, load_checkpoint
from fastllm.train.export import export_checkpoint
from fastllm.train.parallel import parallelize, transformer_blocks

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from runs import STEPS, losses, pretrain_run, run_stages, tiny_gpt  # noqa: E402
from torchrun_launch import torchrun  # noqa: E402

WORKER = HERE / "fsdp_worker.py"
# Two processes sum the same rows' gradients in another order than one process: fp32 rounding, grown over 20
# AdamW steps at lr 1e-2 (measured: up to 2.1e-5 relative on the losses (the reward model's), 1e-5 on weights).
LOSS_RTOL, WEIGHT_TOL = 5e-5, dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    for name, parallel in (("one-fsdp", "fsdp"), ("one-ddp", "ddp")):  # stopped at step 10, resumed on 2
        with pytest.raises(TrainingInterrupted):
            pretrain_run(out / name, world_size=1, sigint_at=9, parallel=parallel)
    torchrun(WORKER, out, "main", timeout_s=400)
    torchrun(WORKER, out, "kill", check=False)
    root = out / "pt-gpt2-kill" / "checkpoints"
    killed = {"latest": (root / "latest").read_text(), "left": sorted(p.name for p in root.iterdir()),
              "verifies": load_checkpoint(root).step}
    torchrun(WORKER, out, "resume")
    results = {**json.loads((out / "results-main.json").read_text()), "killed": killed,
               "cli": json.loads((out / "results-resume.json").read_text())["cli"]}
    return out, results


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same runs in one process (plain model, no process group)."""
    out = tmp_path_factory.mktemp("single")
    for preset, accum in (("gpt2", 1), ("llama", 2)):
        pretrain_run(out / f"pt-{preset}", preset, world_size=1, grad_accum=accum, parallel="ddp")
    pretrain_run(out / "pt-llama-bf16", "llama", world_size=1, precision="bf16", parallel="ddp")
    run_stages(out, world_size=1)
    return out


def weights_of(path):
    return load_file(str(path))


def assert_curve(got, expected, rtol=LOSS_RTOL):
    assert len(got) == len(expected) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=rtol, atol=0)


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_fsdp_loss_curve_and_weights_equal_one_process(runs, single, preset):
    out, _ = runs
    assert_curve(losses(out / f"pt-{preset}"), losses(single / f"pt-{preset}"))
    exported = export_checkpoint(single / f"pt-{preset}", single / f"export-{preset}")
    torch.testing.assert_close(weights_of(out / f"pt-{preset}.st"), weights_of(exported / "model.safetensors"),
                               **WEIGHT_TOL)


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_stages_through_the_trainer_equal_one_process(runs, single, stage):
    out, _ = runs
    assert_curve(losses(out / stage, stage), losses(single / stage, stage))
    got, expected = (weights_of(run / stage / "final" / "model.safetensors") for run in (out, single))
    if stage == "reward":  # chosen - rejected cancels the head's bias: its gradient is rounding noise alone
        del got["head.bias"], expected["head.bias"]
    torch.testing.assert_close(got, expected, **WEIGHT_TOL)
    if stage == "dpo":  # held-out margins against the reference (sharded under fsdp, gathered for the eval)
        got, expected = (held_out_margins(run / stage) for run in (out, single))
        assert got.keys() == expected.keys() and "implicit_margin" in got
        assert got == pytest.approx(expected, rel=LOSS_RTOL, abs=1e-6)


def held_out_margins(out):
    with open(out / "dpo.jsonl") as f:
        (record,) = [r for r in map(json.loads, f) if r["kind"] == "dpo_eval"]
    return {k: v for k, v in record.items() if isinstance(v, float)}


def test_bf16_policy_and_activation_checkpointing(runs, single):
    out, results = runs
    assert results["bf16"] == {"block_output": ["torch.bfloat16"], "master": ["torch.float32"]}
    # bf16 parameters under FSDP err from the fp32 curve no more than twice as much as bf16 autocast does.
    fp32 = torch.tensor(losses(single / "pt-llama"))  # the same rows as the bf16 runs, with grad_accum 2
    fsdp_error = (torch.tensor(losses(out / "pt-llama-bf16")) - fp32).abs().max()
    autocast_error = (torch.tensor(losses(single / "pt-llama-bf16")) - fp32).abs().max()
    assert 0 < fsdp_error <= 2 * autocast_error, (fsdp_error, autocast_error)
    assert results["activation_checkpointing"] == STEPS
    assert_curve(losses(out / "pt-llama-ac"), losses(out / "pt-llama"), rtol=1e-6)


def test_fsdp_keeps_half_the_bytes_of_ddp_per_rank(runs):
    memory = runs[1]["memory"]
    ddp, fsdp = (sum(memory[m].values()) for m in ("ddp", "fsdp"))
    assert all(memory["fsdp"][k] > 0 for k in ("params", "grads", "optimizer"))
    assert fsdp <= (0.5 + 0.05) * ddp, memory


def test_fused_losses_on_sharded_weights_match_one_process(runs):
    results = runs[1]
    assert len(results["fused_errors"]) == 12  # {tied, untied} x {ce, logprobs, ppo} x {root scope, DTensor}
    for case, error in results["fused_errors"].items():
        assert error < 1e-6, (case, error)
    for preset, raised in results["fused_raised"].items():  # a sharded weight passed as it is: an error
        assert raised is not None and "DTensor" in raised, (preset, raised)


def test_what_a_ppo_loop_needs_on_sharded_models(runs):
    """Generation inside `unsharded` (ranks decoding different lengths) equals the unsharded model's and
    reshards after; a policy + critic checkpoint with an optimizer each saves and loads shard for shard."""
    results = runs[1]
    assert results["generation"] == {"equal": True, "resharded_after": True}
    assert results["several_models_checkpoint"] is True


def test_gloo_collectives_equal_torchs(runs):
    """FSDP's all-gather and reduce-scatter on gloo: through shared memory (the 2 processes share a host, so
    parallelize picks it) and rebuilt from broadcast and send/recv, against torch's own."""
    got = runs[1]["gloo_collectives"]
    assert got.pop("shared_memory_opened") is True
    assert got.pop("left_in_dev_shm") == []  # unlinked once mapped: nothing outlives the processes
    assert got.pop("fallback_when_one_rank_cannot_map") is True
    gathers = {k: v for k, v in got.items() if "all_gather" in k}
    assert len(gathers) == 12 and all(v is True for v in gathers.values()), gathers
    for name, error in got.items():
        if "reduce_scatter" in name:  # relative: one rounding of the sum to fp32 or bf16 (at most 2^-24 / 2^-8)
            assert error <= (1e-6 if "float32" in name else 2 ** -7), (name, error)


def test_patched_hugging_face_llama_under_fsdp_gives_unsharded_losses(runs):
    hf = runs[1]["hugging_face"]
    torch.testing.assert_close(torch.tensor(hf["sharded"]), torch.tensor(hf["unsharded"]), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------
def test_resume_after_ctrl_c_is_bit_exact(runs):
    out, results = runs
    assert results["sigint_step"] == 8
    assert losses(out / "pt-gpt2-sigint") == losses(out / "pt-gpt2")
    expected = weights_of(out / "pt-gpt2.st")
    for k, v in weights_of(out / "pt-gpt2-sigint.st").items():
        assert torch.equal(v, expected[k]), k


def test_kill_during_save_leaves_previous_checkpoint_and_resume_is_bit_exact(runs):
    out, results = runs
    killed = results["killed"]
    assert killed["latest"] == "step_00000005" and killed["verifies"] == 5
    assert "step_00000010" not in killed["left"] and any(n.startswith(".tmp-step_00000010") for n in killed["left"])
    assert losses(out / "pt-gpt2-kill") == losses(out / "pt-gpt2")
    expected = weights_of(out / "pt-gpt2.st")
    for k, v in weights_of(out / "pt-gpt2-kill.st").items():
        assert torch.equal(v, expected[k]), k


def test_resume_with_another_number_of_processes(runs, single, tmp_path):
    out, _ = runs
    reference, expected = losses(single / "pt-gpt2"), weights_of(out / "pt-gpt2.st")
    for name in ("one-fsdp", "one-ddp"):  # 1 -> 2, from a sharded and from a safetensors checkpoint
        assert_curve(losses(out / name), reference)
        torch.testing.assert_close(weights_of(out / f"{name}-on-2.st"), expected, **WEIGHT_TOL)
    run = tmp_path / "two-on-one"  # 2 -> 1: the 2-process run's step-10 checkpoint
    shutil.copytree(out / "pt-gpt2", run)
    shutil.rmtree(run / "checkpoints" / "step_00000020")
    (run / "checkpoints" / "latest").write_text("step_00000010")
    with pytest.warns(UserWarning, match="world_size"):
        trainer = pretrain_run(run, world_size=1, resume=True)
    assert_curve(losses(run), reference)
    torch.testing.assert_close({k: v.detach() for k, v in trainer.model.state_dict().items()}, expected, **WEIGHT_TOL)


def test_cli_pretrain_under_fsdp_then_export_and_generate(runs, tmp_path, capsys):
    out, results = runs
    assert results["cli"] == 0
    run = out / "cli-pretrain"
    assert load_checkpoint(run).sharded and load_checkpoint(run).step == 4
    assert cli.main(["export", "--ckpt", str(run), "--out", str(tmp_path / "export")]) == 0
    exported, final = (weights_of(d / "model.safetensors") for d in (tmp_path / "export", run / "final"))
    assert exported.keys() == final.keys() and all(torch.equal(v, final[k]) for k, v in exported.items())
    capsys.readouterr()
    for folder in (tmp_path / "export", run / "final"):
        assert cli.main(["generate", "--ckpt", str(folder), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
        assert capsys.readouterr().out.startswith("def ")


def test_export_then_generate(runs, tmp_path, capsys):
    out, _ = runs
    assert cli.main(["export", "--ckpt", str(out / "pt-gpt2"), "--out", str(tmp_path / "gpt2")]) == 0
    model = GPT.from_pretrained(str(tmp_path / "gpt2"))
    expected = weights_of(out / "pt-gpt2.st")
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    reference = tiny_gpt("gpt2")
    reference.load_state_dict(expected)
    prompts = [[1, 2, 3], [7]]
    assert model.generate(prompts, 5, temperature=0).tokens == reference.generate(prompts, 5, temperature=0).tokens
    # DPO trains a wrapper ("gpt."-prefixed keys): its checkpoint exports as the plain GPT of its final/.
    exported = export_checkpoint(out / "dpo", tmp_path / "dpo")
    final = weights_of(out / "dpo" / "final" / "model.safetensors")
    assert all(torch.equal(v, final[k]) for k, v in weights_of(exported / "model.safetensors").items())


# ---------------------------------------------------------------------------------------------------------
def test_bad_parallel_settings_raise():
    with pytest.raises(ValueError, match="parallel must be one of"):
        TrainConfig(parallel="zero3")
    from fastllm.train.distributed import DistContext

    with pytest.raises(ValueError, match="parallel must be one of"):
        parallelize(tiny_gpt(), "tp", DistContext())
    with pytest.raises(ValueError, match="no transformer blocks"):
        parallelize(torch.nn.Linear(2, 2), "fsdp", DistContext(), activation_checkpointing=True)
    assert len(transformer_blocks(tiny_gpt(n_layer=3))) == 3


def test_export_needs_a_model_config(tmp_path):
    from fastllm.train import save_checkpoint

    save_checkpoint(tmp_path / "checkpoints", 1, models={"model": torch.nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match="no config.json"):
        export_checkpoint(tmp_path, tmp_path / "out")


def test_reduce_scatter_names_the_ops_it_implements():
    """FSDP2 reduce-scatters with SUM or AVG; any other op (PREMUL_SUM under set_gradient_divide_factor) is refused
    by name before anything is sent."""
    import torch.distributed as torch_dist

    from fastllm.train import collectives

    out, full = torch.empty(3), torch.randn(6)
    for reduce_scatter in (collectives.GlooReduceScatter(), collectives.SharedMemoryReduceScatter(channel=None)):
        with pytest.raises(NotImplementedError, match="op must be SUM or AVG, got"):
            reduce_scatter(out, full, group=None, op=torch_dist.ReduceOp.MAX)
