"""Preprocessing throughput: sf-preprocess shards vs a Hugging Face `datasets.map`
tokenization of the same jsonl data with the same tokenizer.json, in one run.

    python -m scaleforge.bench.preprocess [--megabytes 8 --workers 2]

The corpus is the Python standard library's source as jsonl (4 files). Both sides use one
Hugging Face BPE tokenizer trained here, so only the pipelines differ; ours also runs with
a sentencepiece model for reference. Prints tokens/s and tokens/s per worker process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from scaleforge.data_pipeline.corpus import find_documents, read_document
from scaleforge.data_pipeline.shards import ShardsJob, write_shards
from scaleforge.data_pipeline.tokenizer import train_sentencepiece


def write_corpus(directory: Path, megabytes: int) -> tuple[str, list[str]]:
    texts = [read_document(p) for p in find_documents("stdlib", megabytes * 1_000_000)]
    for part in range(4):
        with open(directory / f"part{part}.jsonl", "w") as stream:
            stream.writelines(json.dumps({"text": t}) + "\n" for t in texts[part::4])
    return str(directory / "*.jsonl"), texts


def hf_tokenizer(directory: Path, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts[::4], trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def ours(pattern: str, tokenizer: Path, out: Path, workers: int) -> tuple[int, float]:
    started = time.perf_counter()
    manifest = write_shards(ShardsJob(input=pattern, tokenizer=str(tokenizer), out=str(out),
                                      workers=workers, unit_bytes=1, progress=False))
    tokens = sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))
    return tokens, time.perf_counter() - started


def huggingface(pattern: str, tokenizer: Path, workers: int) -> tuple[int, float]:
    import datasets
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(tokenizer))
    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=pattern, split="train",
                                    keep_in_memory=True)
    encoded = dataset.map(lambda batch: {"ids": [e.ids for e in fast.encode_batch(batch["text"])]},
                          batched=True, num_proc=workers, remove_columns=["text"],
                          keep_in_memory=True)
    tokens = sum(len(ids) + 1 for ids in encoded["ids"])  # + EOS, as in the shards
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        pattern, texts = write_corpus(root, args.megabytes)
        hf_json = hf_tokenizer(root, texts)
        sentencepiece = train_sentencepiece(texts[::4], 8192, root / "sp")
        runs = {
            "datasets.map (HF tokenizer)": huggingface(pattern, hf_json, args.workers),
            "sf-preprocess shards (HF tokenizer)": ours(pattern, hf_json, root / "a", args.workers),
            "sf-preprocess shards (sentencepiece)": ours(pattern, sentencepiece, root / "b",
                                                         args.workers),
        }
        print(f"{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M characters, "
              f"{args.workers} worker processes")
        for name, (tokens, seconds) in runs.items():
            print(f"{name}: {tokens:,} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tok/s, "
                  f"{tokens / seconds / args.workers:,.0f} tok/s per worker")


if __name__ == "__main__":
    main()
