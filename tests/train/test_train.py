"""The training loop on a tiny model and an in-memory batch source (no fastllm.model/data needed)."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastllm.train import (CheckpointError, TrainConfig, Trainer, TrainingDiverged, TrainingInterrupted,
                           load_checkpoint, lr_at, param_groups, save_checkpoint)
from fastllm.train.log import MetricsLogger
from tiny import Batches, TinyLM, make_tokens, poisoned_loss
from torchrun_launch import torchrun

HERE = Path(__file__).parent


def config(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), steps=12, batch_size=4, grad_accum=1, lr=1e-2, min_lr=1e-3, warmup_steps=3,
                eval_interval=4, eval_iters=2, checkpoint_interval=0, progress=False, plot=False, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def run(tmp_path, *, model_seed=0, dropout=0.0, train=None, loss_fn=None, **kw):
    torch.manual_seed(model_seed)
    model = TinyLM(dropout=dropout)
    trainer = Trainer(model, config(tmp_path, **kw), train or Batches(make_tokens(64, seed=1)),
                      Batches(make_tokens(16, seed=2)), loss_fn=loss_fn)
    return trainer, trainer.fit()


def records(out_dir, kind):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ optimizer
def test_param_groups_decay_only_matrices():
    model = TinyLM(tie=True)
    decay, no_decay = param_groups(model, 0.1)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(model.fc.weight)}
    assert ids(no_decay["params"]) == ids([model.wte.weight, model.wpe.weight, model.fc.bias, model.norm.weight,
                                           model.norm.bias])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # Embeddings decay on request; the tied head weight is the embedding, listed once.
    decay, no_decay = param_groups(model, 0.1, decay_embeddings=True)
    assert ids(decay["params"]) == ids([model.fc.weight, model.wte.weight, model.wpe.weight])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    lrs = [lr_at(s, **kw) for s in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and math.isclose(lrs[9], 0.55)  # half-way through the cosine: the mid-point
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[14] == lrs[15] == 0.1


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"TrainConfig.batch_size must be an integer >= 1, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"TrainConfig.precision must be one of .*got 'fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match=r"TrainConfig.min_lr must be between 0 and lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['batchsize'\]"):
        TrainConfig.from_dict({"batchsize": 3})


# ------------------------------------------------------------------------------------------------ the loop
def test_training_lowers_loss_and_writes_logs(tmp_path):
    trainer, summary = run(tmp_path, steps=30, eval_interval=10, plot=True, checkpoint_interval=10)
    train, evals = records(tmp_path, "train"), records(tmp_path, "eval")
    assert [r["step"] for r in train] == list(range(1, 31))
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < 0.7 * evals[0]["val_loss"], evals
    for r in evals:
        assert math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-9)
    assert train[0]["lr"] == pytest.approx(1e-2 / 3)
    assert train[-1]["lr"] == lr_at(29, lr=1e-2, min_lr=1e-3, warmup_steps=3, total_steps=30)
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in train)
    assert train[-1]["tokens"] == 30 * 4 * (make_tokens().shape[1] - 1)
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 30 + 4 and "val_loss" in csv_lines[0] and "grad_norm" in csv_lines[0]
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["step"] == 30 and summary["val_loss"] == evals[-1]["val_loss"]
    # keep_checkpoints=2: steps 20 and 30 remain, `latest` names 30, no temporary folders are left behind.
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000020", "step_00000030"]
    assert (ckpts / "latest").read_text() == "step_00000030"


def test_grad_accumulation_matches_the_bigger_batch(tmp_path):
    a, _ = run(tmp_path / "a", steps=5, batch_size=8, grad_accum=1)
    b, _ = run(tmp_path / "b", steps=5, batch_size=2, grad_accum=4)
    torch.testing.assert_close(params(a.model), params(b.model), rtol=1e-5, atol=1e-6)
    la = [r["loss"] for r in records(tmp_path / "a", "train")]
    lb = [r["loss"] for r in records(tmp_path / "b", "train")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_bf16_autocast_on_cpu_is_an_option(tmp_path):
    fp32, s32 = run(tmp_path / "fp32", steps=4)
    bf16, s16 = run(tmp_path / "bf16", steps=4, precision="bf16")
    l32 = [r["loss"] for r in records(tmp_path / "fp32", "train")]
    l16 = [r["loss"] for r in records(tmp_path / "bf16", "train")]
    assert l16 != l32  # autocast really ran in bf16 ...
    assert l16 == pytest.approx(l32, rel=0.03)  # ... and trains the same model to bf16 accuracy
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("stop", ["sigint", "crash"])
def test_resume_continues_exactly(tmp_path, stop):
    """Stop a run mid-way (Ctrl-C, or a crash after a periodic checkpoint), resume it in a fresh model with
    other initial weights: every later loss and the final weights equal the uninterrupted run's bit for bit.
    Dropout is on, so the RNG state must be restored too; grad_accum=2 so the data position is not the step."""
    kw = dict(steps=10, grad_accum=2, dropout=0.2, checkpoint_interval=4)
    full, _ = run(tmp_path / "full", **kw)
    expected = [r["loss"] for r in records(tmp_path / "full", "train")]

    out = tmp_path / "split"
    if stop == "sigint":  # SIGINT while reading micro-batch 13 (step 7): step 7 finishes, is saved, the run stops
        with pytest.raises(TrainingInterrupted) as info:
            run(out, train=Batches(make_tokens(64, seed=1), sigint_at=13), **kw)
        assert info.value.step == 7 and info.value.checkpoint.name == "step_00000007"
        resumed_from = 7
    else:  # crash in step 7: the checkpoint of step 4 is the latest
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(out, train=Batches(make_tokens(64, seed=1), raise_at=13), **kw)
        resumed_from = 4
    assert (out / "checkpoints" / "latest").read_text() == f"step_{resumed_from:08d}"
    train = Batches(make_tokens(64, seed=1))
    resumed, summary = run(out, model_seed=123, train=train, resume=True, **kw)
    assert train.seen[0] == resumed_from * 2  # the data position
    got = [r["loss"] for r in records(out, "train")]
    assert [r["step"] for r in records(out, "train")] == list(range(1, 11))  # log truncated at the checkpoint
    assert got == expected
    assert [r["val_loss"] for r in records(out, "eval")] == [r["val_loss"] for r in records(tmp_path / "full", "eval")]
    for k, v in params(full.model).items():
        assert torch.equal(v, params(resumed.model)[k]), k
    assert summary["step"] == 10


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="resume=True but there is no checkpoint in .*drop --resume"):
        run(tmp_path, resume=True)


# ------------------------------------------------------------------------------------------------ NaN
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    train = Batches(make_tokens(64, seed=1), poison_at=6)  # step 7's batch
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7 .*last good checkpoint, left untouched, "
                                               r"is .*step_00000005"):
        run(tmp_path, train=train, loss_fn=poisoned_loss, checkpoint_interval=5)
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000005"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000005"]
    weights = load_file(str(ckpt / "step_00000005" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert load_checkpoint(tmp_path).step == 5  # and its hashes still verify
    assert [r["step"] for r in records(tmp_path, "train")] == list(range(1, 7))
    # loss_fn's metrics are logged: averaged over micro-batches in training, as val_* in evaluation.
    assert all(r["factor"] == 1.0 for r in records(tmp_path, "train"))
    assert [(r["step"], r["val_factor"]) for r in records(tmp_path, "eval")] == [(0, 1.0), (4, 1.0)]


# ------------------------------------------------------------------------------------------------ checkpoints
def _saved(tmp_path):
    trainer, _ = run(tmp_path, steps=3, eval_interval=0)
    return trainer, tmp_path / "checkpoints" / "step_00000003"


def test_checkpoint_roundtrip_without_pickle(tmp_path):
    trainer, path = _saved(tmp_path)
    rng_after_fit = torch.get_rng_state()  # nothing drew random numbers since the final save
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                                      "trainer_state.json"]
    ckpt = load_checkpoint(tmp_path)  # out_dir -> checkpoints/latest -> step_00000003
    assert ckpt.path == path and ckpt.step == 3 and ckpt.state["data_index"] == 3
    model = TinyLM()
    ckpt.load_model(model)
    for k, v in params(trainer.model).items():
        assert torch.equal(v, params(model)[k]), k
    assert model.head.weight is model.wte.weight  # the tied weight stays tied, stored once
    opt = torch.optim.AdamW([{"params": [model.fc.weight]}, {"params": [p for n, p in model.named_parameters()
                                                                         if n != "fc.weight"]}])
    ckpt.load_optimizer(opt)
    saved = trainer.optimizer.state_dict()
    assert len(opt.state_dict()["state"]) == len(saved["state"]) == len(list(model.parameters()))
    for i, s in opt.state_dict()["state"].items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[k], saved["state"][i][k])
    rng = ckpt.rng_state(0)
    assert rng["torch_cpu"].dtype == torch.uint8 and torch.equal(rng["torch_cpu"], rng_after_fit)
    assert ckpt.rng_state(1) is None


@pytest.mark.parametrize("damage, message", [
    ("flip_model", r"model.safetensors is corrupt \(sha256"),
    ("truncate_optimizer", r"optimizer.safetensors is corrupt"),
    ("delete_rng", r"rng.safetensors is missing"),
    ("garbage_state", r"trainer_state.json is corrupt"),
    ("dangling_latest", r"latest names 'step_00000099', but .* does not exist"),
])
def test_damaged_checkpoints_give_clear_errors(tmp_path, damage, message):
    _, path = _saved(tmp_path)
    if damage == "flip_model":
        data = bytearray((path / "model.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (path / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate_optimizer":
        (path / "optimizer.safetensors").write_bytes((path / "optimizer.safetensors").read_bytes()[:40])
    elif damage == "delete_rng":
        (path / "rng.safetensors").unlink()
    elif damage == "garbage_state":
        (path / "trainer_state.json").write_text("{not json")
    else:
        (tmp_path / "checkpoints" / "latest").write_text("step_00000099")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=message):  # and the same error when resuming
        run(tmp_path, resume=True)
    if damage == "truncate_optimizer":  # without hash verification, safetensors' own check still catches it
        with pytest.raises(CheckpointError, match=r"optimizer.safetensors is corrupt: .*header"):
            load_checkpoint(tmp_path, verify=False).load_optimizer(torch.optim.AdamW(TinyLM().parameters()))


def test_checkpoint_into_the_wrong_model_is_a_clear_error(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"(?s)cannot load .*model.safetensors into TinyLM: .*size mismatch"):
        load_checkpoint(path).load_model(TinyLM(dim=8))
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*expected a folder with trainer_state.json"):
        load_checkpoint(HERE)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_failed_save_leaves_previous_checkpoint(tmp_path):
    trainer, path = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    trainer.step = 4
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path / "checkpoints", 4, models={"model": trainer.model},
                        extra_files={"tokenizer.json": str(tmp_path / "missing.json")})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000003"]  # no half-written step_00000004, no temporary folder
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_logger_truncate_and_csv_union_of_keys(tmp_path):
    log = MetricsLogger(tmp_path, plot=False)
    for s in range(1, 5):
        log.log({"kind": "train", "step": s, "loss": 1.0 / s})
    log.log({"kind": "eval", "step": 4, "val_loss": 0.5})
    log.truncate_after(2)
    log.flush()
    assert [r["step"] for r in log.records()] == [1, 2]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "kind,step,loss"


# ------------------------------------------------------------------------------------------------ DDP
def _torchrun(*args):
    torchrun(HERE / "ddp_worker.py", *args)


def test_ddp_two_processes_match_one_process_with_double_batch(tmp_path):
    steps, batch, accum = 4, 2, 2
    _torchrun(tmp_path / "ddp", steps, batch, accum)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    for r, info in enumerate(ranks):  # each rank read its own shard of every micro-batch index
        assert info["world_size"] == 2
        assert info["calls"] == [[i, r, 2] for i in range(steps * accum)]
    single, _ = run(tmp_path / "one", steps=steps, batch_size=2 * batch, grad_accum=accum, warmup_steps=2,
                    eval_interval=0, seed=0)
    ddp_model = TinyLM()
    load_checkpoint(tmp_path / "ddp").load_model(ddp_model)
    torch.testing.assert_close(params(ddp_model), params(single.model), rtol=1e-5, atol=1e-6)
    # Only rank 0 logged: one record per step; the logged loss is the mean over both ranks.
    ddp_losses = [r["loss"] for r in records(tmp_path / "ddp", "train")]
    assert ddp_losses == pytest.approx([r["loss"] for r in records(tmp_path / "one", "train")], rel=1e-5)
    assert ranks[0]["summary"]["val_loss"] == pytest.approx(ranks[1]["summary"]["val_loss"], rel=1e-12)

    # SIGTERM (what torchrun sends its workers on Ctrl-C) reaching rank 1 alone, during step 3: both ranks
    # finish step 3, agree to stop, checkpoint it (with both ranks' RNG states), and a resumed run ends
    # exactly where the uninterrupted one did.
    _torchrun(tmp_path / "split", steps, batch, accum, 5)
    assert [json.loads((tmp_path / "split" / f"rank{r}.json").read_text())["interrupted_at"] for r in (0, 1)] == [3, 3]
    assert len(load_checkpoint(tmp_path / "split").meta["rng"]) == 2
    _torchrun(tmp_path / "split", steps, batch, accum, -1, "resume")
    assert [r["loss"] for r in records(tmp_path / "split", "train")] == ddp_losses
    resumed = TinyLM()
    load_checkpoint(tmp_path / "split").load_model(resumed)
    for k, v in params(ddp_model).items():
        assert torch.equal(v, params(resumed)[k]), k


# ------------------------------------------------------------------------------------------------ the real model
class CrashAt:
    def __init__(self, source, index):
        self.source, self.index = source, index

    def batch(self, index, batch_size, **kw):
        if index == self.index:
            raise RuntimeError("simulated crash")
        return self.source.batch(index, batch_size, **kw)


def test_resume_is_exact_with_fastllm_gpt_and_token_dataset(tmp_path):
    """The same bit-for-bit resume with fastllm.model.GPT on its CPU kernels (Llama style, dropout on) reading a
    memory-mapped fastllm.data.TokenDataset."""
    import numpy as np

    from fastllm.data import TokenDataset
    from fastllm.model import GPT, GPTConfig

    (np.arange(4000) * 7919 % 97).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    data = TokenDataset(tmp_path / "tokens.bin", 16, dtype=np.uint16, seed=3)

    def fit(out, source, model_seed=0, **kw):
        torch.manual_seed(model_seed)
        model = GPT(GPTConfig.llama_style(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                          dropout=0.1))
        trainer = Trainer(model, config(tmp_path / out, steps=8, grad_accum=2, checkpoint_interval=3, eval_interval=3,
                                        **kw), source, data)
        trainer.fit()
        return trainer

    full = fit("full", data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit("split", CrashAt(data, 13))  # in step 7: resumes from step 6
    resumed = fit("split", data, model_seed=1, resume=True)
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        assert [r[key] for r in records(tmp_path / "split", kind)] == [r[key] for r in records(tmp_path / "full", kind)]
    for k, v in params(full.model).items():
        assert torch.equal(v, params(resumed.model)[k]), k
