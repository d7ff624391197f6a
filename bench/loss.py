"""Peak memory and time of the chunked cross-entropy (models/loss.py) against the upcast
`F.cross_entropy(logits.float())` it replaced, forward and backward from bf16 logits.

    python -m scaleforge.bench.loss [--tokens 1024 --vocab 128256 --rounds 5]

Both run on the same logits: the LM head's output (hidden states @ head weight, bf16) and
the targets of `tokens` tokens. Memory: one untimed pass of head, loss and backward per
method under torch's MemTracker, which counts the bytes of live tensor storages (exact,
the same on any machine; allocator caching and fragmentation come on top on a GPU).
Time: the loss's forward and backward alone, from a fresh copy of the logits each time,
in alternating rounds so machine noise hits both alike; medians compared. Prints both,
the ratios chunked / upcast, the bytes per logit, and what each would hold at llama_1b's
8 x 4096 tokens over 128,256 words (the upcast loss grows with every logit; the chunked one
holds the logits and a working set of fixed size).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from scaleforge.models.loss import cross_entropy
from scaleforge.torch_compat import mem_tracker

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WIDTH = 64  # the head's input width: small, so the logits dominate memory


def upcast(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss before models/loss.py: cross-entropy on an fp32 copy of all the logits."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def peak_bytes(loss_fn: LossFn, hidden: torch.Tensor, head: torch.Tensor,
               targets: torch.Tensor) -> int:
    """Peak live bytes of the head's forward, `loss_fn` and backward through both, beyond
    the head's inputs."""
    hidden, head = hidden.detach().requires_grad_(), head.detach().requires_grad_()
    tracker = mem_tracker()
    with tracker:
        loss_fn(hidden @ head.T, targets).backward()
    return tracker.get_tracker_snapshot("peak")[hidden.device]["Total"]


def seconds(loss_fn: LossFn, logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Seconds of `loss_fn`'s forward and backward on a fresh copy of `logits`."""
    fresh = logits.clone().requires_grad_()
    if logits.device.type == "cuda":
        torch.cuda.synchronize(logits.device)
    start = time.perf_counter()
    loss_fn(fresh, targets).backward()
    if logits.device.type == "cuda":
        torch.cuda.synchronize(logits.device)
    return time.perf_counter() - start


def run(tokens: int, vocab: int, rounds: int) -> dict[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, WIDTH, generator=generator).to(device, torch.bfloat16)
    head = (torch.randn(vocab, WIDTH, generator=generator) / WIDTH**0.5).to(device,
                                                                            torch.bfloat16)
    targets = torch.randint(vocab, (1, tokens), generator=generator).to(device)
    methods: dict[str, LossFn] = {"upcast": upcast, "chunked": cross_entropy}
    memory = {name: peak_bytes(fn, hidden, head, targets) for name, fn in methods.items()}
    logits = (hidden @ head.T).detach()
    times: dict[str, list[float]] = {name: [] for name in methods}
    seconds(cross_entropy, logits, targets)  # warm-up
    for _ in range(rounds):
        for name, fn in methods.items():
            times[name].append(seconds(fn, logits, targets))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    logits_bytes = logits.numel() * logits.element_size()
    print(f"device: {name} ({torch.get_num_threads()} threads) | torch {torch.__version__}")
    print(f"logits: 1 x {tokens} x {vocab:,} bf16 = {logits_bytes / 2**20:,.0f} MiB | "
          f"median of {rounds} rounds")
    results: dict[str, float] = {}
    for method in methods:
        median = statistics.median(times[method])
        per_logit = memory[method] / logits.numel()
        print(f"{method:>8}: peak {memory[method] / 2**20:8,.0f} MiB ({per_logit:5.2f} bytes "
              f"per logit) | {median * 1e3:8.1f} ms forward + backward")
        results[f"{method}_peak_bytes"] = memory[method]
        results[f"{method}_seconds"] = median
    memory_ratio = memory["chunked"] / memory["upcast"]
    time_ratio = results["chunked_seconds"] / results["upcast_seconds"]
    print(f"ratio chunked / upcast: peak memory {memory_ratio:.3f}, time {time_ratio:.3f}")
    # At llama_1b's 8 x 4096 tokens: the upcast loss grows with every logit; the chunked one
    # holds the bf16 logits and a working set that does not grow with the tokens.
    logits_1b = 8 * 4096 * 128_256
    upcast_1b = memory["upcast"] / logits.numel() * logits_1b
    chunked_1b = 2 * logits_1b + memory["chunked"] - logits_bytes
    print(f"at 8 x 4096 tokens x 128,256 words: upcast {upcast_1b / 1e9:.1f} GB, chunked "
          f"{chunked_1b / 1e9:.1f} GB (bf16 logits alone {2 * logits_1b / 1e9:.1f} GB)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens (B x T)")
    parser.add_argument("--vocab", type=int, default=128_256, help="vocabulary size")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    args = parser.parse_args()
    run(args.tokens, args.vocab, args.rounds)


if __name__ == "__main__":
    main()
