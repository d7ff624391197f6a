"""Micro-batches of fixed-length windows over a token file, for training and evaluation.

The token stream is cut into windows of seq_len + 1 tokens with stride seq_len (window k
starts at token k * seq_len), packed across document boundaries (EOS marks them). Inputs
are a window's first seq_len tokens, targets its last seq_len.

Training reads one endless sample stream: epoch after epoch, each a permutation of all
windows drawn from (seed, epoch). Every micro-step the data-parallel group takes the next
dp_size x micro_batch_size samples of the stream and rank r takes the r-th contiguous slice,
so rank r's i-th micro-batch is the single-process micro-batch i * dp_size + r.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from scaleforge.core.config import DataConfig
from scaleforge.core.errors import ConfigError
from scaleforge.data_pipeline.prepare import PreparedData, prepare
from scaleforge.data_pipeline.token_file import read_token_file
from scaleforge.data_pipeline.tokenizer import Tokenizer


class TokenWindows:
    """The windows of a token stream: window k is tokens[k * seq_len : (k + 1) * seq_len + 1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given windows: int64, each (len(window_ids), seq_len)."""
        windows = np.stack(
            [self.tokens[k * self.seq_len : (k + 1) * self.seq_len + 1] for k in window_ids]
        ).astype(np.int64)
        windows = torch.from_numpy(windows)  # (B, seq_len + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class TrainBatches:
    """Endless, shuffled training micro-batches for one data-parallel rank.

    Yields (inputs, targets), int64 tensors of shape (micro_batch_size, seq_len). The
    position is kept for the whole group, so state_dict() is the same on every rank and a
    run may resume with another dp_size and continue the same sample stream.
    """

    def __init__(
        self,
        windows: TokenWindows,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if len(windows) < micro_batch_size * dp_size:
            raise ValueError(
                f"{len(windows)} windows cannot fill one micro-step of "
                f"{micro_batch_size} x {dp_size} samples"
            )
        self.windows = windows
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.epoch = 0
        self.position = 0  # index within the epoch of the group's next sample
        self._orders: dict[int, np.ndarray] = {}

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows.batch(self.next_window_ids())

    def next_window_ids(self) -> np.ndarray:
        """Advance one micro-step; the window ids of this rank's micro-batch, shape (B,)."""
        num_windows = len(self.windows)
        group_start = self.epoch * num_windows + self.position
        start = group_start + self.dp_rank * self.micro_batch_size
        samples = np.arange(start, start + self.micro_batch_size)
        ids = np.array([self._order(s // num_windows)[s % num_windows] for s in samples])
        self.epoch, self.position = divmod(
            group_start + self.micro_batch_size * self.dp_size, num_windows
        )
        return ids

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: the epoch and the group's position within it."""
        return {"epoch": self.epoch, "position": self.position, "num_windows": len(self.windows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a state_dict(); the next batch is the one that followed it."""
        if state["num_windows"] != len(self.windows):
            raise ValueError(
                f"the loader state was saved over {state['num_windows']} windows but this data "
                f"has {len(self.windows)}; resume with the same data settings"
            )
        self.epoch, self.position = state["epoch"], state["position"]

    def _order(self, epoch: int) -> np.ndarray:
        """The permutation of window ids for `epoch`; the last two are kept, since a
        micro-step can straddle an epoch boundary."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = rng.permutation(len(self.windows))
        return self._orders[epoch]


class ValBatches:
    """Validation micro-batches in a fixed order, shared out over data-parallel ranks the
    same way as training: rank r's i-th micro-batch is the single-process one i * dp_size + r."""

    def __init__(
        self, windows: TokenWindows, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ):
        self.windows = windows
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def batches(self, num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's first `num_batches` micro-batches: (inputs, targets), int64, each
        (micro_batch_size, seq_len). The same every call; when the split holds fewer windows
        than asked for, they repeat from the start."""
        for step in range(num_batches):
            start = (step * self.dp_size + self.dp_rank) * self.micro_batch_size
            window_ids = np.arange(start, start + self.micro_batch_size) % len(self.windows)
            yield self.windows.batch(window_ids)


class Loaders(NamedTuple):
    """What build_loaders returns; unpacks as (train, val, tokenizer, prepared)."""

    train: TrainBatches
    val: ValBatches
    tokenizer: Tokenizer
    prepared: PreparedData


def build_loaders(
    data_cfg: DataConfig, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1
) -> Loaders:
    """The trainer's entry point: prepare (or reuse) the data of `data_cfg` and return the
    training and validation micro-batch sources of data-parallel rank `dp_rank` of `dp_size`,
    the tokenizer and the prepared files. Shuffling is seeded by data_cfg.seed.
    """
    prepared = prepare(data_cfg)
    seq_len = data_cfg.seq_len
    train = TokenWindows(read_token_file(prepared.train_tokens_path, prepared.vocab_size), seq_len)
    val = TokenWindows(read_token_file(prepared.val_tokens_path, prepared.vocab_size), seq_len)
    _check_sizes(data_cfg, prepared, len(train), len(val), micro_batch_size * dp_size)
    return Loaders(
        train=TrainBatches(train, micro_batch_size, data_cfg.seed, dp_rank, dp_size),
        val=ValBatches(val, micro_batch_size, dp_rank, dp_size),
        tokenizer=Tokenizer(prepared.tokenizer_path),
        prepared=prepared,
    )


def _check_sizes(
    data_cfg: DataConfig,
    prepared: PreparedData,
    train_windows: int,
    val_windows: int,
    samples_per_micro_step: int,
) -> None:
    if val_windows == 0:
        raise ConfigError(
            f"data.val_fraction={data_cfg.val_fraction}: the validation split holds "
            f"{prepared.val_tokens} tokens, fewer than data.seq_len + 1 = {data_cfg.seq_len + 1}; "
            "raise data.val_fraction or data.max_corpus_bytes, or lower data.seq_len"
        )
    if train_windows < samples_per_micro_step:
        raise ConfigError(
            f"data.max_corpus_bytes={data_cfg.max_corpus_bytes}: the training split holds "
            f"{train_windows} sequences of data.seq_len={data_cfg.seq_len}, fewer than one "
            f"micro-batch across data-parallel ranks ({samples_per_micro_step}); raise "
            "data.max_corpus_bytes or lower data.seq_len or trainer.micro_batch_size"
        )
