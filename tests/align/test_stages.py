"""Chat template and data files, SFT, reward model and DPO on tiny models."""
import json

import pytest
import torch

from fastllm.data import train_tokenizer
from fastllm.model import GPT, GPTConfig
from fastllm.train import TrainConfig
from fastllm.train.chat import (IGNORE_INDEX, ChatTemplate, DataError, PreferencePair, SFTExample, read_preferences,
                                read_prompts, read_sft)
from fastllm.train.dpo import dpo, preference_margin
from fastllm.train.reward import ScalarHeadModel, pairwise_accuracy, train_reward_model
from fastllm.train.sft import SFTData, sft, sft_loss, sft_sequence



@pytest.fixture(scope="module")
def template():
    docs = ["the cat sat on the mat", "a dog ran", "add 1 and 2", "yes no yes no"] * 5
    return ChatTemplate(train_tokenizer(docs, vocab_size=300))


def tiny_gpt(vocab, seed=0, block_size=64, dropout=0.0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.gpt2_style(vocab_size=vocab, block_size=block_size, n_layer=1, n_head=2, n_embd=32,
                                    dropout=dropout))


def train_config(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), steps=30, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=0,
                eval_iters=2, checkpoint_interval=0, progress=False, plot=True, weight_decay=0.0, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------- chat and data
def test_template_layout(template):
    p, r = template.prompt_ids("a dog"), template.response_ids("ran")
    assert p[0] == template.user_id and p[-2:] == [template.end_id, template.assistant_id]
    assert r[-1] == template.end_id and template.decode_response(r) == "ran"
    # special-token text in user data stays text: it cannot forge a turn boundary
    assert template.end_id not in template.prompt_ids("<|end|>")[1:-2]


def test_sft_labels_cover_the_response_only(template):
    ex = SFTExample(template.prompt_ids("a dog"), template.response_ids("ran"))
    inputs, labels = sft_sequence(ex)
    assert len(inputs) == len(labels) == len(ex.prompt) + len(ex.response) - 1
    n_prompt = len(ex.prompt) - 1
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ex.response
    assert inputs[n_prompt] == template.assistant_id  # <|assistant|> predicts the first response token


