"""The fine-tuning runs the SFT and LoRA tests share: a tiny Hugging Face Llama with a byte-
level BPE tokenizer carrying ChatML's template, imported with `sf-convert from-hf`, and the
standard library's signature -> docstring pairs rendered into conversation shards with it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scaleforge.core.config import Config, compose, to_config
from scaleforge.data_pipeline.conversation_shards import (
    ConversationShardsJob,
    write_conversation_shards,
)
from scaleforge.data_pipeline.docstring_pairs import docstring_pairs
from scaleforge.launch import convert

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SEQ_LEN = 128


def write_chatml_tokenizer(directory: Path, texts: list[str], vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json of `vocab_size` ids trained on `texts`, with ChatML's
    special tokens, and a tokenizer_config.json holding ChatML's chat template."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rust.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    rust.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}))


def imported_model_and_shards(root: Path) -> tuple[Path, Path, list[str]]:
    """(model-only checkpoint from `sf-convert from-hf`, conversation shards, the model.*
    overrides from-hf prints) of a 2-layer, 64-wide Llama with random weights and 512 ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    pairs = list(docstring_pairs(300_000, 120))
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    hf_dir = root / "hf"
    write_chatml_tokenizer(hf_dir, [p["prompt"] + "\n" + p["response"] for p in pairs], 512)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        num_hidden_layers=2, vocab_size=512, max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
    )).save_pretrained(hf_dir)
    model_dir = root / "imported"
    convert.dispatch(["from-hf", f"hf={hf_dir}", f"out={model_dir}"])
    model_cfg, _ = convert.hf_conversion().load_hf(hf_dir)
    shards = root / "shards"
    write_conversation_shards(ConversationShardsJob(
        input=str(root / "pairs.jsonl"), tokenizer=str(model_dir), out=str(shards),
        val_fraction=0.1))
    return model_dir, shards, convert.model_overrides(model_cfg)


def sft_config(run_dir: Path, model_dir: Path, shards: Path, model_overrides: list[str],
               *overrides: str) -> Config:
    """+experiment=sft from the imported model, shortened for a test: fp32 on CPU, 2,048
    tokens a step, W&B off; `overrides` as on the command line."""
    return to_config(compose([
        "+experiment=sft", f"data.path={shards}", f"trainer.init_from={model_dir}",
        *model_overrides, "trainer.device=cpu", "trainer.precision=fp32",
        "trainer.global_batch_tokens=2048", "trainer.micro_batch_size=8",
        "logging.wandb=disabled", "logging.progress_bar=false", f"run_dir={run_dir}",
        *overrides,
    ]))
