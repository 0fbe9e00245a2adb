"""Generation speed: fastllm's GPT.generate against Hugging Face generate on the same weights (CPU).

    python -m bench.generate                    # batch 1 and 8, 64 and 256 new tokens, greedy and sampled
    python -m bench.generate --quick            # a tiny model and a few tokens: a smoke run of seconds
    python -m bench.generate --threads 2        # torch threads for both sides (default 1)
    python -m bench.generate --dtype bfloat16   # both models in bf16 (default float32)

A Llama-style model (6 layers x 512, 8 query / 4 key-value heads, SwiGLU, vocabulary 32000) is built from a
transformers LlamaConfig with random weights, saved to a temporary folder, and loaded by both sides:
transformers' LlamaForCausalLM and fastllm's GPT.from_hf. Nothing is downloaded. Every prompt is 32 random
tokens and runs to exactly max_new_tokens (no stop token), so both sides do the same work; sampling is from
softmax(logits) unrestricted (HF: top_k=0, top_p=1). The two sides' calls alternate, who goes first rotating
(harness.time_rotating), and tokens/s is batch x new tokens over the median call. fastllm's first call at a
batch size lays its weights out for that batch (fastllm.model.decode.cached_linear); that call is the
warm-up, and its time is reported apart. Greedy tokens are compared with HF's (a difference is reported,
with where it starts). The machine's load average is printed before and after.

Then fastllm's decode step, timed by section (fastllm.model.decode.section_times) over one greedy call per
batch size: the ms per step of the matmuls, the head matmul, attention, norms, cache writes, rotary /
embedding / activation, sampling, and the rest of the wall time (the prefill spread over the steps, Python).
Writes a table to the terminal and bench/out/generate.json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from bench import harness
from bench import report as reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_TOKENS = 32
FULL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)


def build_models(config_kwargs, folder, dtype=torch.float32):
    """(transformers LlamaForCausalLM, fastllm GPT) on the same random weights, both in eval mode and in `dtype`
    (both cast from the same fp32 weights, so they hold the same values)."""
    import transformers

    from fastllm.model import GPT

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**config_kwargs, rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(folder)
    hf_model.generation_config.eos_token_id = None  # every call runs to max_new_tokens
    hf_model.generation_config.pad_token_id = 0
    return hf_model.to(dtype), GPT.from_hf(folder).to(dtype).eval()


def hf_generate(model, prompts, new_tokens, sample):
    options = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
    return out[:, prompts.shape[1]:].tolist()


def fastllm_generate(model, prompts, new_tokens, sample):
    return model.generate(prompts, new_tokens, temperature=1.0 if sample else 0.0).tokens


def _first_difference(a, b):
    """None if the token lists are equal, else (row, position) of the first difference."""
    for row, (x, y) in enumerate(zip(a, b)):
        for position, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return row, position
        if len(x) != len(y):
            return row, min(len(x), len(y))
    return None


def measure_speed(hf_model, model, vocab, batches, new_token_counts, rounds):
    """One row per (batch, new tokens, greedy or sampled): each side's median seconds and tokens/s."""
    from fastllm.model import decode

    rows = []
    generator = torch.Generator().manual_seed(1)
    for batch in batches:
        prompts = torch.randint(0, vocab, (batch, PROMPT_TOKENS), generator=generator)
        for new_tokens in new_token_counts:
            for sample in (False, True):
                calls = {"hf": lambda: hf_generate(hf_model, prompts, new_tokens, sample),
                         "fastllm": lambda: fastllm_generate(model, prompts, new_tokens, sample)}
                decode.release_layouts(model)  # the first call lays the weights out again: timed apart
                start = time.perf_counter()
                tokens = calls["fastllm"]()
                first_s = time.perf_counter() - start
                difference = None
                if not sample:
                    difference = _first_difference(calls["hf"](), tokens)
                times = harness.time_rotating(calls, rounds)
                seconds = {name: statistics.median(t) for name, t in times.items()}
                rows.append({"batch": batch, "new_tokens": new_tokens, "mode": "sampled" if sample else "greedy",
                             "hf_s": seconds["hf"], "fastllm_s": seconds["fastllm"], "fastllm_first_call_s": first_s,
                             "hf_tokens_per_s": batch * new_tokens / seconds["hf"],
                             "fastllm_tokens_per_s": batch * new_tokens / seconds["fastllm"],
                             "speedup": seconds["hf"] / seconds["fastllm"],
                             "greedy_equal_hf": None if sample else difference is None,
                             "first_difference": difference})
                print(_speed_line(rows[-1]), flush=True)
    return rows


