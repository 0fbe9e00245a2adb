"""Drop-in torch.nn modules backed by fastllm.ops: same constructor arguments and state_dict keys as torch.nn,
so swapping one in is a one-line change and existing checkpoints load unchanged."""
from .norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
