"""Time and peak memory of the scaleforge operators against torch eager and torch.compile.

    python -m scaleforge.bench.kernels [--device cpu|cuda] [--no-compile] [--repeats 5]
    python -m scaleforge.bench.kernels --cuda-check   # the GPU goals of issue 12
    python -m scaleforge.bench.kernels --smoke        # each operator once (gpu_check's CPU twin)

Per operator, forward + backward of the fused operator (csrc/), of the PyTorch code it
replaces (models/, F.cross_entropy on the full logits) in eager mode, and of that code under
torch.compile, on the same inputs in the same process: median time over `--repeats` runs
after one warm-up, and peak memory above the inputs (CUDA: the allocator's peak; CPU: the
process's peak RSS, measured in a fresh subprocess per case so one case's peak does not
hide another's; Linux only). Ratios are fused / baseline. On CUDA it adds the achieved
bandwidth of the forward (bytes read and written once / time) as a fraction of the GPU's
HBM peak.

--cuda-check runs the d_model >= 4096 and V = 128k sizes and exits 1 unless: rms_norm, rope
and swiglu reach 80% of HBM bandwidth and beat torch.compile; the fused loss uses at most a
quarter of the unfused memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaleforge.models.rope import apply_rope, rope_tables

# HBM peak in bytes/s by device-name substring (vendor datasheets, SXM parts).
HBM_PEAK = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
IMPLEMENTATIONS = ("fused", "eager", "compile")


@dataclass
class Case:
    """One operator at one size: `make(device)` -> inputs; `fused` and `reference`(inputs)
    -> outputs to backpropagate; `bytes_moved`: the forward's reads + writes, once each."""

    name: str
    make: Callable[[str], tuple[torch.Tensor, ...]]
    fused: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    bytes_moved: int


