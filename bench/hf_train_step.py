"""A transformers training step, unpatched vs fastllm.integrations.transformers, on the CPU.

    python -m bench.hf_train_step                          # Llama-style, hidden 256, 2 layers, vocab 32000
    python -m bench.hf_train_step --seq 512 --batch 4 --steps 10 --out /tmp/hf_train_step.md

One step is forward + backward of a randomly initialised LlamaForCausalLM with labels (the loss transformers
computes when training), gradients set to None before each step so every step allocates them. The variants
hold the same weights and run interleaved in one process, so load on the machine hits them alike:

    transformers        the model as transformers builds it (attn_implementation="sdpa")
    fastllm loss        apply(model, norm=False, attention=False): only the fused linear cross-entropy
    fastllm all         apply(model): fastllm norms, attention and the fused loss

Time: the median over --steps steps after --warmup. Memory: the peak RSS of one step above the RSS before it
(VmHWM after resetting it with /proc/self/clear_refs, bench.harness.PeakMemory), the max over the steps. To
make RSS follow live tensors, glibc is told to serve every allocation of 1 MiB or more with mmap (mallopt), so
freed tensors leave RSS at once instead of staying in the heap for the next variant to reuse.
"""
import argparse
import shlex
import statistics
import sys

import torch

from bench.harness import MiB, mmap_large_allocations, time_rotating


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.hf_train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688, help="MLP width (Llama's 8/3 x hidden)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--out", help="also write the markdown table to this file")
    return parser.parse_args(argv)


def build_models(args):
    import transformers

    from fastllm.integrations import transformers as fastllm_hf

    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).train()
    state = base.state_dict()

    def copy(**parts):
        model = transformers.LlamaForCausalLM(config).train()
        model.load_state_dict(state)
        return fastllm_hf.apply(model, **parts)

    return {"transformers": base, "fastllm loss": copy(norm=False, attention=False), "fastllm all": copy()}


def train_step(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.item()


def run(args):
    mmapped = mmap_large_allocations()
    models = build_models(args)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    losses = {}
    for name, model in models.items():
        for _ in range(args.warmup):
            losses[name] = train_step(model, input_ids)
    names = list(models)
    peaks = {name: [] for name in models}
    times = time_rotating({name: (lambda m=models[name]: train_step(m, input_ids)) for name in names}, args.steps,
                          peaks=peaks)
    tokens = args.batch * args.seq
    rows = []
    base_time, base_peak = statistics.median(times["transformers"]), max(peaks["transformers"], default=None)
    for name in names:
        seconds = statistics.median(times[name])
        peak = max(peaks[name], default=None)
        rows.append([name, f"{losses[name]:.4f}", f"{seconds * 1e3:.0f}", f"{tokens / seconds:,.0f}",
                     f"{base_time / seconds:.2f}x",
                     "n/a" if peak is None else f"{peak / MiB:.0f}",
                     "n/a" if peak is None or not base_peak else f"{100 * (1 - peak / base_peak):+.0f}%"])
    header = ["variant", "loss", "step ms (median)", "tokens/s", "speed vs transformers", "peak extra MiB",
              "peak memory saved"]
    lines = [f"LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), "
             f"vocab {args.vocab}, batch {args.batch} x seq {args.seq} = {tokens} tokens, fp32, "
             f"{torch.get_num_threads()} torch threads; median of {args.steps} steps after {args.warmup} warm-up"
             + ("" if mmapped else " (mallopt unavailable: heap reuse may hide memory)"),
             "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    table = run(args)
    command = "python -m bench.hf_train_step " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    text = f"`{command.strip()}`\n\n{table}\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
