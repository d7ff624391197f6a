"""What a checkpoint is for besides training: sampling with a key/value cache
(models/generate.py, `sf-generate`), evaluation alone (`trainer.eval_only`) and its
tokenizer exported to Hugging Face (`sf-convert to-hf`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from commands import run_tool
from scaleforge.models import TransformerConfig, build
from scaleforge.models.generate import Sampling, generate


def _greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        logits = model(tokens)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_cached_greedy_decoding_equals_full_forwards(family):
    cfg = TransformerConfig(family=family, n_layers=2, d_model=64, n_heads=4,
                            n_kv_heads={"llama": 2, "gpt": None}[family], vocab_size=97,
                            max_seq_len=40, kernels="torch")
    model = build(cfg, seed=0).eval()
    prompt = torch.randint(97, (2, 7), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 20, Sampling(temperature=0))
    with torch.no_grad():
        assert torch.equal(cached, _greedy_without_cache(model, prompt, 20))


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(sliding_window=5)],
                         ids=["qk_norm", "sliding_window"])
def test_cached_decoding_logits_equal_a_full_forward(options):
    """The cached path applies what the model's attention does: Qwen 3's per-head q/k norms
    and Mistral's sliding window (past the window, a cache that ignored it would differ)."""
    from scaleforge.models.generate import KVCache, _forward_cached

    cfg = TransformerConfig(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                            vocab_size=97, max_seq_len=40, kernels="torch", **options)
    model = build(cfg, seed=0).eval()
    with torch.no_grad():  # weights whose norms differ from 1, so a skipped norm shows
        for name, parameter in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(97, (2, 16), generator=torch.Generator().manual_seed(1))
    cache = KVCache()
    with torch.no_grad():
        full = model(tokens)
        steps = [_forward_cached(model, tokens[:, :6], cache, 0)]
        steps += [_forward_cached(model, tokens[:, i:i + 1], cache, i) for i in range(6, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    cfg = TransformerConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=50, max_seq_len=24)
    model = build(cfg, seed=0)
    prompt = torch.tensor([[3, 4, 5]])

    def draw(seed: int, sampling: Sampling) -> torch.Tensor:
        return generate(model, prompt, 12, sampling, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7, Sampling(1.0, 10)), draw(7, Sampling(1.0, 10)))
    assert torch.equal(draw(1, Sampling(1.0, 1)), draw(2, Sampling(0.0)))
    with pytest.raises(ValueError, match=r"max_new_tokens=30 exceeds model\.max_seq_len=24"):
        generate(model, prompt, 30, Sampling())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, stdlib_overrides) -> Path:
    """A two-step demo run on the standard-library slice (its checkpoint and data cache)."""
    directory = tmp_path_factory.mktemp("demo")
    result = run_tool("sf-train", "+experiment=demo", *stdlib_overrides, "data.vocab_size=1024",
                      "trainer.max_steps=2", "trainer.global_batch_tokens=4096",
                      "trainer.eval_every=0", "logging.wandb=disabled",
                      f"run_dir={directory / 'run'}", cwd=directory)
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / "run"


def test_sf_generate_prints_text_from_a_demo_checkpoint(demo_run, tmp_path):
    arguments = [f"ckpt={demo_run}", "prompt=def main(", "max_new_tokens=20", "seed=3"]
    first = run_tool("sf-generate", *arguments, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    text = first.stdout.partition("\ndef main(")[2]  # after the data cache's line
    assert len(text.strip()) > 0, first.stdout
    assert run_tool("sf-generate", *arguments, cwd=tmp_path).stdout == first.stdout
    too_long = run_tool("sf-generate", f"ckpt={demo_run}", "max_new_tokens=1000", cwd=tmp_path)
    assert too_long.returncode == 2 and "model.max_seq_len=256" in too_long.stderr


def test_to_hf_writes_a_tokenizer_that_encodes_as_ours(demo_run, tmp_path, texts):
    from transformers import AutoTokenizer

    from scaleforge.core.checkpoint.safe_load import load_checkpoint_config
    from scaleforge.data_pipeline.vocabulary import data_tokenizer

    out = tmp_path / "hf"
    result = run_tool("sf-convert", "to-hf", f"ckpt={demo_run}", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"-> {out}" in result.stdout.splitlines()[-1]
    ours = data_tokenizer(load_checkpoint_config(demo_run).data)
    theirs = AutoTokenizer.from_pretrained(out)
    sentences = [line for text in texts for line in text.splitlines() if len(line) > 20][:200]
    assert all(theirs(s)["input_ids"] == ours.encode(s) for s in sentences)
    whole = texts[0]
    assert theirs(whole)["input_ids"] == ours.encode(whole)
    assert theirs.decode(ours.encode(whole)) == ours.decode(ours.encode(whole))
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        ours.bos_id, ours.eos_id, ours.pad_id)


def test_eval_only_reports_a_checkpoints_validation_loss(demo_run, tmp_path, stdlib_overrides):
    arguments = ["+experiment=demo", *stdlib_overrides, "data.vocab_size=1024",
                 "trainer.eval_only=true", "logging.wandb=disabled"]
    result = run_tool("sf-train", *arguments, f"trainer.init_from={demo_run}",
                      f"run_dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("eval: "))
    loss = float(line.split("val_loss ")[1].split(",")[0])
    ppl = float(line.split("val_ppl ")[1])
    assert 0 < loss < 8.0 and ppl == pytest.approx(math.exp(loss), rel=1e-3)
    assert not (tmp_path / "eval" / "checkpoints").exists()  # nothing trained or saved
    # the model comes from the checkpoint's config, whatever the command line composes
    other = run_tool("sf-train", *arguments, "model=llama_micro", f"trainer.init_from={demo_run}",
                     f"run_dir={tmp_path / 'other'}", cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    assert f"eval-only: the model of {demo_run}" in other.stdout and "(llama_tiny:" in \
        other.stdout
    assert f"val_loss {loss:.4f}" in other.stdout
    missing = run_tool("sf-train", *arguments, f"run_dir={tmp_path / 'none'}", cwd=tmp_path)
    assert missing.returncode == 2 and "trainer.eval_only=true evaluates a checkpoint" in \
        missing.stderr
