"""TRL trainer steps, unpatched vs fastllm.integrations.trl.apply, on the CPU: GRPO, DPO and padded SFT.

    python -m bench.trl_step                                   # vocab 32000 and 128256, completions of 256
    python -m bench.trl_step --vocab 128256 --steps 5 --out /tmp/trl_step.md

One step is what the trainer does per optimizer step besides the optimizer: TRL's own compute_loss(model, batch)
and the backward, on a batch built here (random tokens: the cost does not depend on them), with the gradients
set to None before each step so every step allocates them. The model is a randomly initialised Llama (hidden
--hidden, --layers layers) with a real vocabulary size; each trainer is built twice from the same weights, and
the two run interleaved in one process (bench.harness.time_rotating), so load on the machine hits them alike:

    trl       the trainer as TRL 1.16 builds it: its own chunked fused LM head (trl.kernels), transformers' sdpa
    fastllm   the same trainer after fastllm.integrations.trl.apply(trainer)

GRPO: --batch completions of --completion tokens after --prompt prompt tokens, loss_type "dapo" with a KL term
(beta 0.04: the reference log-probs are part of the batch, as TRL's generation step leaves them). DPO: --batch
pairs, each a prompt and chosen / rejected completions of --completion tokens, with its reference model's
forward inside the step as in TRL. SFT: --batch sequences of --prompt + --completion tokens, right-padded to
lengths spread over [half, full].

Time: the median over --steps steps after --warmup. Memory: the peak RSS of one step above the RSS before it
(VmHWM after resetting it with /proc/self/clear_refs, bench.harness.PeakMemory), the max over the steps; glibc
is told to serve every allocation of 1 MiB or more with mmap (bench.harness.mmap_large_allocations), so RSS
follows live tensors. fp32 (TRL's configs default to bf16 autocast; --bf16 measures that).
"""
import argparse
import gc
import shlex
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from bench.harness import MiB, mmap_large_allocations, time_rotating
from bench.report import markdown_table

TRAINERS = ("grpo", "dpo", "sft")
VARIANTS = ("trl", "fastllm")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.trl_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (TRL's default)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    return parser.parse_args(argv)


def word_tokenizer():
    """A word-level tokenizer of a few words (the trainers want one; the batches are built as token ids)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "a", "b", "c"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def model_folder(args, vocab):
    """A saved random Llama (TRL loads the reference model from the policy's path)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=args.prompt + 2 * args.completion,
                                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="fastllm_bench_trl_")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def build_trainer(kind, folder, args, tokenizer):
    import datasets
    import transformers
    import trl

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    common = dict(output_dir=tempfile.mkdtemp(prefix="fastllm_bench_trl_out_"), per_device_train_batch_size=args.batch,
                  report_to=[], use_cpu=True, bf16=args.bf16, save_strategy="no", disable_tqdm=True)
    if kind == "grpo":
        config = trl.GRPOConfig(**common, num_generations=args.batch, max_completion_length=args.completion,
                                beta=0.04, loss_type="dapo")
        data = datasets.Dataset.from_dict({"prompt": ["a b"] * args.batch})
        trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                                  args=config, train_dataset=data, processing_class=tokenizer)
    elif kind == "dpo":
        data = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
        trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**common), train_dataset=data,
                                 processing_class=tokenizer)
    else:
        data = datasets.Dataset.from_dict({"text": ["a b c"]})
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common), train_dataset=data,
                                 processing_class=tokenizer)
    trainer.model.train()
    # what train() sets before its first step, and GRPO's loss normalisation reads
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainer


def make_batch(kind, args, vocab):
    """The tensors TRL's compute_loss reads for `kind`, random tokens in [2, vocab)."""
    generator = torch.Generator().manual_seed(1)
    tokens = lambda *shape: torch.randint(2, vocab, shape, generator=generator)  # noqa: E731
    batch, prompt, completion = args.batch, args.prompt, args.completion
    if kind == "grpo":
        completion_mask = torch.ones(batch, completion, dtype=torch.long)
        return {"prompt_ids": tokens(batch, prompt), "prompt_mask": torch.ones(batch, prompt, dtype=torch.long),
                "completion_ids": tokens(batch, completion), "completion_mask": completion_mask,
                "advantages": torch.randn(batch, generator=generator),
                "ref_per_token_logps": -torch.rand(batch, completion, generator=generator) * 10,
                "num_items_in_batch": completion_mask.sum()}
    lengths = torch.linspace(completion // 2, completion, batch).long()
    ids_length = prompt + completion
    if kind == "dpo":
        lengths = torch.cat([lengths, lengths.flip(0)])  # chosen rows, then rejected rows
    positions = torch.arange(ids_length)
    attention_mask = (positions < (prompt + lengths)[:, None]).long()
    input_ids = tokens(len(lengths), ids_length) * attention_mask
    if kind == "dpo":
        completion_mask = attention_mask * (positions >= prompt)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def train_step(trainer, batch):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.item()


def measure(kind, vocab, args, tokenizer):
    """{variant: (loss, median step s, peak extra bytes or None)} for one trainer at one vocabulary size."""
    from fastllm.integrations import trl as fastllm_trl

    folder = model_folder(args, vocab)
    trainers = {name: build_trainer(kind, folder, args, tokenizer) for name in VARIANTS}
    fastllm_trl.apply(trainers["fastllm"])
    batch = make_batch(kind, args, vocab)
    losses = {}
    for name, trainer in trainers.items():
        for _ in range(args.warmup):
            losses[name] = train_step(trainer, batch)
    peaks = {name: [] for name in trainers}
    times = time_rotating({name: (lambda t=trainer: train_step(t, batch)) for name, trainer in trainers.items()},
                          args.steps, peaks=peaks)
    del trainers
    gc.collect()
    return {name: (losses[name], statistics.median(times[name]), max(peaks[name], default=None))
            for name in VARIANTS}


def run(args):
    mmapped = mmap_large_allocations()
    tokenizer = word_tokenizer()
    header = ["trainer", "vocab", "scored tokens", "variant", "loss", "step ms (median)", "speed vs trl",
              "peak extra MiB", "memory / trl"]
    rows = []
    for kind in args.trainers:
        for vocab in args.vocab:
            results = measure(kind, vocab, args, tokenizer)
            base_time, base_peak = results["trl"][1], results["trl"][2]
            scored = args.batch * args.completion * (2 if kind == "dpo" else 1)
            for name, (loss, seconds, peak) in results.items():
                rows.append([kind.upper(), f"{vocab:,}", f"{scored:,}" + ("" if kind == "grpo" else " max"), name,
                             f"{loss:.4f}", f"{seconds * 1e3:,.0f}", f"{base_time / seconds:.2f}x",
                             "n/a" if peak is None else f"{peak / MiB:,.0f}",
                             "n/a" if peak is None or not base_peak else f"{peak / base_peak:.2f}"])
            print(markdown_table(header, rows[-len(results):]), flush=True)
    lines = [f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch}, prompt {args.prompt} + completion "
             f"{args.completion} tokens, {'bf16 autocast' if args.bf16 else 'fp32'}, {torch.get_num_threads()} torch "
             f"threads; median of {args.steps} steps after {args.warmup} warm-up"
             + ("" if mmapped else " (mallopt unavailable: heap reuse may hide memory)"), "",
             markdown_table(header, rows)]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, per trainer
    text = f"`{shlex.join(['python', '-m', 'bench.trl_step', *argv])}`\n\n{run(args)}\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
