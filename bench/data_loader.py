"""Loader throughput: training tokens/s served from memory-mapped shards, one process.

    python -m scaleforge.bench.data_loader [--tokens 64000000 --seq-len 2048 --batch 8]
    python -m scaleforge.bench.data_loader --path shards/web --seq-len 1024

Without --path it writes random uint16 shards (4 files) to a temporary directory and
times TrainBatches over them, one source and a 70/30 blend of two; with --path it times
the shards mode of build_loaders on real shards. The target is >= 50M tokens/s, so data
is never what a training step waits for.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from scaleforge.data_pipeline.batch import Batch
from scaleforge.data_pipeline.config import DataConfig
from scaleforge.data_pipeline.loader import TrainBatches, build_loaders
from scaleforge.data_pipeline.samples import BlendedSamples, TokenStream, TokenWindows


def tokens_per_second(batches: Iterator[Batch], num_batches: int) -> float:
    """Training tokens (inputs) per second over `num_batches` micro-batches, after warmup."""
    for _ in range(10):
        next(batches)
    started = time.perf_counter()
    for _ in range(num_batches):
        inputs = next(batches).inputs
    return num_batches * inputs.numel() / (time.perf_counter() - started)


def random_shards(directory: Path, num_tokens: int, num_shards: int = 4) -> TokenStream:
    """`num_shards` files of random uint16 ids, memory-mapped as one stream."""
    rng = np.random.default_rng(0)
    pieces = []
    for shard in range(num_shards):
        path = directory / f"{shard:05d}.bin"
        rng.integers(0, 32000, num_tokens // num_shards, dtype=np.uint16).tofile(path)
        pieces.append(np.memmap(path, dtype=np.uint16, mode="r"))
    return TokenStream(pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", help="a shard directory (default: random shards)")
    parser.add_argument("--tokens", type=int, default=64_000_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3000)
    args = parser.parse_args()
    if args.path:
        cfg = DataConfig(mode="shards", path=args.path, seq_len=args.seq_len, verify_shards=False)
        tokenizer_vocab = build_loaders(cfg, 1).tokenizer.vocab_size
        train = build_loaders(DataConfig(**{**cfg.__dict__, "vocab_size": tokenizer_vocab}),
                              args.batch).train
        print(f"{args.path}: {tokens_per_second(train, args.batches) / 1e6:.1f}M tokens/s")
        return
    with tempfile.TemporaryDirectory() as directory:
        stream = random_shards(Path(directory), args.tokens)
        windows = TokenWindows(stream, args.seq_len)
        single = TrainBatches(windows, args.batch, seed=0)
        half = len(stream) // 2
        blend = BlendedSamples(
            [TokenWindows(TokenStream(stream.pieces[:2]), args.seq_len),
             TokenWindows(TokenStream(stream.pieces[2:]), args.seq_len)], [0.7, 0.3], seed=0)
        blended = TrainBatches(blend, args.batch, seed=0)
        print(f"random shards: {len(stream):,} tokens ({half * 4 / 1e6:.0f} MB), "
              f"micro-batch {args.batch} x {args.seq_len}")
        for name, batches in (("one source", single), ("70/30 blend", blended)):
            rate = tokens_per_second(batches, args.batches)
            print(f"{name}: {rate / 1e6:.1f}M tokens/s")


if __name__ == "__main__":
    main()
