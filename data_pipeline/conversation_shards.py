"""`sf-preprocess sft`: conversations (JSONL) rendered with a chat template into token shards.

The shards are those of `sf-preprocess shards` (data_pipeline/shards.py: `train/` and `val/`
`.bin` token files with a `.idx.npy` document index, the tokenizer, a checksummed
`manifest.json` written last), one conversation per document, EOS after each; beside each
token file a `.mask.bin` holds one uint8 per token, 1 where the token is trained (an
assistant's, data_pipeline/chat_template.py; the EOS after a conversation that ends with
the assistant too, so the model learns to stop). The manifest's `sft` section records the
template and the trained-token counts, and each shard entry the mask's sha256. Training
reads them with `data=shards data.path=OUT` (data_pipeline/packed_conversations.py).

A conversation goes to validation by a hash of its messages (as a document by its text).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaleforge.data_pipeline import shards
from scaleforge.data_pipeline.chat_template import (
    ChatTemplate,
    conversation_messages,
    load_template,
    render_conversation,
)
from scaleforge.data_pipeline.manifest import FORMAT_VERSION, SPLITS
from scaleforge.data_pipeline.sources import read_jsonl, resolve_inputs
from scaleforge.data_pipeline.split import hash_position, is_validation, lowest_documents
from scaleforge.data_pipeline.token_file import token_dtype
from scaleforge.data_pipeline.tokenizer import Tokenizer, file_sha256
from scaleforge.errors import ConfigError

# Conversations whose hash positions are merged into the lowest ones at a time.
_MERGE_EVERY = 4096

SFT_SECTION = "sft"


def mask_path(tokens_path: Path) -> Path:
    """Where the trained-token mask of a shard lives: `x.bin` -> `x.mask.bin`."""
    return Path(tokens_path).with_suffix(".mask.bin")


@dataclass
class ConversationShardsJob:
    """The settings of `sf-preprocess sft` (each is a key=value argument)."""

    # JSONL files of conversations: {"messages": [{"role", "content"}, ...]} or
    # {"prompt", "response"} per line (.jsonl or .jsonl.gz; a glob).
    input: str
    tokenizer: str  # a tokenizer directory or tokenizer.json (the model's)
    out: str  # the shards' directory: train/, val/, the tokenizer, manifest.json
    # The chat template: auto (the tokenizer's own when it has one, else the default:
    # `<|role|>` and the content on lines of their own), tokenizer (its own, required),
    # default, or a Jinja file.
    template: str = "auto"
    val_fraction: float = 0.05  # share of the conversations held out, by a hash of each
    shard_tokens: int = 1 << 28  # tokens per shard file


def write_conversation_shards(job: ConversationShardsJob) -> dict:
    """Render and tokenize every conversation of `job.input` into shards under `job.out`;
    return the manifest. Raises ConfigError (one line, naming the file and line) for a
    record without an assistant turn, a malformed one, or a template that cannot be used."""
    if not 0 <= job.val_fraction < 1:
        raise ConfigError(f"val_fraction={job.val_fraction} must lie in [0, 1), e.g. 0.05")
    out = Path(job.out)
    tokenizer = Tokenizer.load(job.tokenizer)
    template = load_template(job.template, tokenizer.path)
    stored = shards._store_tokenizer(
        shards.ShardsJob(input=job.input, tokenizer=job.tokenizer, out=job.out), out)
    inputs = resolve_inputs(job.input)
    settings = {
        "format": FORMAT_VERSION,
        "source": {"input": job.input, "text_field": "messages", "units": [inputs]},
        "tokenizer": {"file": str(stored.relative_to(out)), "sha256": tokenizer.hash,
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "val_fraction": job.val_fraction,
        "shard_tokens": job.shard_tokens,
    }
    writers = {split: _MaskedShardWriter(out, split, 0, settings) for split in SPLITS}
    # [hash position, tokens] of the conversations of lowest position (split.lowest_documents),
    # from which a too-small validation split's advice computes the val_fraction it needs.
    lowest: list[list[float]] = []
    positions: list[list[float]] = []
    for where, record in _records(inputs):
        messages = conversation_messages(record, where)
        rendered = render_conversation(messages, template, tokenizer, where)
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        split = "val" if is_validation(key, job.val_fraction) else "train"
        ends_with_reply = messages[-1]["role"] == "assistant"
        writers[split].add_masked(rendered.ids, [*rendered.trained, ends_with_reply], where)
        positions.append([hash_position(key), len(rendered.ids) + 1])  # + its EOS
        if len(positions) >= _MERGE_EVERY:
            lowest, positions = lowest_documents([lowest, positions]), []
    record = {"unit": inputs, "splits": {split: writers[split].close() for split in SPLITS},
              "lowest_documents": lowest_documents([lowest, positions])}
    trained = {split: sum(s["trained_tokens"] for s in record["splits"][split])
               for split in SPLITS}
    settings[SFT_SECTION] = {
        "template": template.name,
        "template_sha256": hashlib.sha256(template.source.encode()).hexdigest(),
        # what sf-generate --chat and sf-convert to-hf render prompts with
        "template_source": template.source,
        "template_tokens": {"bos_token": template.bos_token, "eos_token": template.eos_token},
        "trained_tokens": trained,
    }
    return shards._write_manifest(out, settings, [record])


def _records(inputs: list[str]) -> Iterator[tuple[str, dict]]:
    """(`file:line`, record) of every non-empty line of the JSONL inputs."""
    for path in inputs:
        if not path.endswith((".jsonl", ".jsonl.gz")):
            raise ConfigError(
                f"input: {path} is not a .jsonl or .jsonl.gz file of conversations; give "
                "JSONL with a `messages` list (or `prompt` and `response`) per line"
            )
        for where, record in read_jsonl(path):
            if not isinstance(record, dict):
                raise ConfigError(f"{where} is not a JSON object (a {type(record).__name__}); "
                                  "fix or remove that line")
            yield where, record


class _MaskedShardWriter(shards._ShardWriter):
    """A shard writer that also writes each token's trained flag to `.mask.bin`."""

    def __init__(self, out: Path, split: str, unit_index: int, settings: dict):
        super().__init__(out, split, unit_index, settings)
        self._mask = bytearray()

    def add_masked(self, ids: list[int], trained: list[bool], where: str) -> None:
        """Append one conversation's ids and an EOS; `trained` has one flag per id and the
        EOS's last."""
        self._mask += bytes(np.asarray(trained, dtype=np.uint8))
        self.add(ids, where)

    def _flush(self) -> None:
        path = self._path()
        super()._flush()
        shards._atomic_write_bytes(mask_path(path), bytes(self._mask))
        self.shards[-1]["mask_sha256"] = file_sha256(mask_path(path))
        self.shards[-1]["trained_tokens"] = int(sum(self._mask))
        self._mask = bytearray()


