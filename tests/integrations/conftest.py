import pytest

from fastllm.integrations import transformers as fastllm_hf


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if fastllm's attention hands a call to transformers' sdpa: these tests are about fastllm's own."""
    def fail(*args, **kwargs):
        raise AssertionError("fastllm attention fell back to sdpa")
    monkeypatch.setattr(fastllm_hf, "sdpa_attention_forward", fail)
