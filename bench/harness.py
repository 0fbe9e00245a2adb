"""The one benchmark harness: timing, memory and roofline (bench/report.py writes the table, JSON, markdown and chart).

A case file (bench/cases/<family>.py) only describes work: a `Case` per op x shape x dtype with a function
that builds the inputs, the variants to time, and the minimum bytes (or FLOPs) the op must move. Everything
that measures lives here, so every op family is measured the same way.

How each variant is measured
- Warm-up: one forward (its outputs are checked against the eager baseline's) and one forward+backward.
  torch.compile and the C++ extension build happen here, outside the timed runs.
- Forward: the variant's call with autograd recording, as in training (activations are saved).
- Forward+backward: the forward, then torch.autograd.grad of the outputs against a fixed random cotangent
  (so no .grad accumulates between runs; the gradient tensors are produced and freed every run).
- Time: the median of many runs. On CUDA, triton.testing.do_bench (CUDA events, L2 flushed before each run).
  On CPU, time.perf_counter around each run, repeated until both a minimum time and a minimum count.
- Peak extra memory of the forward and of forward+backward: the most allocated above what was live
  before (inputs, cotangents), outputs and saved activations included.
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before, over
  one extra untimed run (do_bench allocates its own L2-flush buffer).
  CPU: writing "5" to /proc/self/clear_refs resets the process's peak RSS (VmHWM) to its current RSS; the
  peak is VmHWM after the timed runs minus VmRSS before them (the max over all runs, at no extra cost).
  glibc serves allocations above 32 MiB with mmap and returns them on free, so for the tensors that matter
  RSS follows live memory (two 785 MiB temporaries read as 1570 MiB, checked on Linux 6.18 / glibc). Small
  tensors come from the heap, which keeps freed pages, so cases of a few MiB read low, often 0.
- Allocator regime (CPU, `bench.run --allocator`): "fresh" (default) makes every allocation >= 1 MiB a new
  mmap (mmap_large_allocations), so every run of every variant pays first-touch page faults on its outputs
  and temporaries, as PyTorch on glibc does for tensors above 32 MiB, and peak RSS follows live tensors.
  "recycled" (recycle_heap_allocations) serves everything from a heap that keeps freed pages: after its
  first run a variant reuses memory it has touched, as a training loop's steady state or CUDA's caching
  allocator does, and the times are the kernels' own; memory is not measured there. For memory-bound ops
  at tens of MiB the two differ by up to 4x (page faults cost more than the kernel), so both are reported.
- Roofline: copy bandwidth is measured once per run as the median time of dst.copy_(src) on 256 MiB,
  counting read + write. GB/s = the case's minimum bytes / time; "% copy" = GB/s over that bandwidth.
  Cases that give FLOPs report TFLOP/s and % of a measured square matmul in their dtype.
"""
import contextlib
import ctypes
import gc
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

import fastllm
import fastllm.backend

MiB = 2**20
BASELINE = "eager"  # every case's first variant; speedups and memory ratios are against it
FASTLLM_PREFIX = "fastllm"  # variants named fastllm[...] are the product; every other variant is a peer


# ---------------------------------------------------------------------------------------------------------
# What a case file describes
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """An amount of work (bytes moved or FLOPs) for the forward pass and for forward+backward together."""
    forward: float
    forward_backward: Optional[float] = None


@dataclass(frozen=True)
class Variant:
    """One implementation to time: fn(*inputs) -> a tensor or a tuple of tensors. A variant whose name does
    not start with FASTLLM_PREFIX is a peer: what a user already has (eager, torch.compile, torch's fused op)."""
    fn: Callable[..., Any]
    backend: Optional[str] = None  # run under fastllm.use_backend(backend), if it runs here
    compile: bool = False  # wrap fn in torch.compile (compiled during warm-up)


