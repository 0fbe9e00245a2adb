"""Training throughput of a whole GPT step on the CPU: fastllm's kernels against the same model without them.

    python -m bench.train_step                        # both models, 1 and 2 torch threads
    python -m bench.train_step --steps 40 --threads 1 --models small --out /tmp/ts

One step = forward with the loss, backward, gradient clipping (as fastllm.train's loop does), AdamW update,
zero_grad; on a fixed set of random token batches. Each model is built once and copied into three variants
with identical weights and their own AdamW (fastllm.train.optim's weight-decay groups):

  fastllm[cpp]        GPTConfig(use_kernels=True) under use_backend("cpp", strict=True): the C++ kernels
                      (fused add+LayerNorm/RMSNorm, flash attention, fused linear cross-entropy).
  use_kernels[torch]  the same model under use_backend("torch"): every fastllm.ops call runs its plain-PyTorch
                      reference (F.layer_norm, matmul-mask-softmax-matmul attention, materialised logits).
                      This is "the same model on the torch backend" in the issue's words.
  plain PyTorch       GPTConfig(use_kernels=False): what a PyTorch user would write (F.layer_norm,
                      F.scaled_dot_product_attention, F.linear + F.cross_entropy). The stronger baseline.

Timing: all variants in one process, warm-up steps first, then rounds in which every variant runs one step
(the order rotates each round: A B C, B C A, ...), so machine load drifts onto all of them alike. Reported:
the median step time and tokens/s = batch x block_size / median, per torch thread count. Then
torch.profiler over a few more steps of each variant gives the top ops by self CPU time, with fastllm::
custom ops (and other families) grouped, and a microbenchmark of one fastllm op call against its raw C++
kernel and against plain PyTorch measures the per-call overhead.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function

import fastllm
from bench import harness
from bench import report as reporting
from fastllm.model import GPT, GPTConfig
from fastllm.train.optim import param_groups
from fastllm.train.pretrain import TRAIN_DEFAULTS, model_config, parser_defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "out", "train_step.md")
KERNELS = "fastllm[cpp]"
OPS_TORCH = "use_kernels[torch]"
PLAIN = "plain PyTorch"
VARIANTS = (KERNELS, OPS_TORCH, PLAIN)
TARGET = 1.3  # the issue's target: kernels' tokens/s over the torch backend's


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    name: str
    config: GPTConfig  # use_kernels is set per variant
    batch_size: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.config.block_size

    def describe(self) -> str:
        c = self.config
        kv = f", {c.kv_heads} kv heads" if c.kv_heads != c.n_head else ""
        return (f"{c.norm}/{c.position}/{c.mlp}, {c.n_layer} layers x {c.n_embd} wide, {c.n_head} heads{kv}, "
                f"vocab {c.vocab_size}, batch {self.batch_size} x {c.block_size} tokens")


def pretrain_small(vocab_size: int = 4096) -> ModelSpec:
    """Exactly the model `fastllm pretrain` builds by default (its --vocab-size default is 4096), at its
    default batch size."""
    args = parser_defaults()
    return ModelSpec("small (fastllm pretrain default)", model_config(args, vocab_size), TRAIN_DEFAULTS["batch_size"])


def llama_medium() -> ModelSpec:
    """A slightly larger Llama-style model: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied head."""
    config = GPTConfig.llama_style(vocab_size=4096, n_layer=4, n_head=8, n_kv_head=4, n_embd=256, block_size=256)
    return ModelSpec("llama-style 256 wide", config, 8)


MODELS: dict[str, Callable[[], ModelSpec]] = {"small": pretrain_small, "llama": llama_medium}


# ---------------------------------------------------------------------------------------------------------
# One training step per variant
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Runner:
    """A variant's model, optimizer and backend context; step(batch) runs one training step."""
    name: str
    model: GPT
    optimizer: torch.optim.Optimizer
    context: Callable[[], contextlib.AbstractContextManager]
    grad_clip: float

    def step(self, batch: torch.Tensor) -> float:
        # The record_function labels cost ~1 us each outside a profile; inside, they split the step into phases.
        with self.context():
            with record_function(PHASES[0]):
                _, loss = self.model(batch[:, :-1], batch[:, 1:])
            with record_function(PHASES[1]):
                loss.backward()
        if self.grad_clip > 0:
            with record_function(PHASES[2]):  # .item(): as the training loop does
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip).item()
        with record_function(PHASES[3]):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def build_runners(spec: ModelSpec, seed: int = 0) -> list[Runner]:
    torch.manual_seed(seed)
    reference = GPT(dataclasses.replace(spec.config, use_kernels=True))
    state = copy.deepcopy(reference.state_dict())
    lr, wd = TRAIN_DEFAULTS["lr"], TRAIN_DEFAULTS["weight_decay"]
    contexts = {KERNELS: lambda: fastllm.use_backend("cpp", strict=True),
                OPS_TORCH: lambda: fastllm.use_backend("torch"),
                PLAIN: contextlib.nullcontext}
    runners = []
    for name in VARIANTS:
        model = GPT(dataclasses.replace(spec.config, use_kernels=name != PLAIN))
        model.load_state_dict(state)
        model.train()
        optimizer = torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=(0.9, 0.95), eps=1e-8)
        runners.append(Runner(name, model, optimizer, contexts[name], grad_clip=1.0))
    return runners


