"""Chat template and the JSONL readers of the alignment stages (SFT, reward model, PPO, DPO).

One turn is laid out with the tokenizer's special tokens (fastllm.data.SPECIAL_TOKENS):

    <|user|>{prompt}<|end|><|assistant|>{response}<|end|>
    '------------ prompt ids -----------''-- response ids --'

The prompt ids end with <|assistant|>, so generation continues straight into the response, and <|end|> is
the stop token: a response that emits it has ended; one that does not was truncated. Losses are on the
response ids only (its <|end|> included: the model must learn to stop).

Files, one JSON object per line (blank lines are skipped):
    SFT          {"prompt": str, "response": str}
    preferences  {"prompt": str, "chosen": str, "rejected": str, "margin": float (optional)}
    prompts      {"prompt": str}                 (PPO; the other files' prompts are accepted too)
Every error names the file and line: missing fields, wrong types, empty responses, and examples longer than
the model's context (block_size).
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file is malformed; the message names the file and the line."""


class ChatTemplate:
    """Turns (prompt, response) text into token ids with the tokenizer's chat tokens.

    tokenizer: a `tokenizers.Tokenizer` with the special tokens <|user|>, <|assistant|> and <|end|>.
    """

    def __init__(self, tokenizer):
        from fastllm.data import special_token_id

        self.tokenizer = tokenizer
        self.user_id = special_token_id(tokenizer, USER)
        self.assistant_id = special_token_id(tokenizer, ASSISTANT)
        self.end_id = special_token_id(tokenizer, END)

    def encode_text(self, text: str) -> list[int]:
        # Special-token strings inside user text stay plain text: a prompt cannot forge a turn boundary.
        from fastllm.data import encode

        return encode(self.tokenizer, text, allow_special=False)

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.user_id, *self.encode_text(prompt), self.end_id, self.assistant_id]

    def response_ids(self, response: str) -> list[int]:
        return [*self.encode_text(response), self.end_id]

    def decode_response(self, ids: Sequence[int]) -> str:
        """The text of generated response ids, without the <|end|> that stopped it."""
        from fastllm.data import decode

        ids = list(ids)
        if ids and ids[-1] == self.end_id:
            ids = ids[:-1]
        return decode(self.tokenizer, ids, skip_special=True)

    def decode_prompt(self, ids: Sequence[int]) -> str:
        from fastllm.data import decode

        return decode(self.tokenizer, ids, skip_special=True)


# ---------------------------------------------------------------------------------------------------------
# Examples
@dataclass
class SFTExample:
    prompt: list[int]
    response: list[int]
    line: int = 0


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    line: int = 0


@dataclass
class PromptExample:
    prompt: list[int]
    text: str = ""
    line: int = 0
    extra: dict = field(default_factory=dict)  # the line's other fields (e.g. an answer a reward function checks)