def _speed_line(row):
    line = (f"batch {row['batch']:2d}, {row['new_tokens']:3d} new tokens, {row['mode']:7s}: "
            f"HF {row['hf_tokens_per_s']:7.1f} tok/s, fastllm {row['fastllm_tokens_per_s']:7.1f} tok/s, "
            f"{row['speedup']:.2f}x (fastllm's first call {row['fastllm_first_call_s']:.2f} s)")
    if row["first_difference"] is not None:
        line += f"; GREEDY TOKENS DIFFER from HF's at (row, position) {row['first_difference']}"
    return line


def decode_step_split(model, vocab, batch, new_tokens):
    """Per decode step, the ms of each section of fastllm's decode (and of sampling), and the rest of the
    call's wall time (the prefill spread over the steps, the loop's Python), over one greedy call."""
    from fastllm.model import decode

    prompts = torch.randint(0, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(2))
    fastllm_generate(model, prompts, new_tokens, sample=False)  # warm, weights laid out
    with decode.section_times() as seconds:
        start = time.perf_counter()
        fastllm_generate(model, prompts, new_tokens, sample=False)
        wall_s = time.perf_counter() - start
    split = {name: s * 1e3 / new_tokens for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])}
    split["rest: prefill, Python (wall - sections)"] = max(0.0, wall_s * 1e3 / new_tokens - sum(split.values()))
    return {"batch": batch, "new_tokens": new_tokens, "wall_ms_per_step": wall_s * 1e3 / new_tokens,
            "ms_per_step": split}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, batch 2, 6 new tokens")
    parser.add_argument("--rounds", type=int, default=3, help="timed alternating rounds per row (default 3)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", help="comma-separated new-token counts (default 64,256)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="both models' weights and activations (default float32)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "out"), help="folder for generate.json")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    batches, new_token_counts = ((2,), (6,)) if args.quick else ((1, 8), (64, 256))
    if args.batches:
        batches = tuple(int(n) for n in args.batches.split(","))
    if args.new_tokens:
        new_token_counts = tuple(int(n) for n in args.new_tokens.split(","))
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    machine = {"device": "cpu", "cpu": reporting._cpu_model(), "cpu_cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads()}
    print(f"{reporting.machine_title(machine)}, torch {torch.__version__}, {args.threads} thread(s), {args.dtype}, "
          f"load average {load_before[0]:.2f}; model {config}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        hf_model, model = build_models(config, folder, getattr(torch, args.dtype))
    rows = measure_speed(hf_model, model, config["vocab_size"], batches, new_token_counts, args.rounds)
    splits = [decode_step_split(model, config["vocab_size"], batch, max(new_token_counts)) for batch in batches]
    for split in splits:
        print(f"fastllm decode step, batch {split['batch']}, {split['new_tokens']} tokens, greedy: "
              f"{split['wall_ms_per_step']:.2f} ms wall per step")
        for group, ms in split["ms_per_step"].items():
            print(f"  {group:42s} {ms:7.3f} ms")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "generate.json")
    with open(path, "w") as out:
        json.dump({"command": " ".join(["python -m bench.generate", *(argv or sys.argv[1:])]), "model": config,
                   "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
                   "load_average": {"before": load_before, "after": load_after}, "speed": rows, "decode_step": splits},
                  out, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
