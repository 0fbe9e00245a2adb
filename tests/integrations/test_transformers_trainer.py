"""transformers.Trainer on a patched model as people run it: bf16 autocast, right-padded batches of uneven
lengths, gradient accumulation (the loss normalised by Trainer's num_items_in_batch). The logged loss and
grad_norm of every step match the unpatched model's, judged against a float64 run (float64 is not eligible for
autocast, so the same arguments run it exactly) with the unpatched bf16 run's error as the yardstick. The model
it saves is an ordinary checkpoint: an unpatched model loads it with the same weights."""
import json

import pytest
import torch
import transformers
from hf_tiny import VOCAB, triple
from numerics import assert_matches_reference

from fastllm import ops
from fastllm.integrations import transformers as fastllm_hf

STEPS, MICRO_BATCH, ACCUMULATION = 3, 2, 2


class _UnevenTokens(torch.utils.data.Dataset):
    """Sequences of 3 to 12 tokens, so every micro-batch is padded and holds a different number of labels."""

    def __init__(self, n):
        generator = torch.Generator().manual_seed(5)
        lengths = torch.randint(3, 13, (n,), generator=generator)
        self.ids = [torch.randint(1, VOCAB, (int(length),), generator=generator) for length in lengths]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def _pad_right(features):
    longest = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.zeros(len(features), longest, dtype=torch.long),
             "attention_mask": torch.zeros(len(features), longest, dtype=torch.long)}
    for row, f in enumerate(features):
        batch["input_ids"][row, :len(f["input_ids"])] = f["input_ids"]
        batch["attention_mask"][row, :len(f["input_ids"])] = 1
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


@pytest.fixture
def fused_calls(monkeypatch):
    """Every call of the fused loss and of the varlen attention, to check the patched run really used them."""
    calls = {"loss": [], "varlen": 0}
    loss, varlen = fastllm_hf.causal_lm_loss, ops.attention_varlen

    def counted_loss(*args, **kwargs):
        calls["loss"].append((torch.is_autocast_enabled("cpu"), kwargs.get("num_items_in_batch")))
        return loss(*args, **kwargs)

    def counted_varlen(*args, **kwargs):
        calls["varlen"] += 1
        return varlen(*args, **kwargs)

    monkeypatch.setattr(fastllm_hf, "causal_lm_loss", counted_loss)
    monkeypatch.setattr(ops, "attention_varlen", counted_varlen)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_padded_accumulated_trainer_matches_unpatched(arch, tmp_path, no_fallback, fused_calls):
    data = _UnevenTokens(STEPS * MICRO_BATCH * ACCUMULATION)
    models = triple(arch)
    logs = []
    for i, model in enumerate(models):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(i)), use_cpu=True, bf16=True, report_to="none", max_steps=STEPS,
            per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-2,
            lr_scheduler_type="constant", warmup_steps=0, save_strategy="no", logging_steps=1, disable_tqdm=True,
            seed=0, data_seed=0, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=_pad_right)
        trainer.train()
        logs.append([entry for entry in trainer.state.log_history if "loss" in entry])
        if i == 0:
            trainer.save_model(str(tmp_path / "patched"))
    assert all(len(log) == STEPS for log in logs)
    for key in ("loss", "grad_norm"):
        patched, baseline, reference = (torch.tensor([entry[key] for entry in log], dtype=torch.float64)
                                        for log in logs)
        assert_matches_reference(f"{arch} {key} per step", patched.float(), reference, baseline.float())
    # the patched run computed its loss fused, under autocast, normalised by Trainer's count, on varlen attention
    assert len(fused_calls["loss"]) == STEPS * ACCUMULATION
    assert all(autocast and items is not None for autocast, items in fused_calls["loss"])
    assert fused_calls["varlen"] > 0

    folder = tmp_path / "patched"
    assert "fastllm" not in (folder / "config.json").read_text()  # nothing names fastllm: any install loads it
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert plain.config._attn_implementation == "sdpa"
    saved = models[0].state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert json.loads((folder / "config.json").read_text())["model_type"] == arch
