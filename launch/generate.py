"""`sf-generate`: sample text from a checkpoint with the tokenizer of its training data.

    sf-generate ckpt=runs/demo/2026-01-01_00-00-00 prompt="def main(" max_new_tokens=100
    sf-generate ckpt=runs/mine/checkpoints/step_200 prompt="import os" temperature=0 top_k=null
    sf-generate --chat ckpt=runs/sft/mine prompt="def quote(string, safe='/'):"

`ckpt` is a run directory (its newest complete checkpoint, else final_model.pt) or a
step_<N> directory; the model and the tokenizer come from the run's saved config (the
corpus cache, the shards or data.tokenizer it trained on). Decoding keeps a key/value cache
(models/generate.py), on CUDA when there is one. The prompt follows an end-of-document token,
as every document of the training data does; with `--chat` (or chat=true) the prompt is
instead a user's turn rendered with the chat template of the run's data (the one its
conversation shards were made with by sf-preprocess sft, else the tokenizer's own or the
default), the assistant's reply is sampled until the end of the conversation and printed
alone. Arguments are key=value; errors print one `error:` line and exit with 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from scaleforge.errors import ConfigError, exit_on_config_error
from scaleforge.launch.key_value import is_help, parse_settings, print_help, required


@dataclass
class GenerateSettings:
    """Settings of `sf-generate`."""

    # A run directory or a checkpoint directory (step_<N>).
    ckpt: str = required("DIR (a run or checkpoint directory)")
    # The text to continue ("" starts a new document).
    prompt: str = ""
    # Tokens to sample after the prompt (at most model.max_seq_len with the prompt).
    max_new_tokens: int = 100
    # Softmax temperature; 0 is greedy decoding (the most likely token each step).
    temperature: float = 0.8
    # Sample only among the k most likely tokens (null: all of them).
    top_k: int | None = 50
    # Seed of the sampling generator: the same seed gives the same text.
    seed: int = 0
    # auto (cuda when available, else cpu), cpu or cuda.
    device: str = "auto"
    # The prompt as a user's turn in the chat template of the run's data; print the reply
    # (also given as --chat).
    chat: bool = False


def sample_text(settings: GenerateSettings) -> str:
    """The prompt and its continuation, sampled from `settings.ckpt`."""
    import torch

    from scaleforge.data_pipeline.vocabulary import data_chat_template, data_tokenizer
    from scaleforge.launch.convert import read_training_weights
    from scaleforge.models import build
    from scaleforge.models.generate import Sampling, generate
    from scaleforge.parallel.run_setup import resolve_device

    if settings.temperature < 0:
        raise ConfigError(f"temperature={settings.temperature} must be at least 0 (0: greedy)")
    if settings.top_k is not None and settings.top_k < 1:
        raise ConfigError(f"top_k={settings.top_k} must be at least 1, or null for all tokens")
    if settings.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={settings.max_new_tokens} must be at least 1")
    ckpt = Path(settings.ckpt)
    if not ckpt.is_dir():
        raise ConfigError(f"ckpt={ckpt} is not a directory")
    config, state = read_training_weights(ckpt)
    tokenizer = data_tokenizer(config.data)
    device = resolve_device(settings.device)
    model = build(config.model, device=device)
    model.load_state_dict(state)
    if settings.chat:  # a conversation starts its document: no EOS before it
        template = data_chat_template(config.data, tokenizer)
        text = template.render([{"role": "user", "content": settings.prompt}], True)
        prompt_ids = tokenizer.encode(text)
    else:
        prompt_ids = [tokenizer.eos_id, *tokenizer.encode(settings.prompt)]
    room = config.model.max_seq_len - len(prompt_ids)
    if room < settings.max_new_tokens:
        raise ConfigError(
            f"the prompt is {len(prompt_ids)} tokens (with the start-of-document token) and "
            f"max_new_tokens={settings.max_new_tokens}, more than model.max_seq_len="
            f"{config.model.max_seq_len} in all; set max_new_tokens={max(room, 1)} or shorten "
            "the prompt"
        )
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    tokens = generate(model, torch.tensor([prompt_ids], device=device), settings.max_new_tokens,
                      Sampling(settings.temperature, settings.top_k, tokenizer.vocab_size),
                      generator,
                      stop_id=tokenizer.eos_id)
    new = [int(t) for t in tokens[0, len(prompt_ids):] if int(t) != tokenizer.eos_id]
    return tokenizer.decode(new) if settings.chat else settings.prompt + tokenizer.decode(new)


def _run(argv: list[str]) -> None:
    if is_help(argv):
        print_help(GenerateSettings, "sf-generate", __doc__ or "")
        return
    argv = ["chat=true" if argument == "--chat" else argument for argument in argv]
    print(sample_text(parse_settings(GenerateSettings, argv, "sf-generate")))


def main() -> None:
    exit_on_config_error(_run, sys.argv[1:])


if __name__ == "__main__":
    main()