@dataclass
class Case:
    """One op at one shape and dtype, and the variants to compare on it."""
    op: str
    shape: str  # a label for the table, e.g. "4096x50257"
    dtype: torch.dtype
    make_inputs: Callable[[torch.device, torch.dtype], tuple]  # tensors; requires_grad where backward flows
    variants: dict[str, Variant]  # name -> variant; BASELINE first
    bytes_moved: Optional[Cost] = None  # the minimum DRAM/HBM traffic, for GB/s
    flops: Optional[Cost] = None  # for TFLOP/s


def standard_variants(eager: Callable, fastllm_op: Callable,
                      native: Optional[dict[str, Callable]] = None) -> dict[str, Variant]:
    """Eager PyTorch, torch's own fused ops for the same thing (`native`: name -> fn, e.g. SDPA), the eager
    code under torch.compile, and the fastllm op on each kernel backend."""
    return {
        BASELINE: Variant(eager),
        **{name: Variant(fn) for name, fn in (native or {}).items()},
        "torch.compile": Variant(eager, compile=True),
        "fastllm[cpp]": Variant(fastllm_op, backend="cpp"),
        "fastllm[triton]": Variant(fastllm_op, backend="triton"),
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_peer(variant_name: str) -> bool:
    return not variant_name.startswith(FASTLLM_PREFIX)


# ---------------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """How long to measure. CPU runs repeat until both minimums are met; CUDA runs use do_bench's budgets."""
    min_time_s: float = 0.5
    min_runs: int = 5
    max_runs: int = 1000
    cuda_warmup_ms: float = 25
    cuda_rep_ms: float = 100
    cpu_memory: bool = True  # False: time only (peak RSS means nothing once the heap keeps freed pages)


QUICK_SETTINGS = Settings(min_time_s=0.05, min_runs=3, cuda_warmup_ms=5, cuda_rep_ms=20)


def median_ms(fn: Callable[[], Any], device: torch.device, settings: Settings) -> float:
    """Median wall time of fn() in milliseconds (fn is assumed warmed up)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=settings.cuda_warmup_ms, rep=settings.cuda_rep_ms, return_mode="median")
    times = []
    while len(times) < settings.max_runs and (len(times) < settings.min_runs or sum(times) < settings.min_time_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(f"{key} not in /proc/self/status")


def mmap_large_allocations(threshold: int = MiB) -> bool:
    """Have glibc serve every allocation of `threshold` bytes or more with mmap, returned to the OS on free.

    By default glibc raises its mmap threshold after the first large free and then recycles heap pages: a
    variant that happens to get recycled pages skips the page faults that another pays in full (LayerNorm at
    8192 x 1024 fp32 measured 3.1 ms eager vs 15.8 ms fastllm that way, with the same kernel speed), and
    RSS stops following live tensors. With a fixed threshold every variant pays for fresh pages alike and
    peak RSS measures what each one allocates. False where glibc is not available (the numbers say so)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_MMAP_THRESHOLD = -3  # from malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def recycle_heap_allocations() -> bool:
    """Have glibc serve every allocation from its heap and keep freed pages: after its first run, a variant
    reuses memory it has already touched, as in a training loop's steady state (or under CUDA's caching
    allocator), so the times are the kernels' own, without first-touch page faults. Every variant gets the
    same treatment. Peak RSS then no longer follows live tensors: measure memory in the default regime.
    False where glibc is not available."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


ALLOCATOR_REGIMES = ("fresh", "recycled")


def use_allocator(regime: str) -> str:
    """Put glibc in one of ALLOCATOR_REGIMES for the rest of the process; returns the line the report prints."""
    if regime == "recycled":
        if recycle_heap_allocations():
            return ("glibc: every allocation from the heap, freed pages kept and reused (no first-touch page "
                    "faults after a variant's first run; memory: see the fresh-pages section)")
        return "mallopt unavailable: the default glibc policy"
    if mmap_large_allocations():  # every variant pays for fresh pages alike (see there)
        return "glibc: allocations >= 1 MiB mmapped, returned on free (every run pays for fresh pages)"
    return "mallopt unavailable: heap reuse may favour one variant"


class PeakMemory:
    """`with PeakMemory(device) as peak:` ... then peak.extra_bytes: the most allocated in the block above
    what was live when it began; None where this cannot be measured (CPU without /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra_bytes: Optional[int] = None

    def __enter__(self):
        gc.collect()
        self._before = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current RSS
            self._before = _proc_status_bytes("VmRSS")
        except OSError:  # not Linux, or not allowed: there is no resettable peak RSS
            pass
        return self

    def __exit__(self, *exc_info):
        if self._before is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        else:
            self.extra_bytes = _proc_status_bytes("VmHWM") - self._before


def time_rotating(calls: dict[str, Callable[[], Any]], rounds: int, *, warmup: int = 0,
                  peaks: Optional[dict[str, list]] = None) -> dict[str, list[float]]:
    """Per name, the seconds of each timed call. The calls run in rounds whose order rotates (A B C, B C A,
    ...), so drift in the machine's speed lands on every variant alike; the first `warmup` rounds are not
    timed. With `peaks` (CPU), each timed call also appends its peak extra bytes (PeakMemory, entered outside
    the timing) to peaks[name] where the peak can be measured."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu = torch.device("cpu")
    for i in range(warmup + rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            timed = i >= warmup
            probe = PeakMemory(cpu) if timed and peaks is not None else contextlib.nullcontext()
            with probe:
                start = time.perf_counter()
                calls[name]()
                elapsed = time.perf_counter() - start
            if timed:
                times[name].append(elapsed)
                if peaks is not None and probe.extra_bytes is not None:
                    peaks.setdefault(name, []).append(probe.extra_bytes)
    return times


def median_ms_and_peak_mib(fn: Callable[[], Any], device: torch.device, settings: Settings
                           ) -> tuple[float, Optional[float]]:
    """Median time of fn() in ms and its peak extra memory in MiB (see the module docstring)."""
    if device.type == "cuda":
        ms = median_ms(fn, device, settings)
        with PeakMemory(device) as peak:
            fn()
    elif not settings.cpu_memory:
        return median_ms(fn, device, settings), None
    else:
        with PeakMemory(device) as peak:
            ms = median_ms(fn, device, settings)
    return ms, None if peak.extra_bytes is None else peak.extra_bytes / MiB


def interleaved_ms_and_peak_mib(calls: dict[str, Callable[[], Any]], device: torch.device, settings: Settings
                                ) -> dict[str, tuple[float, Optional[float]]]:
    """Per name, the median time of its call in ms and its peak extra memory in MiB, the calls measured
    together. CPU: in rotating rounds (time_rotating), so drift in a shared machine's speed lands on every
    variant alike; as many rounds as give the variants min_time_s each on average (at least min_runs, at most
    max_runs), sized by one untimed round. CUDA: one after the other with do_bench (its events time the
    kernels alone, so drift on the host does not reach them). Peak memory: one more round, each call inside
    its own PeakMemory (whose gc.collect takes ~0.1 s in a process that has run torch.compile: outside the
    timed rounds)."""
    if device.type == "cuda":
        return {name: median_ms_and_peak_mib(fn, device, settings) for name, fn in calls.items()}
    probe = time_rotating(calls, 1)
    one_round_s = sum(t[0] for t in probe.values())
    rounds = math.ceil(settings.min_time_s * len(calls) / max(one_round_s, 1e-9))
    rounds = min(max(rounds, settings.min_runs), settings.max_runs)
    times = time_rotating(calls, rounds)
    peaks: dict[str, list] = {}
    if settings.cpu_memory:
        time_rotating(calls, 1, peaks=peaks)
    return {name: (statistics.median(times[name]) * 1e3, max(peaks[name]) / MiB if name in peaks else None)
            for name in calls}


@dataclass
class Machine:
    """The device and its measured ceilings, shared by every case of one run."""
    device: torch.device
    settings: Settings
    copy_bytes_per_s: float = 0.0
    _matmul_flops_per_s: dict = field(default_factory=dict)

    @classmethod
    def measure(cls, device: torch.device, settings: Settings) -> "Machine":
        machine = cls(device, settings)
        src = torch.ones(256 * MiB // 4, device=device)
        dst = torch.zeros_like(src)  # written once so no page faults land in the timed copies
        dst.copy_(src)
        ms = median_ms(lambda: dst.copy_(src), device, settings)
        machine.copy_bytes_per_s = 2 * src.numel() * src.element_size() / (ms / 1e3)
        return machine

    def matmul_flops_per_s(self, dtype: torch.dtype) -> float:
        """Measured FLOP/s of a square matmul in `dtype` (measured on first use: only FLOP cases need it)."""
        if dtype not in self._matmul_flops_per_s:
            n = 8192 if self.device.type == "cuda" else 1024
            a = torch.randn(n, n, device=self.device, dtype=dtype)
            b = torch.randn(n, n, device=self.device, dtype=dtype)
            torch.mm(a, b)
            ms = median_ms(lambda: torch.mm(a, b), self.device, self.settings)
            self._matmul_flops_per_s[dtype] = 2 * n**3 / (ms / 1e3)
        return self._matmul_flops_per_s[dtype]


# ---------------------------------------------------------------------------------------------------------
# Running one variant
# ---------------------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """The variant cannot run here (its backend is missing, or fastllm would fall back to torch)."""


@dataclass
class Prepared:
    """A warmed-up variant, ready to time."""
    forward: Callable[[], Any]
    forward_backward: Optional[Callable[[], Any]]  # None when nothing in the case is differentiable
    outputs: tuple  # detached outputs of the first forward, to check against the baseline
    warmup_s: float = 0.0  # the first forward and forward+backward: torch.compile's compile time, mostly


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def why_skipped(variant: Variant, device: torch.device) -> Optional[str]:
    """None if the variant's backend runs on `device`, else why not."""
    if variant.backend is None:
        return None
    if variant.backend == "triton" and device.type == "cpu":
        return "triton runs on CUDA; on CPU only its interpreter (TRITON_INTERPRET=1) runs, which is not timed"
    return fastllm.backend.why_unavailable(variant.backend, device)


def prepare(case: Case, name: str, inputs: tuple, device: torch.device) -> Prepared:
    """Warm up variant `name` on `inputs`: compile it, build its cotangents, run forward+backward once.

    Raises Unavailable if it cannot run here; any other exception is the variant failing.
    """
    variant = case.variants[name]
    reason = why_skipped(variant, device)
    if reason:
        raise Unavailable(reason)
    fn = torch.compile(variant.fn, dynamic=False) if variant.compile else variant.fn
    backend = (lambda: fastllm.use_backend(variant.backend)) if variant.backend else contextlib.nullcontext

    def forward():
        with backend():
            return _as_tuple(fn(*inputs))

    # fastllm warns once per process per reason when it falls back to torch; forget earlier warnings so
    # every fastllm variant's first call says whether it really ran on its backend.
    fastllm.backend.warn_fallback.cache_clear()
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = forward()
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith("fastllm: backend")]
    if variant.backend and fallbacks:
        raise Unavailable(fallbacks[0])

    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not wrt or not any(out.requires_grad for out in outputs):
        return Prepared(forward, None, tuple(out.detach() for out in outputs), time.perf_counter() - started)

    generator = torch.Generator(device).manual_seed(1)
    cotangents = [torch.randn(out.shape, generator=generator, device=device, dtype=out.dtype)
                  for out in outputs if out.requires_grad]

    def forward_backward():
        with backend():
            differentiable = [out for out in forward() if out.requires_grad]
            return torch.autograd.grad(differentiable, wrt, cotangents)

    forward_backward()  # compiles the backward too
    return Prepared(forward, forward_backward, tuple(out.detach() for out in outputs), time.perf_counter() - started)


def _check_tolerance(*dtypes):
    """(rtol, atol) for the sanity check against eager; the precise numerics are tested in tests/ops."""
    if any(dtype in (torch.float16, torch.bfloat16) for dtype in dtypes):
        return 1.6e-2, 1e-3  # 2-4 bf16 ulps: rounding the same fp32 value differently is fine
    return 1e-4, 1e-5


def compare_outputs(actual: tuple, expected: tuple, compute_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if a variant's forward outputs match the baseline's, else where and by how much they differ.
    compute_dtype: the case's dtype, which sets the tolerance also for fp32 outputs of 16-bit maths (autocast)."""
    if len(actual) != len(expected):
        return f"returns {len(actual)} outputs, {BASELINE} returns {len(expected)}"
    for index, (got, want) in enumerate(zip(actual, expected)):
        rtol, atol = _check_tolerance(got.dtype, want.dtype, compute_dtype)
        try:
            torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
        except AssertionError as mismatch:
            details = "; ".join(line.strip() for line in str(mismatch).splitlines()[1:] if line.strip())
            return f"output {index} differs from {BASELINE}: {details}"
    return None


@dataclass
class Result:
    """One table row: a variant of a case, as measured (None where not applicable)."""
    family: str
    op: str
    shape: str
    dtype: str
    variant: str
    forward_ms: Optional[float] = None
    forward_backward_ms: Optional[float] = None
    forward_peak_mib: Optional[float] = None  # peak extra memory (outputs and saved activations included)
    forward_backward_peak_mib: Optional[float] = None
    forward_gbps: Optional[float] = None
    forward_backward_gbps: Optional[float] = None
    forward_pct_copy: Optional[float] = None
    forward_backward_pct_copy: Optional[float] = None
    forward_tflops: Optional[float] = None
    forward_backward_tflops: Optional[float] = None
    forward_pct_matmul: Optional[float] = None
    forward_backward_pct_matmul: Optional[float] = None
    speedup_forward: Optional[float] = None  # eager time / this time
    speedup_forward_backward: Optional[float] = None
    memory_vs_eager_forward: Optional[float] = None  # this peak / eager's peak
    memory_vs_eager_forward_backward: Optional[float] = None
    best_peer_forward: Optional[str] = None  # the fastest peer variant of the case (is_peer), and its time
    best_peer_forward_backward: Optional[str] = None  # over this one's
    x_best_peer_forward: Optional[float] = None
    x_best_peer_forward_backward: Optional[float] = None
    compile_s: Optional[float] = None  # torch.compile variants: the warm-up (compile) time, not in the timings
    mismatch: Optional[str] = None  # set when the forward disagrees with eager
    error: Optional[str] = None  # set when the variant failed: "n/a (reason)"

    @property
    def case_label(self) -> str:
        return f"{self.op} {self.shape} {self.dtype}"


@dataclass
class Skipped:
    """A variant that cannot run on this machine, and why."""
    family: str
    op: str
    shape: str
    dtype: str
    variant: str
    reason: str


def _rate(amount, ms):
    return None if amount is None or ms is None else amount / (ms / 1e3)


def _ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


def _fill_rates(result: Result, case: Case, machine: Machine) -> None:
    if case.bytes_moved:
        fwd = _rate(case.bytes_moved.forward, result.forward_ms)
        fwd_bwd = _rate(case.bytes_moved.forward_backward, result.forward_backward_ms)
        result.forward_gbps = _ratio(fwd, 1e9)
        result.forward_backward_gbps = _ratio(fwd_bwd, 1e9)
        result.forward_pct_copy = _ratio(fwd and 100 * fwd, machine.copy_bytes_per_s)
        result.forward_backward_pct_copy = _ratio(fwd_bwd and 100 * fwd_bwd, machine.copy_bytes_per_s)
    if case.flops:
        fwd = _rate(case.flops.forward, result.forward_ms)
        fwd_bwd = _rate(case.flops.forward_backward, result.forward_backward_ms)
        peak = machine.matmul_flops_per_s(case.dtype)
        result.forward_tflops = _ratio(fwd, 1e12)
        result.forward_backward_tflops = _ratio(fwd_bwd, 1e12)
        result.forward_pct_matmul = _ratio(fwd and 100 * fwd, peak)
        result.forward_backward_pct_matmul = _ratio(fwd_bwd and 100 * fwd_bwd, peak)


def _short_error(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"n/a ({type(exc).__name__}: {first_line[:160]})"


def _fill_peer_ratios(results: list[Result]) -> None:
    """Each row's time against the fastest peer of its case, per pass (peers that failed or disagree with
    eager do not count)."""
    for pass_name in ("forward", "forward_backward"):
        peers = [r for r in results if is_peer(r.variant) and not r.error and not r.mismatch
                 and getattr(r, f"{pass_name}_ms") is not None]
        if not peers:
            continue
        best = min(peers, key=lambda r: getattr(r, f"{pass_name}_ms"))
        for r in results:
            setattr(r, f"best_peer_{pass_name}", best.variant)
            setattr(r, f"x_best_peer_{pass_name}", _ratio(getattr(best, f"{pass_name}_ms"),
                                                          getattr(r, f"{pass_name}_ms")))


def run_case(case: Case, family: str, machine: Machine, variants: Optional[set] = None
             ) -> Iterator[Result | Skipped]:
    """Measure the variants of `case` (all, or those named in `variants`); yield one outcome each, eager first.

    Every variant is warmed up first (compiled, built), then the forwards of all are timed together in
    rotating rounds, then their forward+backwards (interleaved_ms_and_peak_mib): a ratio between two variants
    of one case is measured in the same stretch of time. A variant that fails becomes a row with its error;
    one that cannot run here is Skipped.
    """
    device = machine.device
    inputs = case.make_inputs(device, case.dtype)
    names = [name for name in case.variants if variants is None or name in variants]
    results: dict[str, Result] = {}
    prepared: dict[str, Prepared] = {}
    try:
        for name in names:
            result = Result(family, case.op, case.shape, dtype_name(case.dtype), name)
            try:
                prepared[name] = prepare(case, name, inputs, device)
            except Unavailable as reason:
                yield Skipped(family, case.op, case.shape, dtype_name(case.dtype), name, str(reason))
                continue
            except Exception as exc:  # a compile error, a missing kernel, out of memory: report, keep going
                result.error = _short_error(exc)
            if name in prepared and case.variants[name].compile:
                result.compile_s = prepared[name].warmup_s
            results[name] = result
        for pass_name in ("forward", "forward_backward"):
            calls = {name: getattr(p, pass_name) for name, p in prepared.items() if getattr(p, pass_name)}
            try:
                measured = interleaved_ms_and_peak_mib(calls, device, machine.settings) if calls else {}
            except Exception as exc:  # out of memory mid-run: every variant of this pass reports it
                for name in calls:
                    results[name].error = _short_error(exc)
                    prepared.pop(name)
                continue
            for name, (ms, peak_mib) in measured.items():
                setattr(results[name], f"{pass_name}_ms", ms)
                setattr(results[name], f"{pass_name}_peak_mib", peak_mib)
    finally:
        if any(case.variants[name].compile for name in names):
            torch.compiler.reset()  # drop this shape's compiled graphs; the next case compiles its own
    baseline = results.get(BASELINE)
    baseline_outputs = prepared[BASELINE].outputs if BASELINE in prepared else None
    for name, result in results.items():
        if result.error:
            continue
        _fill_rates(result, case, machine)
        if name != BASELINE and baseline_outputs is not None:
            result.mismatch = compare_outputs(prepared[name].outputs, baseline_outputs, case.dtype)
            result.speedup_forward = _ratio(baseline.forward_ms, result.forward_ms)
            result.speedup_forward_backward = _ratio(baseline.forward_backward_ms, result.forward_backward_ms)
            result.memory_vs_eager_forward = _ratio(result.forward_peak_mib, baseline.forward_peak_mib)
            result.memory_vs_eager_forward_backward = _ratio(result.forward_backward_peak_mib,
                                                             baseline.forward_backward_peak_mib)
    _fill_peer_ratios(list(results.values()))
    yield from results.values()
