"""LayerNorm and RMSNorm as drop-in replacements for torch.nn.LayerNorm and torch.nn.RMSNorm.

They subclass the torch modules, so constructor arguments, parameters, initialisation, state_dict keys and
isinstance checks (e.g. "no weight decay on norms") are torch's own; only forward changes, to the fused
fastllm.ops kernels. fastllm normalizes over the last dimension only, which every transformer uses.
"""
import torch

from .. import ops


def _last_dim_only(module_name, normalized_shape):
    """normalized_shape as torch's modules store it, a 1-tuple, or a ValueError saying why not."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"fastllm.nn.{module_name} normalizes over the last dimension only: normalized_shape "
                         f"must be an int or a 1-element shape, got {normalized_shape!r}")
    return shape


def _check_last_dim(module, x):
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != module.normalized_shape[0]:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{type(module).__name__}({module.normalized_shape[0]}) expects input whose last dimension "
                         f"is {module.normalized_shape[0]}, got {shape}")


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm over the last dimension, computed by fastllm.ops.layer_norm."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None):
        super().__init__(_last_dim_only("LayerNorm", normalized_shape), eps, elementwise_affine, bias, device, dtype)

    def forward(self, x):
        _check_last_dim(self, x)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm over the last dimension, computed by fastllm.ops.rms_norm.

    eps=None means torch.finfo(x.dtype).eps, as in torch. The extra keyword `offset` scales by offset + weight
    (offset=1.0: Gemma checkpoints, which store scale - 1); the weight is initialised to 1 - offset so a fresh
    module scales by 1 either way.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *,
                 offset=0.0):
        self.offset = float(offset)  # before torch's __init__, which calls reset_parameters
        super().__init__(_last_dim_only("RMSNorm", normalized_shape), eps, elementwise_affine, device, dtype)

    def reset_parameters(self):
        if self.elementwise_affine:
            torch.nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x):
        _check_last_dim(self, x)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return ops.rms_norm(x, self.weight, eps, offset=self.offset)

    def extra_repr(self):
        return super().extra_repr() + (f", offset={self.offset}" if self.offset else "")
