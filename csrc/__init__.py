"""C++ and CUDA sources of fastllm, shipped so the extension can be compiled on first use."""