@pytest.mark.parametrize("line, message", [
    ({"prompt": "a dog"}, "missing field 'response'"),
    ({"prompt": "a dog", "response": "  "}, "field 'response' is empty"),
    ({"prompt": "a dog", "response": 3}, "must be a string"),
    ("{not json", "not valid JSON"),
    ({"prompt": "the cat " * 40, "response": "x"}, "longer than the model's context"),
])
def test_bad_sft_file_names_the_line(tmp_path, template, line, message):
    path = write(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, "", line])
    with pytest.raises(DataError) as e:
        read_sft(path, template, block_size=32)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_bad_preference_and_prompt_files_name_the_line(tmp_path, template):
    path = write(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                            {"prompt": "a", "chosen": "b", "rejected": ""}])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'rejected' is empty"):
        read_preferences(path, template)
    path = write(tmp_path / "pairs2.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"pairs2.jsonl:1: missing field 'rejected'"):
        read_preferences(path, template)
    path = write(tmp_path / "prompts.jsonl", [{"prompt": "a dog"}, {"prompt": "the cat sat " * 6}])
    with pytest.raises(DataError, match=r"prompts.jsonl:2: the prompt is \d+ tokens; with 16 new tokens"):
        read_prompts(path, template, block_size=32, max_new_tokens=16)
    assert len(read_prompts(path, template, block_size=64, max_new_tokens=16)) == 2
    with pytest.raises(DataError, match="no examples"):
        read_sft(write(tmp_path / "empty.jsonl", [""]), template)


# ---------------------------------------------------------------------------------------------- SFT
def test_sft_packed_loss_is_the_response_token_mean(template):
    model = tiny_gpt(template.tokenizer.get_vocab_size())
    examples = [SFTExample(template.prompt_ids(p), template.response_ids(r))
                for p, r in [("a dog", "ran"), ("the cat sat on the mat", "yes"), ("add 1", "no no no")]]
    batch = SFTData(examples).batch(0, 3)
    loss, metrics = sft_loss(model, batch)
    total, count = 0.0, 0
    for ex in examples:  # each sequence alone, dense, logits materialised
        inputs, labels = sft_sequence(ex)
        logits, _ = model(torch.tensor([inputs]))
        total += torch.nn.functional.cross_entropy(logits[0], torch.tensor(labels), reduction="sum").item()
        count += sum(t != IGNORE_INDEX for t in labels)
    assert metrics["response_tokens"] == count
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_sft_learns_responses(tmp_path, template):
    vocab = template.tokenizer.get_vocab_size()
    examples = [SFTExample(template.prompt_ids(p), template.response_ids(r))
                for p, r in [("a dog", "ran"), ("the cat", "sat on the mat"), ("yes", "no")] * 4]
    summary = sft(train_config(tmp_path, steps=60, lr=1e-2, min_lr=1e-3), model=tiny_gpt(vocab), examples=examples, val_fraction=0.0)
    records = [json.loads(line) for line in open(tmp_path / "sft.jsonl")]
    train = [r["loss"] for r in records if r["kind"] == "train"]
    assert train[-1] < 0.3 * train[0]
    assert (tmp_path / "final" / "model.safetensors").is_file() and (tmp_path / "sft.png").is_file()
    reloaded = GPT.from_pretrained(summary["final"])
    assert summary["final"] == str(tmp_path / "final") and reloaded.config.vocab_size == vocab


# ---------------------------------------------------------------------------------------------- reward model
def separable_pairs(template, n=40):
    """The chosen response always says 'yes', the rejected one 'no', whatever the prompt."""
    words = ["the cat", "a dog", "add 1 and 2", "sat on the mat", "ran"]
    return [PreferencePair(template.prompt_ids(f"{words[i % 5]} {i}"), template.response_ids(f"yes {words[i % 3]}"),
                           template.response_ids(f"no {words[(i + 1) % 3]}")) for i in range(n)]


def test_reward_model_learns_separable_preferences(tmp_path, template):
    vocab = template.tokenizer.get_vocab_size()
    pairs = separable_pairs(template)
    rm = ScalarHeadModel(tiny_gpt(vocab))
    before = pairwise_accuracy(rm, pairs[30:])
    summary = train_reward_model(train_config(tmp_path, steps=40), model=rm, pairs=pairs, val_fraction=0.25)
    assert summary["val_accuracy"] == 1.0 and before["accuracy"] < 1.0
    reloaded = ScalarHeadModel.from_pretrained(summary["final"])
    assert pairwise_accuracy(reloaded, pairs)["accuracy"] == 1.0
    assert any(r.get("kind") == "rm_eval" for r in map(json.loads, open(tmp_path / "reward.jsonl")))


def test_reward_score_is_read_at_the_last_token(template):
    rm = ScalarHeadModel(tiny_gpt(template.tokenizer.get_vocab_size()))
    seqs = [[3, 4, 5, 6], [7], [8, 9]]
    scores = rm.score(seqs)
    for seq, s in zip(seqs, scores):
        alone = rm(torch.tensor([seq]))[0, -1]  # dense forward of the sequence alone, its last position
        assert s.item() == pytest.approx(alone.item(), abs=1e-5)


def test_bradley_terry_margin_is_used(template):
    from fastllm.train.reward import bradley_terry_loss

    c, r = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    assert bradley_terry_loss(c, r).item() == pytest.approx(-torch.nn.functional.logsigmoid(c).mean().item())
    with_margin = bradley_terry_loss(c, r, torch.tensor([1.0, 1.0])).item()
    assert with_margin == pytest.approx(-torch.nn.functional.logsigmoid(c - 1).mean().item())


# ---------------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_increases_chosen_rejected_margin(tmp_path, template, loss_type):
    vocab = template.tokenizer.get_vocab_size()
    pairs = separable_pairs(template, 32)
    model = tiny_gpt(vocab)
    before = preference_margin(model, pairs)["logp_margin"]
    # IPO regresses the implicit margin to 1 / (2 beta): a small beta leaves room above the +1 asked here
    summary = dpo(train_config(tmp_path, steps=15, lr=3e-3), model=model, pairs=pairs,
                  beta=0.1 if loss_type == "ipo" else 0.5,
                  loss_type=loss_type, val_fraction=0.25)
    after = preference_margin(model, pairs)["logp_margin"]
    assert after > before + 1.0, (before, after)
    assert summary["val_implicit_margin"] > summary["val_implicit_margin_before"] == 0.0
    assert (tmp_path / "dpo.png").is_file() and GPT.from_pretrained(summary["final"]) is not None
