"""fastllm inside other libraries' models. Each integration is its own submodule, imported explicitly, so fastllm
never imports a library you did not ask for:

    from fastllm.integrations import transformers as fastllm_hf
    model = fastllm_hf.apply(model)
"""
