"""fastllm.nn.LayerNorm / RMSNorm are drop-in replacements for torch.nn.LayerNorm / RMSNorm."""
import pytest
import torch
from numerics import BACKEND_DEVICES, on_backend

import fastllm.nn

# (fastllm module, torch module, constructor keyword arguments)
CONFIGS = [
    (fastllm.nn.LayerNorm, torch.nn.LayerNorm, {}),
    (fastllm.nn.LayerNorm, torch.nn.LayerNorm, {"bias": False}),
    (fastllm.nn.LayerNorm, torch.nn.LayerNorm, {"elementwise_affine": False, "eps": 1e-3}),
    (fastllm.nn.RMSNorm, torch.nn.RMSNorm, {}),
    (fastllm.nn.RMSNorm, torch.nn.RMSNorm, {"eps": 1e-6}),
    (fastllm.nn.RMSNorm, torch.nn.RMSNorm, {"elementwise_affine": False}),
]
CONFIG_IDS = ["layernorm", "layernorm-nobias", "layernorm-noaffine", "rmsnorm", "rmsnorm-eps", "rmsnorm-noaffine"]
BACKENDS = dict(argnames="backend,device", argvalues=BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])


def _trained_like(module):
    """Parameters away from their initial 1 / 0, so that loading them visibly matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    return module


@pytest.mark.parametrize("ours,theirs,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_keys_match_torch(ours, theirs, kwargs):
    mine, reference = ours(64, **kwargs), theirs(64, **kwargs)
    assert isinstance(mine, theirs)  # code that special-cases torch's norms (e.g. weight decay) still does
    assert list(mine.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert mine.state_dict()[key].shape == value.shape and mine.state_dict()[key].dtype == value.dtype
        torch.testing.assert_close(mine.state_dict()[key], value)  # the same initialisation


@pytest.mark.parametrize(**BACKENDS)
@pytest.mark.parametrize("ours,theirs,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_loads_torch_state_dict_and_matches(ours, theirs, kwargs, backend, device):
    """A torch.nn checkpoint loads strictly; outputs and every gradient then match torch's module."""
    reference = _trained_like(theirs(48, **kwargs)).to(device)
    mine = ours(48, **kwargs).to(device)
    mine.load_state_dict(reference.state_dict())
    x = torch.randn(3, 5, 48, device=device)
    cotangent = torch.randn_like(x)
    results = []
    for module, context in ((mine, on_backend(backend)), (reference, on_backend("torch"))):
        xi = x.clone().requires_grad_(True)
        with context:
            out = module(xi)
        out.backward(cotangent)
        results.append((out, xi.grad, [p.grad for p in module.parameters()]))
    (out, dx, dparams), (ref_out, ref_dx, ref_dparams) = results
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dx, ref_dx)
    assert len(dparams) == len(ref_dparams)
    for dp, ref_dp in zip(dparams, ref_dparams):
        torch.testing.assert_close(dp, ref_dp)


@pytest.mark.parametrize(**BACKENDS)
@pytest.mark.parametrize("ours,theirs,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_bfloat16_activations_with_fp32_parameters(ours, theirs, kwargs, backend, device):
    """Autocast-style use: bf16 in and out, fp32 parameters; the output is torch's fp32 result, rounded once."""
    reference = _trained_like(theirs(48, **kwargs)).to(device)
    mine = ours(48, **kwargs).to(device)
    mine.load_state_dict(reference.state_dict())
    x = torch.randn(3, 5, 48, device=device).bfloat16()
    with on_backend(backend):
        out = mine(x)
    expected = reference(x.float())
    assert out.dtype == torch.bfloat16
    bf16_eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(out.float(), expected, rtol=bf16_eps, atol=bf16_eps * expected.abs().max().item())


def test_swapping_in_a_model_is_one_line():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8),
                                torch.nn.RMSNorm(8))
    swapped = torch.nn.Sequential(torch.nn.Linear(16, 32), fastllm.nn.LayerNorm(32), torch.nn.Linear(32, 8),
                                  fastllm.nn.RMSNorm(8))
    swapped.load_state_dict(model.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(swapped(x), model(x))


def test_rms_norm_offset_is_gemma_convention():
    """offset=1: the stored weight is scale - 1, and a fresh module still scales by 1."""
    gemma = fastllm.nn.RMSNorm(32, eps=1e-6, offset=1.0)
    plain = fastllm.nn.RMSNorm(32, eps=1e-6)
    assert torch.all(gemma.weight == 0) and "offset=1.0" in repr(gemma)
    x = torch.randn(4, 32)
    torch.testing.assert_close(gemma(x), plain(x))
    with torch.no_grad():
        gemma.weight.fill_(0.25)
        plain.weight.fill_(1.25)
    torch.testing.assert_close(gemma(x), plain(x))


@pytest.mark.parametrize("module", [fastllm.nn.LayerNorm, fastllm.nn.RMSNorm], ids=["layernorm", "rmsnorm"])
def test_multi_dimensional_normalized_shape_is_rejected(module):
    with pytest.raises(ValueError, match="normalizes over the last dimension only"):
        module((4, 8))
    assert module([8]).normalized_shape == (8,)  # a 1-element shape is fine, as torch writes it
    assert module(torch.Size([8])).normalized_shape == (8,)


@pytest.mark.parametrize("module", [fastllm.nn.LayerNorm, fastllm.nn.RMSNorm], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_wrong_last_dimension_is_rejected(module, affine):
    with pytest.raises(ValueError, match="expects input whose last dimension is 8, got"):
        module(8, elementwise_affine=affine)(torch.randn(2, 9))
