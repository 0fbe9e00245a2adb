"""Test set-up: without a GPU the Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton decorates any kernel, hence here, before any fastllm import.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastllm  # noqa: E402


@pytest.fixture
def poison_outputs():
    """Fill every torch.empty() with NaN (and ints with their max), so an element a kernel forgets to write
    shows up as NaN instead of whatever the allocator left there."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def streaming_stores():
    """Every output of the C++ norm and softmax kernels written with streaming stores (by default only those
    larger than most of the last-level cache are), so the streaming path meets every shape and dtype."""
    from fastllm import _cpp

    cpp = _cpp.load()
    previous = cpp.set_streaming_store_threshold(0)
    yield
    cpp.set_streaming_store_threshold(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
