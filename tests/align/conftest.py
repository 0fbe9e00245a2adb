import pytest
import torch

from fastllm.data import save_tokenizer, train_tokenizer
from fastllm.demo import AdditionTask
from fastllm.model import GPT, GPTConfig


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on 2 shared cores: one thread avoids OpenMP spin contention (40x faster measured).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def addition_setup(tmp_path):
    """(task, its train prompts, tmp_path / "base"): a tiny untrained GPT saved with a BPE tokenizer of the
    addition task, the starting point for chaining the stage CLIs on files."""
    task = AdditionTask(max_operand=5)
    train, _ = task.split()
    tok = train_tokenizer(["".join(f"{a}+{b}={a + b}\n" for a, b in task.all_prompts())] * 3, vocab_size=280)
    base = tmp_path / "base"
    torch.manual_seed(0)
    GPT(GPTConfig.gpt2_style(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=1, n_head=2,
                             n_embd=32)).save_pretrained(base)
    save_tokenizer(tok, base / "tokenizer.json")
    return task, train, base
