"""Comparisons against a float64 reference, judged by PyTorch's own error at the same precision."""
import torch

import fastllm

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every kernel backend with the device its tests run on: Triton on the GPU, or in the interpreter on the CPU.
BACKEND_DEVICES = [("torch", _DEVICE), ("cpp", "cpu"), ("triton", _DEVICE)]
KERNEL_BACKEND_DEVICES = BACKEND_DEVICES[1:]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_id(param):
    return param[0] if isinstance(param, tuple) else str(param).removeprefix("torch.")


def on_backend(name):
    """use_backend that raises instead of silently falling back to torch."""
    return fastllm.use_backend(name, strict=True)


def assert_matches_reference(name, actual, expected, baseline, ratio=2.0):
    """actual (our kernel) vs expected (float64 reference): max error at most `ratio` x baseline's (the torch
    reference at the same precision as actual) plus a floor of a few ulps of actual's dtype."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    eps = torch.finfo(actual.dtype).eps
    actual, expected, baseline = actual.double().cpu(), expected.double().cpu(), baseline.double().cpu()
    _assert_same_nonfinite(name, actual, expected)
    finite = torch.isfinite(expected)
    if not finite.any():
        return
    err = torch.where(finite, (actual - expected).abs(), 0.0)
    base_err = torch.where(finite, (baseline - expected).abs(), 0.0).nan_to_num(0.0).max().item()
    scale = max(1.0, expected[finite].abs().max().item())
    floor = 4 * eps * scale
    worst = int(err.argmax())
    tolerance = ratio * base_err + floor
    assert err.max().item() <= tolerance, (
        f"{name}: max error {err.max().item():.3e} at flat index {worst} (got {actual.flatten()[worst].item():.6g}, "
        f"expected {expected.flatten()[worst].item():.6g}) exceeds {ratio} x torch's {base_err:.3e} + {floor:.1e}")


def _assert_same_nonfinite(name, actual, expected):
    for label, check in (("NaN", torch.isnan), ("+inf", lambda t: t == float("inf")),
                         ("-inf", lambda t: t == float("-inf"))):
        mismatch = check(actual) != check(expected)
        if mismatch.any():
            i = int(mismatch.flatten().nonzero()[0])
            raise AssertionError(f"{name}: {label} disagreement at flat index {i}: got {actual.flatten()[i].item()}, "
                                 f"expected {expected.flatten()[i].item()}")


def key_bias_mask(model):
    """True on `model`'s flattened parameters but the attention's key bias (the middle third of each c_attn.bias):
    softmax ignores it, so its gradient is rounding noise, which AdamW (eps 1e-8) turns into steps of lr size that
    two summation orders (two processes, fused vs materialised heads, two CPU models' BLAS) do not share."""
    keep = []
    for name, p in model.named_parameters():
        m = torch.ones_like(p, dtype=torch.bool)
        if name.endswith("attn.c_attn.bias"):
            m[p.numel() // 3:2 * p.numel() // 3] = False
        keep.append(m.flatten())
    return torch.cat(keep)