def shards_template(manifest: dict) -> ChatTemplate | None:
    """The chat template conversation shards were rendered with (their manifest's `sft`
    section), or None for other shards."""
    sft = manifest.get(SFT_SECTION)
    if sft is None or "template_source" not in sft:
        return None
    tokens = sft.get("template_tokens", {})
    return ChatTemplate(sft["template_source"], sft["template"], tokens.get("bos_token", ""),
                        tokens.get("eos_token", ""))


def open_masks(directory: Path, manifest: dict, split: str, verify: bool) -> list[np.ndarray]:
    """The trained-token masks (uint8, one per token) of a split's shards, memory-mapped in
    manifest order; sizes always checked, sha256 with `verify`."""
    masks = []
    for shard in manifest["splits"][split]["shards"]:
        path = mask_path(Path(directory) / shard["file"])
        if not path.is_file() or path.stat().st_size != shard["tokens"]:
            raise ConfigError(
                f"{path} is missing or not {shard['tokens']} bytes (one per token); rerun "
                "sf-preprocess sft into a new out= directory"
            )
        if verify and file_sha256(path) != shard["mask_sha256"]:
            raise ConfigError(
                f"{path} is corrupt: its sha256 differs from the manifest's; rerun "
                "sf-preprocess sft"
            )
        masks.append(np.memmap(path, dtype=np.uint8, mode="r") if shard["tokens"]
                     else np.zeros(0, np.uint8))
    return masks

