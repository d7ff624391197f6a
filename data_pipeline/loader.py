"""Training and validation micro-batches of a data-parallel rank, and `build_loaders`, the
trainer's entry point for every data mode.

The samples are packed windows over token shards, blended by weight
(data_pipeline/samples.py); every sample is found from its index alone, so work splits
without coordination: micro-batch m holds samples m*B ... m*B + B - 1; data-parallel rank r
takes micro-batches i * dp_size + r, and its DataLoader worker w of W the rank's
micro-batches i with i mod W == w, which the DataLoader hands out in order. The position is
a single count, so state_dict() resumes exactly, with any number of workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scaleforge.data_pipeline.batch import Batch
from scaleforge.data_pipeline.config import DataConfig
from scaleforge.data_pipeline.conversation_shards import SFT_SECTION, open_masks
from scaleforge.data_pipeline.manifest import load_manifest, load_shard_tokenizer, open_split
from scaleforge.data_pipeline.packed_conversations import PackedConversations
from scaleforge.data_pipeline.prepare import prepare
from scaleforge.data_pipeline.samples import (
    BlendedSamples,
    TokenStream,
    TokenWindows,
    WindowSource,
)
from scaleforge.data_pipeline.sources import open_streaming_dataset
from scaleforge.data_pipeline.split import (
    VAL_WINDOWS_WANTED,
    lowest_documents,
    val_fraction_for,
)
from scaleforge.data_pipeline.streaming import StreamingBatches
from scaleforge.data_pipeline.token_file import read_document_index
from scaleforge.data_pipeline.tokenizer import Tokenizer
from scaleforge.data_pipeline.vocabulary import missing_shard_source
from scaleforge.errors import ConfigError


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

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for step in itertools.count(self.first_step + worker_id, num_workers):
            yield self.micro_batch(step)

    def micro_batch(self, step: int) -> Batch:
        """This rank's micro-batch `step`: the group's micro-batch step * dp_size + rank."""
        start = (step * self.dp_size + self.dp_rank) * self.micro_batch_size
        return self.samples.micro_batch(np.arange(start, start + self.micro_batch_size),
                                        self.eos_id)


class TrainBatches:
    """Endless, shuffled training micro-batches for one data-parallel rank.

    Yields `Batch`es: inputs and targets, int64 tensors of shape (micro_batch_size, seq_len),
    and document ids of the same shape (see document_ids) when `eos_id` is given. `num_workers`
    DataLoader processes prepare batches ahead; the batches are the same for any number.
    With `pin_memory` (training on CUDA) every batch comes in page-locked memory, so the
    trainer's copy to the GPU does not wait for it. state_dict() is the same on every rank
    and counts the group's samples, so a run may resume with another number of workers or
    another dp_size.
    """

    # state_dict() is the data-parallel group's position, so any rank's resumes every rank.
    STATE_IS_GLOBAL = True

    def __init__(
        self,
        samples: WindowSource | BlendedSamples,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        eos_id: int | None = None,
        pin_memory: bool = False,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if not isinstance(samples, BlendedSamples):
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
        self.pin_memory = pin_memory
        self.step = 0  # this rank's micro-batches consumed so far
        self._batches: Iterator | None = None

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> Batch:
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
            return map(Batch.pin_memory, stream) if self.pin_memory else iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                               pin_memory=self.pin_memory, persistent_workers=False))


class ValBatches:
    """Validation micro-batches in a fixed order, shared out over data-parallel ranks the
    same way as training: rank r's i-th micro-batch is the single-process one i * dp_size + r."""

    def __init__(
        self, windows: WindowSource, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
        eos_id: int | None = None,
    ):
        self.windows = windows
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.eos_id = eos_id

    def batches(self, num_batches: int) -> Iterator[Batch]:
        """This rank's first `num_batches` micro-batches: inputs and targets, int64, each
        (micro_batch_size, seq_len), and their document ids when `eos_id` is given. The same
        every call; when the split holds fewer windows than asked for, they repeat from the
        start."""
        for step in range(num_batches):
            start = (step * self.dp_size + self.dp_rank) * self.micro_batch_size
            window_ids = np.arange(start, start + self.micro_batch_size) % len(self.windows)
            yield self.windows.micro_batch(window_ids, self.eos_id)


class PreparedData(NamedTuple):
    """What the loaders read: the shard directories (none when streaming), the
    tokenizer's vocabulary size, and lines worth reporting at start (how conversations were
    packed)."""

    directories: tuple[Path, ...]
    vocab_size: int
    notes: tuple[str, ...] = ()


class Loaders(NamedTuple):
    """What build_loaders returns; unpacks as (train, val, tokenizer, prepared)."""

    train: TrainBatches | StreamingBatches
    val: ValBatches | StreamingBatches
    tokenizer: Tokenizer
    prepared: PreparedData


