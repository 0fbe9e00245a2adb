"""The lean GPT (GPT-2 and Llama styles), its KV-cache generation, and Hugging Face weight import."""
from .config import GPTConfig
from .generate import Generation, KVCache, generate, restrict_logits, sample_next
from .gpt import GPT
from .hf import config_from_hf, from_hf

__all__ = ["GPTConfig", "GPT", "KVCache", "Generation", "generate", "sample_next", "restrict_logits", "from_hf",
           "config_from_hf"]
