"""muP on CPU-sized models: the coordinate check and a learning-rate sweep over 3 widths,
standard parametrization (SP) against muP (models/mup.py), with plots.

    OMP_NUM_THREADS=1 python -m scaleforge.bench.mup_transfer --out bench/mup

Data: the bytes of the Python standard library's own sources (vocabulary 256, no tokenizer),
the first 90% to train and the rest held out. Models: llama, 2 layers, 4 heads (the head
widens with the model, so muP's 1/d_head attention is exercised), widths 32, 64, 128; muP's
base width is 32, so both parametrizations are the same model at width 32.
- Coordinate check: mean |x| of each block's output and of the logits on held-out rows after
  20 Adam steps at lr 1e-2, per width (Yang et al. 2022, fig. 5).
- Learning-rate sweep: held-out loss after `--steps` Adam steps (constant lr after a 10%
  warmup, no weight decay) for each learning rate and width; the best learning rate per
  width is printed. Under muP it should stay put as the width grows; under SP it moves down.
Timings are not measured; every number is a loss or an activation size.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from scaleforge.core.optimizer import OptimConfig, build_optimizer  # noqa: E402
from scaleforge.models import build  # noqa: E402
from scaleforge.models.config import TransformerConfig  # noqa: E402
from scaleforge.models.mup import MupConfig  # noqa: E402
from scaleforge.models.transformer import Transformer  # noqa: E402

WIDTHS = (32, 64, 128)
BASE_WIDTH = 32
SEQ = 64
BATCH = 16


def stdlib_bytes(limit: int = 4_000_000) -> torch.Tensor:
    """The first `limit` bytes of the standard library's .py files (sorted), as int64."""
    chunks, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """(count, BATCH, SEQ + 1) random windows of `tokens`."""
    starts = torch.randint(0, len(tokens) - SEQ - 1, (count, BATCH),
                           generator=torch.Generator().manual_seed(seed))
    return torch.stack([torch.stack([tokens[s:s + SEQ + 1] for s in row]) for row in starts])


def model_config(width: int, mup: bool) -> TransformerConfig:
    return TransformerConfig(d_model=width, n_layers=2, n_heads=4, vocab_size=256,
                             max_seq_len=SEQ, ffn_multiple_of=32,
                             mup=MupConfig(base_width=BASE_WIDTH if mup else None))


def train(width: int, mup: bool, lr: float, data: torch.Tensor) -> Transformer:
    """The model after one Adam step per batch of `data` (10% linear warmup, then `lr`)."""
    cfg = model_config(width, mup)
    model = build(cfg, seed=0)
    optimizer = build_optimizer(torch.nn.ModuleList([model]),
                                OptimConfig(lr=lr, weight_decay=0.0), "cpu", cfg)
    warmup = max(1, len(data) // 10)
    for step, batch in enumerate(data):
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] * min(1.0, (step + 1) / warmup)
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def held_out_loss(model: Transformer, held_out: torch.Tensor) -> float:
    return float(np.mean([model.loss(b[:, :-1], b[:, 1:]).item() for b in held_out]))


@torch.no_grad()
def activation_sizes(model: Transformer, batch: torch.Tensor) -> dict[str, float]:
    sizes: dict[str, float] = {}
    hooks = [block.register_forward_hook(
        lambda module, inputs, output, name=name: sizes.__setitem__(
            f"block {name}", output.abs().mean().item()))
        for name, block in model.layers.items()]
    sizes["logits"] = model(batch[:, :-1]).abs().mean().item()
    for hook in hooks:
        hook.remove()
    return sizes


def coordinate_check(train_tokens: torch.Tensor, held_out: torch.Tensor, out: Path) -> None:
    data = batches(train_tokens, 20, seed=1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, mup in zip(axes, (False, True), strict=True):
        rows = [activation_sizes(train(w, mup, 1e-2, data), held_out[0]) for w in WIDTHS]
        name = "muP" if mup else "SP"
        for layer in rows[0]:
            sizes = [row[layer] for row in rows]
            print(f"coordinate check {name} {layer}: " +
                  ", ".join(f"width {w}: {s:.3f}" for w, s in zip(WIDTHS, sizes, strict=True)))
            ax.plot(WIDTHS, sizes, marker="o", label=layer)
        ax.set(xscale="log", yscale="log", xlabel="d_model",
               title=f"{name}: mean |x| after 20 steps")
        ax.set_xticks(WIDTHS, [str(w) for w in WIDTHS])
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "coord_check.png", dpi=120)
    plt.close(fig)


def lr_sweep(train_tokens: torch.Tensor, held_out: torch.Tensor, out: Path,
             lrs: list[float], steps: int) -> None:
    data = batches(train_tokens, steps, seed=2)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, mup in zip(axes, (False, True), strict=True):
        name = "muP" if mup else "SP"
        for width in WIDTHS:
            losses = [held_out_loss(train(width, mup, lr, data), held_out) for lr in lrs]
            best = lrs[int(np.argmin(losses))]
            print(f"lr sweep {name} width {width}: best lr {best:.2g}; " +
                  ", ".join(f"{lr:.2g}: {loss:.3f}" for lr, loss in zip(lrs, losses,
                                                                       strict=True)))
            ax.plot(lrs, losses, marker="o", label=f"width {width} (best {best:.2g})")
        ax.set(xscale="log", xlabel="learning rate", title=f"{name}: held-out loss, {steps} steps")
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], minor=False)
        ax.minorticks_off()
    axes[0].set_ylabel("held-out loss (nats/byte)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lr_sweep.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/mup"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lrs", type=float, nargs="+",
                        default=[2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = stdlib_bytes()
    split = int(0.9 * len(tokens))
    train_tokens, held_out = tokens[:split], batches(tokens[split:], 8, seed=3)
    coordinate_check(train_tokens, held_out, args.out)
    lr_sweep(train_tokens, held_out, args.out, args.lrs, args.steps)
    print(f"plots -> {args.out / 'coord_check.png'}, {args.out / 'lr_sweep.png'}")


if __name__ == "__main__":
    main()
