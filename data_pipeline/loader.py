"""Training and validation micro-batches: packed windows over memory-mapped token shards.

A source's shards read back to back form one token stream (EOS between documents), cut
into windows of seq_len + 1 tokens with stride seq_len: window k starts at token
k * seq_len, so sequences are packed across document boundaries. Inputs are a window's
first seq_len tokens, targets its last seq_len.

Training reads one endless sample stream. With one source, sample s is window
order(seed, epoch)[s mod n] of that epoch's permutation. With several, a fixed schedule of
BLEND_PERIOD samples gives each source its share of the weights (to within one sample per
period), and each source walks its own epochs. Every sample is found from its index alone,
so work splits without coordination: micro-batch m holds samples m*B ... m*B + B - 1; data-
parallel rank r takes micro-batches i * dp_size + r, and its DataLoader worker w of W the
rank's micro-batches i with i mod W == w, which the DataLoader hands out in order. The
position is a single count, so state_dict() resumes exactly, with any number of workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scaleforge.data_pipeline.config import DataConfig
from scaleforge.data_pipeline.manifest import load_manifest, load_shard_tokenizer, open_split
from scaleforge.data_pipeline.pack import pack_windows
from scaleforge.data_pipeline.prepare import prepare
from scaleforge.data_pipeline.sources import open_streaming_dataset
from scaleforge.data_pipeline.streaming import StreamingBatches
from scaleforge.data_pipeline.tokenizer import Tokenizer
from scaleforge.errors import ConfigError

BLEND_PERIOD = 1000


class TokenStream:
    """Several token arrays (shards) read as one stream, back to back: shape (len(self),)."""

    def __init__(self, pieces: Sequence[np.ndarray]):
        # Plain ndarray views of the memory maps: slicing an np.memmap costs several times
        # more Python overhead than the copy of a window itself.
        self.pieces = [np.asarray(piece).view(np.ndarray) for piece in pieces if len(piece)]
        self.starts = np.cumsum([0, *(len(piece) for piece in self.pieces)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream; a view when they lie in one piece."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[first])
        if stop <= self.starts[first + 1]:
            return self.pieces[first][offset : offset + stop - start]
        parts, position = [], start
        for index in range(first, len(self.pieces)):
            piece_start = int(self.starts[index])
            parts.append(self.pieces[index][position - piece_start : stop - piece_start])
            position = min(stop, int(self.starts[index + 1]))
            if position == stop:
                break
        return np.concatenate(parts)


class TokenWindows:
    """The windows of a token stream: window k is tokens[k * seq_len : (k + 1) * seq_len + 1].

    `tokens` is an array (one shard, or a test's synthetic stream) or a TokenStream.
    """

    def __init__(self, tokens: np.ndarray | TokenStream, seq_len: int):
        self.tokens = tokens if isinstance(tokens, TokenStream) else TokenStream([tokens])
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def window(self, k: int) -> np.ndarray:
        """Window k: seq_len + 1 token ids in the stream's dtype."""
        return self.tokens.read(k * self.seq_len, (k + 1) * self.seq_len + 1)

    def batch(self, window_ids: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given windows: int64, each (len(window_ids), seq_len)."""
        return pack_windows([self.window(int(k)) for k in window_ids])


class BlendedSamples:
    """The endless training sample stream over one or more sources mixed by weight.

    locate(samples) says which source and which window each sample index is; see the
    module docstring for the schedule.
    """

    def __init__(self, sources: Sequence[TokenWindows], weights: Sequence[float], seed: int):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        for index, (source, weight) in enumerate(zip(sources, weights, strict=True)):
            if weight <= 0:
                raise ConfigError(f"data.blend[{index}].weight={weight} must be positive")
            if len(source) == 0:
                raise ConfigError(
                    f"data source {index} holds fewer than data.seq_len + 1 = "
                    f"{source.seq_len + 1} training tokens; lower data.seq_len or add text"
                )
        self.sources = list(sources)
        self.seed = seed
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self._schedule_sources, self._schedule_ranks, self._per_period = self._schedule()
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        """Samples in one epoch: every window of every source once, for one source; the
        windows of the sources together, for a blend (sources repeat at their own pace)."""
        return sum(len(source) for source in self.sources)

    def realised_mix(self, num_samples: int) -> list[float]:
        """The fraction of the first `num_samples` samples that each source supplies."""
        counts = np.bincount(self.locate(np.arange(num_samples))[0], minlength=len(self.sources))
        return (counts / num_samples).tolist()

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window id) of each sample index; int64 arrays shaped like samples."""
        if len(self.sources) == 1:
            source = np.zeros_like(samples)
            within = samples
        else:
            period, slot = np.divmod(samples, BLEND_PERIOD)
            source = self._schedule_sources[slot]
            within = period * self._per_period[source] + self._schedule_ranks[slot]
        if len(self.sources) == 1:
            order = self._order
            return source, np.array([order(0, e)[p] for e, p in zip(*np.divmod(
                within, len(self.sources[0])), strict=True)], dtype=np.int64)
        windows = np.empty_like(samples)
        for index in np.unique(source):
            mask = source == index
            epoch, position = np.divmod(within[mask], len(self.sources[index]))
            windows[mask] = [self._order(index, e)[p] for e, p in zip(epoch, position, strict=True)]
        return source, windows

    def batch(self, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given sample indices: int64, each (len(samples), seq_len)."""
        source, windows = self.locate(samples)
        if len(self.sources) == 1:
            return self.sources[0].batch(windows)
        return pack_windows([self.sources[s].window(int(w))
                             for s, w in zip(source, windows, strict=True)])

    def _schedule(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which source each slot of a period draws from (always the one furthest behind
        its share), the slot's rank among its source's slots, and each source's slots."""
        sources = np.zeros(BLEND_PERIOD, dtype=np.int64)
        ranks = np.zeros(BLEND_PERIOD, dtype=np.int64)
        counts = np.zeros(len(self.sources), dtype=np.int64)
        weights = np.asarray(self.weights)
        for slot in range(BLEND_PERIOD):
            chosen = int(np.argmax(weights * (slot + 1) - counts))
            sources[slot], ranks[slot] = chosen, counts[chosen]
            counts[chosen] += 1
        return sources, ranks, counts

    def _order(self, source: int, epoch: int) -> np.ndarray:
        """The permutation of a source's windows in `epoch`, seeded by (seed, source, epoch);
        a few recent ones are kept, since a micro-batch can straddle an epoch boundary."""
        key = (source, epoch)
        if key not in self._orders:
            if len(self._orders) >= 4 * len(self.sources):
                self._orders.pop(next(iter(self._orders)))
            rng = np.random.default_rng([self.seed, source, epoch])
            self._orders[key] = rng.permutation(len(self.sources[source]))
        return self._orders[key]


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per position, which document of its row it belongs to (0, 1, ...; an EOS belongs to
    the document it ends): int64, shaped like inputs (B, seq_len). Positions with equal ids
    may attend to each other under per-document masking."""
    ends = (inputs == eos_id).long()
    return ends.cumsum(dim=1) - ends


class _RankStream(IterableDataset):
    """One rank's micro-batches from `first_step` on, endless; under a DataLoader, worker w
    of W yields the steps first_step + w, first_step + w + W, ..."""

    def __init__(self, samples: BlendedSamples, micro_batch_size: int, dp_rank: int,
                 dp_size: int, first_step: int, eos_id: int | None):
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.first_step = first_step
        self.eos_id = eos_id

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for step in itertools.count(self.first_step + worker_id, num_workers):
            yield self.micro_batch(step)

    def micro_batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """This rank's micro-batch `step`: the group's micro-batch step * dp_size + rank."""
        start = (step * self.dp_size + self.dp_rank) * self.micro_batch_size
        inputs, targets = self.samples.batch(np.arange(start, start + self.micro_batch_size))
        if self.eos_id is None:
            return inputs, targets
        return inputs, targets, document_ids(inputs, self.eos_id)


class TrainBatches:
    """Endless, shuffled training micro-batches for one data-parallel rank.

    Yields (inputs, targets), int64 tensors of shape (micro_batch_size, seq_len), plus
    document ids of the same shape (see document_ids) when `eos_id` is given. `num_workers`
    DataLoader processes prepare batches ahead; the batches are the same for any number.
    state_dict() is the same on every rank and counts the group's samples, so a run may
    resume with another number of workers or another dp_size.
    """

    # state_dict() is the data-parallel group's position, so any rank's resumes every rank.
    STATE_IS_GLOBAL = True

    def __init__(
        self,
        samples: TokenWindows | BlendedSamples,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        eos_id: int | None = None,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if isinstance(samples, TokenWindows):
            samples = BlendedSamples([samples], [1.0], seed)
        if len(samples) < micro_batch_size * dp_size:
            raise ValueError(
                f"{len(samples)} windows cannot fill one micro-step of "
                f"{micro_batch_size} x {dp_size} samples"
            )
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_workers = num_workers
        self.eos_id = eos_id
        self.step = 0  # this rank's micro-batches consumed so far
        self._batches: Iterator | None = None

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self._batches is None:
            self._batches = self._start()
        self.step += 1
        return next(self._batches)

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: samples the data-parallel group has consumed."""
        return {
            "samples": self.step * self.dp_size * self.micro_batch_size,
            "epoch_samples": len(self.samples),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a state_dict(); the next batch is the one that followed it."""
        if state["epoch_samples"] != len(self.samples):
            raise ConfigError(
                f"the loader state was saved over {state['epoch_samples']} samples per epoch but "
                f"this data has {len(self.samples)}; resume with the same data settings"
            )
        group_batch = self.dp_size * self.micro_batch_size
        if state["samples"] % group_batch:
            raise ConfigError(
                f"the loader state stopped after {state['samples']} samples, not a multiple of "
                f"dp_size x micro_batch_size = {group_batch}; resume with a layout that divides it"
            )
        self.step = state["samples"] // group_batch
        self._batches = None

    def _start(self) -> Iterator:
        stream = _RankStream(self.samples, self.micro_batch_size, self.dp_rank, self.dp_size,
                             self.step, self.eos_id)
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=False))


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


class PreparedData(NamedTuple):
    """What the loaders read: the shard directories (none when streaming) and the
    tokenizer's vocabulary size."""

    directories: tuple[Path, ...]
    vocab_size: int


class Loaders(NamedTuple):
    """What build_loaders returns; unpacks as (train, val, tokenizer, prepared)."""

    train: TrainBatches | StreamingBatches
    val: ValBatches | StreamingBatches
    tokenizer: Tokenizer
    prepared: PreparedData


def build_loaders(
    data_cfg: DataConfig, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1
) -> Loaders:
    """The trainer's entry point: the training and validation micro-batch sources of data-
    parallel rank `dp_rank` of `dp_size` for `data_cfg` (any mode), the tokenizer and what
    was read. Shuffling is seeded by data_cfg.seed.
    """
    if data_cfg.mode == "streaming":
        return _streaming_loaders(data_cfg, micro_batch_size, dp_rank, dp_size)
    sources = _shard_sources(data_cfg)
    directories = tuple(directory for directory, _ in sources)
    opened = [_open_shards(directory, data_cfg) for directory in directories]
    tokenizer = opened[0][2]
    for directory, (_, _, other) in zip(directories[1:], opened[1:], strict=True):
        if other.hash != tokenizer.hash:
            raise ConfigError(
                f"data.blend: {directory} was tokenized with another tokenizer than "
                f"{directories[0]}; blend shards of one tokenizer"
            )
    _check_vocab(data_cfg, tokenizer, directories[0])
    seq_len = data_cfg.seq_len
    val = TokenWindows(TokenStream([s for _, val_shards, _ in opened for s in val_shards]),
                       seq_len)
    _check_validation_size(data_cfg, len(val))
    train = BlendedSamples(
        [TokenWindows(TokenStream(train_shards), seq_len) for train_shards, _, _ in opened],
        [weight for _, weight in sources],
        data_cfg.seed,
    )
    _check_training_size(data_cfg, len(train), micro_batch_size * dp_size)
    return Loaders(
        train=TrainBatches(train, micro_batch_size, data_cfg.seed, dp_rank, dp_size,
                           num_workers=data_cfg.num_workers),
        val=ValBatches(val, micro_batch_size, dp_rank, dp_size),
        tokenizer=tokenizer,
        prepared=PreparedData(directories, tokenizer.vocab_size),
    )


def _shard_sources(data_cfg: DataConfig) -> list[tuple[Path, float]]:
    """(shard directory, weight) of each source of a corpus or shards config."""
    if data_cfg.mode == "corpus":
        return [(prepare(data_cfg), 1.0)]
    if data_cfg.path and data_cfg.blend:
        raise ConfigError("data.path and data.blend are both set; give one of them")
    if data_cfg.path:
        return [(Path(data_cfg.path), 1.0)]
    if data_cfg.blend:
        return [(Path(source.path), source.weight) for source in data_cfg.blend]
    raise ConfigError(
        "data.mode=shards needs data.path=DIR (a directory written by sf-preprocess shards) "
        "or data.blend (a list of {path, weight}); see configs/data/blend.yaml"
    )


def _open_shards(
    directory: Path, data_cfg: DataConfig
) -> tuple[list[np.ndarray], list[np.ndarray], Tokenizer]:
    """(train shards, validation shards, tokenizer) of a directory written by sf-preprocess."""
    manifest = load_manifest(directory)
    tokenizer = load_shard_tokenizer(directory, manifest)
    train = open_split(directory, manifest, "train", data_cfg.verify_shards)
    val = open_split(directory, manifest, "val", data_cfg.verify_shards)
    return train, val, tokenizer


def _streaming_loaders(data_cfg: DataConfig, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> Loaders:
    if not data_cfg.dataset or not data_cfg.tokenizer:
        raise ConfigError(
            "data.mode=streaming needs data.dataset (hub name, save_to_disk directory or a "
            f"jsonl/parquet glob; got {data_cfg.dataset!r}) and data.tokenizer (got "
            f"{data_cfg.tokenizer!r})"
        )
    tokenizer = Tokenizer.load(data_cfg.tokenizer)
    _check_vocab(data_cfg, tokenizer, Path(data_cfg.tokenizer))
    dataset = data_cfg.dataset

    def batches(split: str) -> StreamingBatches:
        return StreamingBatches(open_streaming_dataset(dataset), tokenizer,
                                data_cfg.text_field, data_cfg.seq_len, micro_batch_size,
                                data_cfg.val_fraction, split, dp_rank, dp_size)

    return Loaders(batches("train"), batches("val"), tokenizer,
                   PreparedData((), tokenizer.vocab_size))


def _check_vocab(data_cfg: DataConfig, tokenizer: Tokenizer, where: Path) -> None:
    if tokenizer.vocab_size != data_cfg.vocab_size:
        raise ConfigError(
            f"data.vocab_size={data_cfg.vocab_size} but the tokenizer of {where} has "
            f"{tokenizer.vocab_size} ids; set data.vocab_size={tokenizer.vocab_size} (and "
            "model.vocab_size at least that)"
        )


def _check_validation_size(data_cfg: DataConfig, val_windows: int) -> None:
    if val_windows == 0:
        raise ConfigError(
            f"data.val_fraction={data_cfg.val_fraction}: the validation split holds fewer tokens "
            f"than data.seq_len + 1 = {data_cfg.seq_len + 1}; raise data.val_fraction (or "
            "val_fraction of sf-preprocess shards) or the corpus size, or lower data.seq_len"
        )


def _check_training_size(data_cfg: DataConfig, train_samples: int,
                         samples_per_micro_step: int) -> None:
    if train_samples < samples_per_micro_step:
        raise ConfigError(
            f"data.max_corpus_bytes={data_cfg.max_corpus_bytes}: the training split holds "
            f"{train_samples} sequences of data.seq_len={data_cfg.seq_len}, fewer than one "
            f"micro-batch across data-parallel ranks ({samples_per_micro_step}); use more data "
            "(data.max_corpus_bytes in corpus mode) or lower data.seq_len or "
            "trainer.micro_batch_size"
        )