def make_batches(spec: ModelSpec, count: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Random token rows of block_size + 1 (inputs and shifted targets), the same for every variant."""
    generator = torch.Generator().manual_seed(seed)
    shape = (spec.batch_size, spec.config.block_size + 1)
    return [torch.randint(0, spec.config.vocab_size, shape, generator=generator) for _ in range(count)]


def time_interleaved(runners: list[Runner], batches: list[torch.Tensor], steps: int, warmup: int
                     ) -> dict[str, list[float]]:
    """Per variant, the wall time of each of `steps` steps (seconds), after `warmup` untimed rounds; round i
    gives every variant batch i (cyclically)."""
    def stepper(runner):
        batch_cycle = itertools.cycle(batches)
        return lambda: runner.step(next(batch_cycle))

    return harness.time_rotating({r.name: stepper(r) for r in runners}, steps, warmup=warmup)


# ---------------------------------------------------------------------------------------------------------
# Profile: top ops by self CPU time
# ---------------------------------------------------------------------------------------------------------
PHASES = ("step: forward", "step: backward", "step: clip_grad_norm", "step: optimizer")


def op_group(name: str) -> str:
    # The custom op's own record (fastllm::norm) and the autograd.Function that torch.library wraps it in
    # (GeneratedBackwardFor_fastllm_norm_default: the C++ kernel's time lands there, as pybind calls are not
    # recorded) are both fastllm's.
    if "fastllm" in name:
        return "fastllm:: custom ops"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"):
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "sdpa attention"
    if "layer_norm" in name or "rms_norm" in name:
        return "aten norms"
    if "_foreach" in name or name.startswith("Optimizer.") or "adamw" in name.lower():
        return "optimizer"
    if "softmax" in name or "nll_loss" in name or "cross_entropy" in name or "logsumexp" in name:
        return "softmax / loss"
    if name.startswith("autograd::") or name.startswith("torch::autograd"):
        return "autograd engine"
    if name in PHASES:
        return "python (outside ops)"
    return "other aten"


def profile_steps(runner: Runner, batches: list[torch.Tensor], steps: int, top: int) -> dict:
    """Self CPU time per op (ms per step) over `steps` profiled steps, its top rows and the totals by group."""
    from torch.profiler import ProfilerActivity, profile

    runner.step(batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            runner.step(batches[i % len(batches)])
        wall = time.perf_counter() - start
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e3 / steps for e in events if e.key in PHASES}
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in events]
    rows = [r for r in rows if r[1] > 0]
    rows.sort(key=lambda r: -r[1])
    groups: dict[str, float] = {}
    for name, ms, _ in rows:
        groups[op_group(name)] = groups.get(op_group(name), 0.0) + ms
    fastllm_ops = [r for r in rows if r[0].startswith("fastllm::")]
    return {"wall_ms": wall * 1e3 / steps, "phases": [(k, phases.get(k, 0.0)) for k in PHASES],
            "op_self_ms": sum(r[1] for r in rows), "top": rows[:top], "fastllm_ops": fastllm_ops, "groups": sorted(groups.items(), key=lambda kv: -kv[1]),
            "ops_per_step": sum(r[2] for r in rows)}


# ---------------------------------------------------------------------------------------------------------
# Per-call overhead: the public fastllm op vs its raw C++ kernel vs plain PyTorch, at the model's shapes
# ---------------------------------------------------------------------------------------------------------
def overhead_rows(spec: ModelSpec, min_time_s: float = 0.2) -> list[tuple[str, str, float]]:
    """(case, variant, microseconds per call)."""
    from fastllm import _cpp, ops
    from fastllm.ops.attention import _check_options

    cpp = _cpp.load()
    settings = harness.Settings(min_time_s=min_time_s, min_runs=20, max_runs=100000)
    cpu = torch.device("cpu")

    def us(fn):
        fn()
        return harness.median_ms(fn, cpu, settings) * 1e3

    c = spec.config
    out = []
    for rows in (spec.tokens_per_step, 8):
        label = f"add_layer_norm fwd {rows}x{c.n_embd}"
        x, r = torch.randn(rows, c.n_embd), torch.randn(rows, c.n_embd)
        w, b = torch.randn(c.n_embd), torch.randn(c.n_embd)
        with torch.no_grad(), fastllm.use_backend("cpp", strict=True):
            out.append((label, "raw C++ kernel (cpp.norm_forward)",
                        us(lambda: cpp.norm_forward(x, r, w, b, 1e-5, 0.0, False))))
            out.append((label, "torch.ops.fastllm.norm (custom op)",
                        us(lambda: torch.ops.fastllm.norm(x, r, w, b, 1e-5, 0.0, False, "cpp"))))
            out.append((label, "ops.add_layer_norm (public, no grad)", us(lambda: ops.add_layer_norm(x, r, w, b))))
        xg, rg, wg, bg = (t.clone().requires_grad_() for t in (x, r, w, b))
        with fastllm.use_backend("cpp", strict=True):
            out.append((label, "ops.add_layer_norm (public, with autograd)",
                        us(lambda: ops.add_layer_norm(xg, rg, wg, bg))))
            label_fb = label.replace("fwd", "fwd+bwd")
            out.append((label_fb, "ops.add_layer_norm", us(lambda: torch.autograd.backward(
                ops.add_layer_norm(xg, rg, wg, bg)[0].sum()))))
        with torch.no_grad():
            out.append((label, "plain: x + r, F.layer_norm", us(lambda: F.layer_norm(x + r, (c.n_embd,), w, b))))
        out.append((label_fb, "plain: x + r, F.layer_norm", us(lambda: torch.autograd.backward(
            F.layer_norm(xg + rg, (c.n_embd,), wg, bg).sum()))))

    B, T, nh, hd = spec.batch_size, c.block_size, c.n_head, c.head_size
    q, k, v = (torch.randn(B, T, nh, hd) for _ in range(3))
    scale, left, right = _check_options(True, None, None, hd)
    label = f"attention fwd {B}x{T}x{nh}x{hd} causal"
    q3, k3, v3 = (t.reshape(B * T, nh, hd).contiguous() for t in (q, k, v))
    with torch.no_grad(), fastllm.use_backend("cpp", strict=True):
        out.append((label, "raw C++ kernel (cpp.attention_forward)", us(lambda: cpp.attention_forward(
            q3, k3, v3, None, None, None, T, T, scale, left, right))))
        out.append((label, "ops.attention (public, no grad)", us(lambda: ops.attention(q, k, v, causal=True))))
    with torch.no_grad():
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out.append((label, "plain: F.scaled_dot_product_attention", us(
            lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2).contiguous())))
    return out


# ---------------------------------------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------------------------------------
def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def run(specs: list[ModelSpec], *, threads: tuple[int, ...] = (1, 2), steps: int = 30, warmup: int = 3,
        profile_threads: Optional[int] = None, profile_step_count: int = 5, top: int = 12,
        overhead: bool = True, log=lambda msg: None) -> dict:
    """Measure every model x thread count x variant; returns a plain dict (see format_report)."""
    previous_threads = torch.get_num_threads()
    report = {"threads": list(threads), "steps": steps, "warmup": warmup, "loadavg_start": loadavg(),
              "models": [], "overhead": []}
    try:
        for spec in specs:
            runners = build_runners(spec)
            batches = make_batches(spec)
            model_report = {"name": spec.name, "describe": spec.describe(), "tokens_per_step": spec.tokens_per_step,
                            "params_m": runners[0].model.num_params() / 1e6, "timings": [], "profiles": {}}
            for n in threads:
                torch.set_num_threads(n)
                log(f"{spec.name}: {n} thread(s), {warmup} warm-up + {steps} interleaved rounds (load {loadavg()})")
                times = time_interleaved(runners, batches, steps, warmup)
                row = {"threads": n, "loadavg": loadavg(), "variants": {}}
                for name, ts in times.items():
                    median = statistics.median(ts)
                    row["variants"][name] = {"median_ms": median * 1e3, "min_ms": min(ts) * 1e3,
                                             "tokens_per_s": spec.tokens_per_step / median}
                model_report["timings"].append(row)
            if profile_step_count > 0:
                n = profile_threads or threads[0]
                torch.set_num_threads(n)
                model_report["profile_threads"] = n
                for runner in runners:
                    log(f"{spec.name}: profiling {runner.name} ({profile_step_count} steps, {n} thread(s))")
                    model_report["profiles"][runner.name] = profile_steps(runner, batches, profile_step_count, top)
            report["models"].append(model_report)
        if overhead and specs:
            torch.set_num_threads(profile_threads or threads[0])
            log("per-call overhead microbenchmark")
            report["overhead_model"] = specs[0].name
            report["overhead_threads"] = torch.get_num_threads()
            report["overhead"] = overhead_rows(specs[0])
    finally:
        torch.set_num_threads(previous_threads)
    report["loadavg_end"] = loadavg()
    return report


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
_num = reporting._fmt_number


def format_report(report: dict, machine: Optional[dict] = None, command: str = "") -> str:
    lines = ["# Training step throughput: fastllm kernels vs torch backend (CPU)", ""]
    if machine:
        lines.append(f"- {reporting.machine_title(machine)}; torch {machine['torch']}, Python {machine['python']}; "
                     f"{machine['date']}")
    if command:
        lines.append(f"- Command: `{command}`")
    lines += [f"- Load average (1/5/15 min) at start {report['loadavg_start']}, at end {report['loadavg_end']} "
              f"(other jobs share the cores; each row below gives the load when it finished)",
              f"- Step = forward + fused/plain loss + backward + clip_grad_norm_(1.0) + AdamW(foreach) + zero_grad "
              f"on random tokens; {report['warmup']} warm-up rounds, then {report['steps']} interleaved rounds "
              f"(order rotating); tokens/s = tokens per step / median step time",
              f"- Variants: `{KERNELS}` = use_kernels=True on the cpp backend; `{OPS_TORCH}` = the same model "
              f"under fastllm.use_backend(\"torch\") (each fastllm.ops call runs its PyTorch reference); "
              f"`{PLAIN}` = use_kernels=False (F.layer_norm, SDPA, F.cross_entropy)", ""]
    header = ["model", "threads", "variant", "median ms", "min ms", "tokens/s", f"x {OPS_TORCH}", f"x {PLAIN}",
              "load"]
    rows, verdicts = [], []
    for m in report["models"]:
        for t in m["timings"]:
            v = t["variants"]
            for name in VARIANTS:
                r = v[name]
                rows.append([m["name"], str(t["threads"]), name, _num(r["median_ms"]), _num(r["min_ms"]),
                             f"{r['tokens_per_s']:.0f}",
                             f"{r['tokens_per_s'] / v[OPS_TORCH]['tokens_per_s']:.2f}x",
                             f"{r['tokens_per_s'] / v[PLAIN]['tokens_per_s']:.2f}x", t["loadavg"].split()[0]])
            ratio = v[KERNELS]["tokens_per_s"] / v[OPS_TORCH]["tokens_per_s"]
            plain = v[KERNELS]["tokens_per_s"] / v[PLAIN]["tokens_per_s"]
            verdicts.append(f"{m['name']}, {t['threads']} thread(s): kernels {ratio:.2f}x the torch backend "
                            f"({'meets' if ratio >= TARGET else 'misses'} the {TARGET}x target), "
                            f"{plain:.2f}x plain PyTorch")
    lines += [reporting.markdown_table(header, rows, right_from=3), ""]
    lines += [f"- {v}" for v in verdicts]
    for m in report["models"]:
        lines += ["", f"## {m['name']}: {m['describe']}; {m['params_m']:.2f}M parameters, "
                      f"{m['tokens_per_step']} tokens/step", ""]
        if not m["profiles"]:
            continue
        lines.append(f"torch.profiler, {m['profile_threads']} thread(s), self CPU time per step (ms). "
                     "'python (outside ops)' = self time of the step's "
                     "phase labels (Python, module calls, argument checks); 'not in any op' = profiled wall time minus "
                     "all self time (the loop, the profiler's own cost). 'phase total' rows: inclusive CPU time of "
                     "each phase of the step.")
        lines.append("")
        group_names = []
        for p in m["profiles"].values():
            for g, _ in p["groups"]:
                if g not in group_names:
                    group_names.append(g)
        header = ["group"] + list(m["profiles"])
        grows = []
        for g in group_names:
            grows.append([g] + [_num(dict(p["groups"]).get(g, 0.0)) for p in m["profiles"].values()])
        grows.append(["(sum of self time)"] + [_num(p["op_self_ms"]) for p in m["profiles"].values()])
        grows.append(["not in any op"] + [_num(p["wall_ms"] - p["op_self_ms"]) for p in m["profiles"].values()])
        grows.append(["profiled step wall ms"] + [_num(p["wall_ms"]) for p in m["profiles"].values()])
        grows.append(["op calls per step"] + [f"{p['ops_per_step']:.0f}" for p in m["profiles"].values()])
        for i, phase in enumerate(PHASES):
            grows.append([phase.replace("step: ", "phase total: ")]
                         + [_num(p["phases"][i][1]) for p in m["profiles"].values()])
        lines += [reporting.markdown_table(header, grows), ""]
        for name, p in m["profiles"].items():
            lines.append(f"Top ops by self CPU, {name}:")
            lines.append("")
            top_rows = [[op, _num(ms), f"{100 * ms / p['wall_ms']:.1f}%", f"{calls:.0f}"] for op, ms, calls in p["top"]]
            if name == KERNELS:
                shown = {r[0] for r in p["top"]}
                top_rows += [[op + " (not in top)", _num(ms), f"{100 * ms / p['wall_ms']:.1f}%", f"{calls:.0f}"]
                             for op, ms, calls in p["fastllm_ops"] if op not in shown]
            lines += [reporting.markdown_table(["op", "self ms/step", "% of step", "calls/step"], top_rows), ""]
    if report["overhead"]:
        lines += [f"## Per-call cost: fastllm op vs raw C++ kernel vs plain PyTorch "
                  f"({report['overhead_model']} shapes, {report['overhead_threads']} thread(s), median)", ""]
        lines += [reporting.markdown_table(["case", "call", "us/call"], [[c, v, _num(u)] for c, v, u in report["overhead"]],
                         right_from=2), ""]
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed interleaved rounds per thread count (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    parser.add_argument("--models", default="small,llama", help=f"comma-separated, of {list(MODELS)} (default all)")
    parser.add_argument("--profile-steps", type=int, default=5, help="profiled steps per variant (0: no profile)")
    parser.add_argument("--profile-threads", type=int, help="thread count for the profile (default: the first)")
    parser.add_argument("--top", type=int, default=12, help="ops listed per variant in the profile")
    parser.add_argument("--no-overhead", action="store_true", help="skip the per-call overhead microbenchmark")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"markdown report (default {os.path.relpath(DEFAULT_OUT)}); "
                                                           "a directory gets train_step.md inside")
    args = parser.parse_args(argv)
    args.threads = tuple(int(t) for t in args.threads.split(","))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            parser.error(f"--models: unknown model {m!r}; choose from {list(MODELS)}")
    if args.steps < 1 or any(t < 1 for t in args.threads):
        parser.error("--steps and --threads must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out
    if os.path.isdir(out) or out.endswith(os.sep) or not out.endswith(".md"):
        out = os.path.join(out, "train_step.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if "cpp" not in fastllm.available_backends("cpu"):
        print(f"the cpp backend cannot run here: {fastllm.backend.why_unavailable('cpp', 'cpu')}", file=sys.stderr)
        return 1
    command = "python -m bench.train_step " + shlex.join(sys.argv[1:] if argv is None else argv)
    machine = reporting.describe_machine(harness.Machine.measure(torch.device("cpu"), harness.QUICK_SETTINGS))
    report = run([MODELS[m]() for m in args.models], threads=args.threads, steps=args.steps, warmup=args.warmup,
                 profile_threads=args.profile_threads, profile_step_count=args.profile_steps, top=args.top,
                 overhead=not args.no_overhead, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    machine["torch_threads"] = ",".join(str(t) for t in args.threads)
    text = format_report(report, machine, command.strip())
    with open(out, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