def build_loaders(
    data_cfg: DataConfig, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
    accelerator: bool = False,
) -> Loaders:
    """The trainer's entry point: the training and validation micro-batch sources of data-
    parallel rank `dp_rank` of `dp_size` for `data_cfg` (any mode), the tokenizer and what
    was read. Shuffling is seeded by data_cfg.seed.

    With data_cfg.document_masking every micro-batch carries its document ids as a third
    tensor (data_pipeline.samples.document_ids, after the tokenizer's EOS).
    `accelerator`: the batches go to a GPU, so training batches are pinned (their copies
    run asynchronously) and data.num_workers=-1 means one worker (`DataConfig.workers`).
    """
    if data_cfg.mode == "streaming":
        return _streaming_loaders(data_cfg, micro_batch_size, dp_rank, dp_size, accelerator)
    sources = _shard_sources(data_cfg)
    directories = tuple(directory for directory, _ in sources)
    if any(SFT_SECTION in load_manifest(directory) for directory in directories):
        return _conversation_loaders(data_cfg, directories, micro_batch_size, dp_rank, dp_size,
                                     accelerator)
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
    _check_validation_size(data_cfg, len(val), directories)
    train = BlendedSamples(
        [TokenWindows(TokenStream(train_shards), seq_len) for train_shards, _, _ in opened],
        [weight for _, weight in sources],
        data_cfg.seed,
    )
    _check_training_size(data_cfg, len(train), micro_batch_size, dp_size)
    eos_id = tokenizer.eos_id if data_cfg.document_masking else None
    return Loaders(
        train=TrainBatches(train, micro_batch_size, data_cfg.seed, dp_rank, dp_size,
                           num_workers=data_cfg.workers(accelerator), eos_id=eos_id,
                           pin_memory=accelerator),
        val=ValBatches(val, micro_batch_size, dp_rank, dp_size, eos_id),
        tokenizer=tokenizer,
        prepared=PreparedData(directories, tokenizer.vocab_size),
    )


def _conversation_loaders(data_cfg: DataConfig, directories: tuple[Path, ...],
                          micro_batch_size: int, dp_rank: int, dp_size: int,
                          accelerator: bool) -> Loaders:
    """The loaders of conversation shards (`sf-preprocess sft`): whole conversations packed
    into windows, the loss on the assistants' tokens (data_pipeline/packed_conversations.py)."""
    if len(directories) > 1:
        raise ConfigError(
            f"data.blend: {', '.join(map(str, directories))} include conversation shards "
            "(sf-preprocess sft), which are read alone; give one of them as data.path"
        )
    if not data_cfg.document_masking:
        raise ConfigError(
            f"data.path={str(directories[0])!r} holds conversations (sf-preprocess sft), "
            "packed several to a window; set data.document_masking=true (and "
            "model.rope_per_document=true) so that they do not attend to each other, as "
            "+experiment=sft does"
        )
    directory = directories[0]
    manifest = load_manifest(directory)
    train_shards, val_shards, tokenizer = _open_shards(directory, data_cfg)
    _check_vocab(data_cfg, tokenizer, directory)

    def packed(split: str, token_shards: list[np.ndarray]) -> PackedConversations:
        return PackedConversations(
            token_shards, open_masks(directory, manifest, split, data_cfg.verify_shards),
            _document_offsets(directory, manifest, split), data_cfg.seq_len,
            data_cfg.sft.overlong, tokenizer.eos_id)

    train, val = packed("train", train_shards), packed("val", val_shards)
    if len(val) == 0:
        raise ConfigError(
            f"data.path={str(directory)!r}: the validation split holds no conversation "
            "(or only ones longer than the window, data.sft.overlong=drop); rerun sf-preprocess "
            f"sft with val_fraction={_conversations_val_fraction(manifest, data_cfg)} (it "
            f"holds out at least {VAL_WINDOWS_WANTED} windows of conversations) into a new "
            "out= directory"
        )
    _check_training_size(data_cfg, len(train), micro_batch_size, dp_size)
    notes = tuple(f"conversations {part.report.describe(split, data_cfg.seq_len)}"
                  for split, part in (("train", train), ("val", val)))
    return Loaders(
        train=TrainBatches(train, micro_batch_size, data_cfg.seed, dp_rank, dp_size,
                           num_workers=data_cfg.workers(accelerator), eos_id=tokenizer.eos_id,
                           pin_memory=accelerator),
        val=ValBatches(val, micro_batch_size, dp_rank, dp_size, tokenizer.eos_id),
        tokenizer=tokenizer,
        prepared=PreparedData(directories, tokenizer.vocab_size, notes),
    )