def read_jsonl(path) -> Iterable[tuple[int, dict]]:
    """(line number, object) for each non-blank line; DataError naming the line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def _text_field(obj, name, where, *, allow_empty=False):
    if name not in obj:
        raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(obj)})")
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _check_length(where, what, n_tokens, block_size):
    if block_size is not None and n_tokens > block_size:
        raise DataError(f"{where}: {what} is {n_tokens} tokens, longer than the model's context "
                        f"(block_size = {block_size})")


def read_sft(path, template: ChatTemplate, block_size: Optional[int] = None) -> list[SFTExample]:
    """SFT examples of a JSONL file of {"prompt", "response"} lines. A prompt plus response of more than
    block_size + 1 tokens (the model sees all but the last) is an error naming the line."""
    examples = []
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        prompt = template.prompt_ids(_text_field(obj, "prompt", where))
        response = template.response_ids(_text_field(obj, "response", where))
        _check_length(where, "the prompt", len(prompt), block_size)
        _check_length(where, "prompt + response", len(prompt) + len(response) - 1, block_size)
        examples.append(SFTExample(prompt, response, number))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def read_preferences(path, template: ChatTemplate, block_size: Optional[int] = None) -> list[PreferencePair]:
    """Preference pairs of a JSONL file of {"prompt", "chosen", "rejected", "margin"?} lines."""
    pairs = []
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        prompt = template.prompt_ids(_text_field(obj, "prompt", where))
        chosen = template.response_ids(_text_field(obj, "chosen", where))
        rejected = template.response_ids(_text_field(obj, "rejected", where))
        margin = obj.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise DataError(f"{where}: field 'margin' must be a number, got {margin!r}")
        _check_length(where, "the prompt", len(prompt), block_size)
        for name, response in (("chosen", chosen), ("rejected", rejected)):
            _check_length(where, f"prompt + {name}", len(prompt) + len(response), block_size)
        pairs.append(PreferencePair(prompt, chosen, rejected, float(margin), number))
    if not pairs:
        raise DataError(f"{path}: no preference pairs (the file is empty)")
    return pairs


def read_prompts(path, template: ChatTemplate, block_size: Optional[int] = None,
                 max_new_tokens: int = 0) -> list[PromptExample]:
    """PPO prompts of a JSONL file with a "prompt" field per line (other fields are kept in .extra).
    A prompt that leaves no room for max_new_tokens within block_size is an error naming the line."""
    prompts = []
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        text = _text_field(obj, "prompt", where)
        ids = template.prompt_ids(text)
        if block_size is not None and len(ids) + max_new_tokens > block_size:
            raise DataError(f"{where}: the prompt is {len(ids)} tokens; with {max_new_tokens} new tokens that is "
                            f"longer than the model's context (block_size = {block_size})")
        prompts.append(PromptExample(ids, text, number, {k: v for k, v in obj.items() if k != "prompt"}))
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


def write_jsonl(path, records: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, at least one held-out item when fraction > 0 and len > 1."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_out = int(round(fraction * len(items)))
    if fraction > 0 and len(items) > 1:
        n_out = max(1, n_out)
    held = sorted(order[:n_out])
    kept = sorted(order[n_out:])
    return [items[i] for i in kept], [items[i] for i in held]


# ---------------------------------------------------------------------------------------------------------
# Packing: sequences of different lengths side by side in one row, no padding (the model's varlen layout)
def pack(sequences: Sequence[Sequence[int]], labels: Optional[Sequence[Sequence[int]]] = None) -> dict:
    """{"input_ids": (1, N) long, "cu_seqlens": (n + 1,) int32, "labels": (1, N) long when labels are given}.

    Sequence i occupies columns cu_seqlens[i]:cu_seqlens[i + 1]; the model's positions restart at 0 for each."""
    lengths = [len(s) for s in sequences]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"pack needs at least one sequence and no empty ones, got lengths {lengths}")
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    out = {"input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.long)[None],
           "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    if labels is not None:
        out["labels"] = torch.tensor([t for s in labels for t in s], dtype=torch.long)[None]
    return out


@functools.lru_cache(maxsize=8)
def epoch_order(n: int, epoch: int, seed: int) -> tuple[int, ...]:
    """A permutation of range(n) that depends only on (n, epoch, seed): batches are deterministic in their index."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, index: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Example indices of micro-batch `index` for process `rank` of world_size: all processes together read
    batch_size * world_size consecutive examples of the seeded epoch order, rank r its own slice."""
    per_step = batch_size * world_size
    start = index * per_step + rank * batch_size
    out = []
    for k in range(start, start + batch_size):
        epoch, pos = divmod(k, n)
        out.append(epoch_order(n, epoch, seed)[pos])
    return out


# ---------------------------------------------------------------------------------------------------------
# Models and tokenizers on disk, shared by the stages
def model_dir(path) -> Path:
    """The folder holding a GPT's config.json + model.safetensors that `path` designates: a stage's run folder
    (its final/ export, else its latest checkpoint), a checkpoints/ folder, a step folder, or an export."""
    from .checkpoint import resolve_checkpoint

    p = Path(path)
    if (p / "final" / "config.json").is_file():
        return p / "final"
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    return resolve_checkpoint(p)


def load_gpt(path, *, device=None):
    """The GPT saved under `path` (see model_dir)."""
    from fastllm.model import GPT

    folder = model_dir(path)
    return GPT.from_pretrained(str(folder), device=device)


def find_tokenizer(path, explicit=None) -> Path:
    """tokenizer.json: `explicit` when given, else the one next to the model `path` designates."""
    if explicit:
        p = Path(explicit)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer {p} does not exist")
        return p
    folder = model_dir(path)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json next to the model in {folder}: pass --tokenizer PATH")
    return folder / "tokenizer.json"


def export_model(model, out_dir, tokenizer_path=None, extra: Optional[dict] = None) -> Path:
    """out_dir/final/: the model's save_pretrained (config.json + model.safetensors, atomic) and tokenizer.json."""
    import shutil

    final = Path(out_dir) / "final"
    model.save_pretrained(str(final))
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != (final / "tokenizer.json").resolve():
        tmp = final / ".tokenizer.json.tmp"
        shutil.copyfile(tokenizer_path, tmp)
        tmp.replace(final / "tokenizer.json")
    if extra:
        write_json(final / "info.json", extra)
    return final


def write_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path
