"""fastllm: Triton and C++ kernels for LLM training and alignment, behind one functional API."""
from .backend import BackendUnavailable, available_backends, use_backend

__version__ = "0.1.0"
__all__ = ["available_backends", "use_backend", "BackendUnavailable", "ops"]


def __getattr__(name):  # `fastllm.ops` without importing every op at `import fastllm`
    if name == "ops":
        import importlib

        return importlib.import_module(".ops", __name__)
    raise AttributeError(name)