def _document_offsets(directory: Path, manifest: dict, split: str) -> np.ndarray:
    """Document boundaries (num_documents + 1,) of a split's shards read back to back."""
    offsets, base = [np.zeros(1, dtype=np.int64)], 0
    for shard in manifest["splits"][split]["shards"]:
        index = read_document_index(Path(directory) / shard["file"])
        offsets.append(base + index[1:])
        base += shard["tokens"]
    return np.concatenate(offsets)


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
    raise missing_shard_source()


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
                       dp_size: int, accelerator: bool) -> Loaders:
    if not data_cfg.dataset or not data_cfg.tokenizer:
        raise ConfigError(
            "data.mode=streaming needs data.dataset (hub name, save_to_disk directory or a "
            f"jsonl/parquet glob; got {data_cfg.dataset!r}) and data.tokenizer (got "
            f"{data_cfg.tokenizer!r})"
        )
    tokenizer = Tokenizer.load(data_cfg.tokenizer)
    _check_vocab(data_cfg, tokenizer, Path(data_cfg.tokenizer))
    dataset = data_cfg.dataset
    eos_id = tokenizer.eos_id if data_cfg.document_masking else None

    def batches(split: str) -> StreamingBatches:
        return StreamingBatches(open_streaming_dataset(dataset), tokenizer,
                                data_cfg.text_field, data_cfg.seq_len, micro_batch_size,
                                data_cfg.val_fraction, split, dp_rank, dp_size,
                                pin_memory=accelerator and split == "train", eos_id=eos_id)

    return Loaders(batches("train"), batches("val"), tokenizer,
                   PreparedData((), tokenizer.vocab_size))


def _conversations_val_fraction(manifest: dict, data_cfg: DataConfig) -> float:
    """The val_fraction of `sf-preprocess sft` that holds out VAL_WINDOWS_WANTED windows of
    conversations: exact from the manifest's lowest-position conversations, where those
    longer than the window count for nothing under data.sft.overlong=drop."""
    capacity = data_cfg.seq_len + 1
    lowest = [[position, 0 if tokens > capacity and data_cfg.sft.overlong == "drop"
               else min(tokens, capacity)]
              for position, tokens in manifest.get("lowest_documents", [])]
    splits = manifest["splits"].values()
    return val_fraction_for(VAL_WINDOWS_WANTED * capacity, manifest["val_fraction"], lowest,
                            sum(s["tokens"] for s in splits), sum(s["documents"] for s in splits))

def _check_vocab(data_cfg: DataConfig, tokenizer: Tokenizer, where: Path) -> None:
    if data_cfg.vocab_size is not None and tokenizer.vocab_size != data_cfg.vocab_size:
        raise ConfigError(
            f"data.vocab_size={data_cfg.vocab_size} but the tokenizer of {where} has "
            f"{tokenizer.vocab_size} ids; set data.vocab_size={tokenizer.vocab_size} or null "
            "(the tokenizer's), and model.vocab_size at least that"
        )


def _check_validation_size(data_cfg: DataConfig, val_windows: int,
                           directories: tuple[Path, ...]) -> None:
    if val_windows:
        return
    needed = data_cfg.seq_len + 1
    manifests = [load_manifest(directory) for directory in directories]
    splits = [split for m in manifests for split in m["splits"].values()]
    total, documents = (sum(s[key] for s in splits) for key in ("tokens", "documents"))
    lowest = lowest_documents([m.get("lowest_documents", []) for m in manifests])
    # A few windows, so that evaluation reads more than one.
    fraction = val_fraction_for(VAL_WINDOWS_WANTED * needed + 1, manifests[0]["val_fraction"],
                                lowest, total, documents)
    val_tokens = sum(m["splits"]["val"]["tokens"] for m in manifests)
    # A window reads seq_len + 1 tokens: a shorter one fits only if there are 2 or more.
    shorter = (f", or lower data.seq_len to {val_tokens - 1} or less" if val_tokens > 1
               else "")
    if data_cfg.mode == "corpus":
        raise ConfigError(
            f"data.val_fraction={data_cfg.val_fraction}: the validation split holds "
            f"{val_tokens} tokens, fewer than data.seq_len + 1 = {needed}; set "
            f"data.val_fraction={fraction} (it holds out {VAL_WINDOWS_WANTED} windows)"
            f"{shorter}"
        )
    raise ConfigError(
        f"data.path: the validation split of {', '.join(map(str, directories))} holds "
        f"{val_tokens} tokens, fewer than data.seq_len + 1 = {needed} (sf-preprocess shards "
        f"held out val_fraction={manifests[0]['val_fraction']} of the documents); rerun "
        f"sf-preprocess shards with val_fraction={fraction} (it holds out "
        f"{VAL_WINDOWS_WANTED} windows) into a new out= directory{shorter}"
    )


def _check_training_size(data_cfg: DataConfig, train_samples: int, micro_batch_size: int,
                         dp_size: int) -> None:
    if train_samples < micro_batch_size * dp_size:
        # A divisor of the micro-batch size keeps trainer.global_batch_tokens a whole number
        # of micro-batches; each data-parallel rank needs one sequence at least.
        fits = [size for size in range(micro_batch_size, 0, -1)
                if micro_batch_size % size == 0 and size * dp_size <= train_samples]
        smaller = f"set trainer.micro_batch_size={fits[0]}, or " if fits else ""
        raise ConfigError(
            f"data.max_corpus_bytes={data_cfg.max_corpus_bytes}: the training split holds "
            f"{train_samples} sequence{'' if train_samples == 1 else 's'} of data.seq_len="
            f"{data_cfg.seq_len}, fewer than one micro-batch across data-parallel ranks "
            f"(trainer.micro_batch_size {micro_batch_size} x {dp_size}); {smaller}use more "
            "data (data.max_corpus_bytes in corpus mode) or a shorter data.seq_len"
        )
