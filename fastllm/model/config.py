"""GPTConfig: one dataclass for the two decoder families people train.

GPT-2 style: LayerNorm, learned absolute positions, GELU MLP, biases, tied embeddings.
Llama style:  RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, no biases, untied head.
Every field is plain data, so a config round-trips through JSON (to_dict / from_dict).
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
GELU_APPROXIMATIONS = ("none", "tanh")


def _swiglu_width(n_embd, multiple_of=64):
    """Llama's SwiGLU width: 2/3 of 4 * n_embd (the three matrices cost what GELU's two 4x ones do), rounded
    up to a multiple of 64 so the matmuls stay aligned."""
    width = int(2 * 4 * n_embd / 3)
    return multiple_of * math.ceil(width / multiple_of)


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 rounded up to a multiple of 64
    block_size: int = 1024  # the longest sequence (positions 0 .. block_size - 1)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None: n_head (multi-head); fewer: grouped-query; 1: multi-query
    n_embd: int = 768
    head_dim: Optional[int] = None  # None: n_embd // n_head
    intermediate_size: Optional[int] = None  # None: 4 * n_embd for gelu, ~8/3 * n_embd for swiglu
    norm: str = "layernorm"
    position: str = "learned"
    mlp: str = "gelu"
    gelu_approximate: str = "tanh"  # GPT-2's "gelu_new" is the tanh approximation
    bias: bool = True  # biases in every linear layer and LayerNorm (not in the output head)
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    dropout: float = 0.0  # on embeddings and on each sub-layer's output (off in eval)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_kernels: bool = True  # False: the same model on plain PyTorch (a reference; same state_dict)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_positive_int(name, getattr(self, name))
        for name in ("n_kv_head", "head_dim", "intermediate_size"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        for name, value, allowed in (("norm", self.norm, NORMS), ("position", self.position, POSITIONS),
                                     ("mlp", self.mlp, MLPS),
                                     ("gelu_approximate", self.gelu_approximate, GELU_APPROXIMATIONS)):
            if value not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {value!r}")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}), or "
                             f"set head_dim")
        if self.position == "rope" and self.head_size % 2 != 0:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_size}")
        if not 1 <= self.head_size <= 256:
            raise ValueError(f"head_dim must be in [1, 256] (what the attention kernels hold), got {self.head_size}")
        for name in ("bias", "tie_embeddings", "use_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"GPTConfig.{name} must be a positive number, got {value!r}")

    # ---- derived sizes ----
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    @property
    def mlp_width(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 4 * self.n_embd if self.mlp == "gelu" else _swiglu_width(self.n_embd)

    # ---- presets ----
    @classmethod
    def gpt2_style(cls, **overrides) -> "GPTConfig":
        """LayerNorm, learned positions, GELU (tanh) MLP, biases, tied embeddings: GPT-2 / nanoGPT."""
        return cls(**{**dict(norm="layernorm", position="learned", mlp="gelu", bias=True, tie_embeddings=True),
                      **overrides})

    @classmethod
    def llama_style(cls, **overrides) -> "GPTConfig":
        """RMSNorm, rotary positions, SwiGLU MLP, no biases, untied head; set n_kv_head for grouped-query."""
        return cls(**{**dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, tie_embeddings=False,
                             norm_eps=1e-5), **overrides})

    # ---- JSON ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        if not isinstance(data, dict):
            raise ValueError(f"GPTConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