def _randn(*shape: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()


def cases(gpu_sizes: bool, tiny: bool = False) -> list[Case]:
    """The four operators, at CPU-friendly sizes or the GPU check's (d_model 4096, V 128k);
    `tiny`: a few hundred rows each (--smoke)."""
    import scaleforge.csrc as kernels

    dtype = torch.bfloat16 if gpu_sizes else torch.float32
    size = 2 if dtype == torch.bfloat16 else 4
    tokens, d = (16384, 4096) if gpu_sizes else (4096, 1024)
    heads, kv_heads, head_dim, seq = (32, 8, 128, 4096) if gpu_sizes else (16, 4, 64, 1024)
    hidden = 14336 if gpu_sizes else 2816
    lce_tokens, lce_d, vocab = (8192, 4096, 131072) if gpu_sizes else (8192, 512, 32768)
    if tiny:
        tokens, d, heads, kv_heads, head_dim, seq = 256, 128, 4, 2, 32, 128
        hidden, lce_tokens, lce_d, vocab = 256, 256, 64, 1024
    cos, sin = rope_tables(head_dim, seq, 10000.0)
    batch = max(1, tokens // seq)

    def rms_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * F.rms_norm(x.float(), (x.size(-1),), eps=1e-5).type_as(x)

    def rope_reference(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = cos.to(q.device), sin.to(q.device)
        return apply_rope(q, c, s), apply_rope(k, c, s)

    def targets(device: str) -> torch.Tensor:
        return torch.randint(0, vocab, (lce_tokens,), device=device)

    rope_elements = batch * (heads + kv_heads) * seq * head_dim
    return [
        Case("rms_norm", lambda dev: (_randn(tokens, d, device=dev, dtype=dtype),
                                      _randn(d, device=dev, dtype=dtype)),
             lambda x, w: kernels.rms_norm(x, w, 1e-5), rms_reference, 2 * tokens * d * size),
        Case("rope", lambda dev: (_randn(batch, heads, seq, head_dim, device=dev, dtype=dtype),
                                  _randn(batch, kv_heads, seq, head_dim, device=dev, dtype=dtype)),
             lambda q, k: kernels.rope(q, k, cos.to(q.device), sin.to(q.device)),
             rope_reference, 2 * rope_elements * size),
        Case("swiglu", lambda dev: (_randn(tokens, hidden, device=dev, dtype=dtype),
                                    _randn(tokens, hidden, device=dev, dtype=dtype)),
             kernels.swiglu, lambda g, u: F.silu(g) * u, 3 * tokens * hidden * size),
        Case("linear_cross_entropy",
             lambda dev: (_randn(lce_tokens, lce_d, device=dev, dtype=dtype),
                          (_randn(vocab, lce_d, device=dev, dtype=dtype) / lce_d**0.5).detach()
                          .requires_grad_(), targets(dev)),
             kernels.linear_cross_entropy,
             lambda h, w, t: F.cross_entropy((h @ w.T).float(), t),
             (lce_tokens + vocab) * lce_d * size),
    ]


def _step(function: Callable[..., object], inputs: tuple[torch.Tensor, ...]) -> None:
    """Forward, then backward of the sum of the outputs."""
    outputs = function(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward([o.float().sum() for o in outputs])
    for tensor in inputs:
        tensor.grad = None


def implementation(case: Case, name: str) -> Callable[..., object]:
    if name == "fused":
        return case.fused
    return case.reference if name == "eager" else torch.compile(case.reference)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(case: Case, name: str, device: str, repeats: int) -> float:
    """Median milliseconds of forward + backward over `repeats` runs after a warm-up."""
    inputs, function = case.make(device), implementation(case, name)
    _step(function, inputs)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        _step(function, inputs)
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def forward_bandwidth(case: Case, name: str, repeats: int) -> float:
    """Bytes/s of the forward alone on CUDA (no autograd), median over `repeats`."""
    inputs, function = case.make("cuda"), implementation(case, name)
    with torch.no_grad():
        function(*inputs)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function(*inputs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return case.bytes_moved / statistics.median(times)


def peak_bytes(case_name: str, name: str, device: str, gpu_sizes: bool) -> int:
    """Peak memory of one forward + backward above its inputs (see the module doc)."""
    if device == "cuda":
        case = next(c for c in cases(gpu_sizes) if c.name == case_name)
        inputs, function = case.make("cuda"), implementation(case, name)
        _step(function, inputs)  # compile and allocate caches first
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(function, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    command = [sys.executable, "-m", "scaleforge.bench.kernels", "--peak-rss", case_name, name]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return int(json.loads(output.strip().splitlines()[-1])["peak_bytes"])


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as stream:
        line = next(line for line in stream if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def report_peak_rss(case_name: str, name: str) -> None:
    """(subprocess) Print the peak RSS above the inputs of one CPU forward + backward.

    A first step on the same inputs loads what any first call loads (thread pools, kernel
    caches, a compiled graph); then the peak-RSS mark is reset (`5` into
    /proc/self/clear_refs: a process starts with its parent's mark) and the second step's
    peak (VmHWM) minus the RSS before it is that step's own."""
    case = next(c for c in cases(False) if c.name == case_name)
    function = implementation(case, name)
    inputs = case.make("cpu")
    _step(function, inputs)
    with open("/proc/self/clear_refs", "w") as stream:
        stream.write("5")
    before = _status_bytes("VmRSS")
    _step(function, inputs)
    print(json.dumps({"peak_bytes": max(0, _status_bytes("VmHWM") - before)}))


def hbm_peak(device_name: str) -> float | None:
    return next((peak for key, peak in HBM_PEAK.items() if key in device_name), None)


def run(device: str, compile_baseline: bool, repeats: int, gpu_sizes: bool) -> bool:
    """Print one table row per operator; True when the --cuda-check goals hold."""
    names = [n for n in IMPLEMENTATIONS if compile_baseline or n != "compile"]
    peak = hbm_peak(torch.cuda.get_device_name()) if device == "cuda" else None
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    goals_met = True
    for case in cases(gpu_sizes):
        repeat = 1 if case.name == "linear_cross_entropy" and device == "cpu" else repeats
        times = {n: time_ms(case, n, device, repeat) for n in names}
        memory = {n: peak_bytes(case.name, n, device, gpu_sizes) / 2**20 for n in names}
        line = [f"{case.name:22s}"]
        line += [f"{n} {times[n]:9.2f} ms {memory[n]:9.1f} MiB" for n in names]
        line += [f"time fused/{n} {times['fused'] / times[n]:.2f}" for n in names[1:]]
        line += [f"memory fused/{n} {memory['fused'] / max(memory[n], 1e-9):.3f}"
                 for n in names[1:]]
        if peak is not None and case.name != "linear_cross_entropy":
            fraction = forward_bandwidth(case, "fused", repeats) / peak
            line.append(f"fused forward {fraction:.0%} of HBM peak")
            goals_met &= fraction >= 0.8 and times["fused"] < times.get("compile", float("inf"))
        if case.name == "linear_cross_entropy":
            goals_met &= memory["fused"] <= 0.25 * memory["eager"]
        print("  ".join(line), flush=True)
    return goals_met


def smoke(device: str) -> None:
    """Each operator once at tiny sizes, forward + backward, its forward against the eager
    code's (loosely: this proves the library loads and runs, test_kernels.py checks the
    numbers); prints one line per operator."""
    for case in cases(gpu_sizes=False, tiny=True):
        inputs = case.make(device)
        start = time.perf_counter()
        fused = case.fused(*inputs)
        _step(case.fused, inputs)
        fused_out = fused if isinstance(fused, tuple) else (fused,)
        with torch.no_grad():
            eager = case.reference(*inputs)
        eager_out = eager if isinstance(eager, tuple) else (eager,)
        for a, b in zip(fused_out, eager_out, strict=True):
            torch.testing.assert_close(a.detach().float(), b.float(), rtol=1e-3, atol=1e-3)
        print(f"{case.name}: ok on {device} ({(time.perf_counter() - start) * 1e3:.0f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile baseline")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cuda-check", action="store_true",
                        help="GPU sizes on cuda; exit 1 unless the issue's goals hold")
    parser.add_argument("--smoke", action="store_true",
                        help="each fused operator once, forward and backward, against eager")
    parser.add_argument("--peak-rss", nargs=2, metavar=("CASE", "IMPLEMENTATION"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss:
        report_peak_rss(*args.peak_rss)
        return
    if args.smoke:
        smoke(args.device)
        return
    device = "cuda" if args.cuda_check else args.device
    met = run(device, not args.no_compile, args.repeats, gpu_sizes=args.cuda_check)
    if args.cuda_check:
        print("cuda-check goals " + ("met" if met else "NOT met"))
        sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
