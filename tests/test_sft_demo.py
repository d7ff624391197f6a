"""+experiment=sft end to end on CPU: a tiny Hugging Face Llama imported with `sf-convert
from-hf`, fine-tuned on the standard library's signature -> docstring conversations rendered
with its ChatML template, lowers the masked validation loss."""

from __future__ import annotations

import pytest

from run_metrics import metrics_records
from scaleforge.core.trainer import Trainer
from scaleforge.launch import convert
from scaleforge.launch.generate import GenerateSettings, sample_text
from sft_runs import imported_model_and_shards, sft_config


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return imported_model_and_shards(tmp_path_factory.mktemp("sft_demo"))


@pytest.mark.slow  # about 35 s on 2 loaded cores
def test_sft_lowers_the_masked_validation_loss_of_an_imported_model(tmp_path, imported):
    model_dir, shards, model_overrides = imported
    run = tmp_path / "run"
    cfg = sft_config(run, model_dir, shards, model_overrides, "trainer.max_steps=10",
                     "trainer.eval_every=10", "optim.lr=3e-3")
    trainer = Trainer(cfg, run)
    assert trainer.initialised_from == model_dir
    trainer.fit()
    evaluations = [r["val_loss"] for r in metrics_records(run) if "val_loss" in r]
    assert len(evaluations) == 2
    first, last = evaluations
    assert last < first - 0.5, evaluations
    log = (run / "train.log").read_text()
    assert "conversations train:" in log and "conversations val:" in log
    print(f"masked val_loss {first:.3f} -> {last:.3f}")

    reply = sample_text(GenerateSettings(ckpt=str(run), prompt="def quote(string, safe='/'):",
                                         max_new_tokens=20, temperature=0, chat=True))
    assert isinstance(reply, str) and "<|im_start|>" not in reply
    convert.dispatch(["to-hf", f"ckpt={run}", f"out={tmp_path / 'hf'}"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "def f(x):"}],
                                             tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\ndef f(x):<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow  # about 60 s on 2 loaded cores
def test_sft_with_lora_resumes_bitwise(tmp_path, imported):
    """4 steps in one go against 2 steps, a checkpoint, a new Trainer resuming from it and 2
    more: the same losses, bitwise (same max_steps, so the same learning rates)."""
    model_dir, shards, model_overrides = imported

    def trainer(run: str) -> Trainer:
        cfg = sft_config(tmp_path / run, model_dir, shards, model_overrides,
                         "model.lora.rank=4", "trainer.max_steps=4", "optim.warmup_steps=1")
        return Trainer(cfg, tmp_path / run)

    def losses(t: Trainer, steps: int) -> list[float]:
        return [t.train_step(t.train_batches)[0].item() for _ in range(steps)]

    whole = losses(trainer("whole"), 4)
    first = trainer("resumed")
    before = losses(first, 2)
    first.save_checkpoint()
    first.checkpointer.wait()
    second = trainer("resumed")
    assert second.step == 2 and second.resumed_from is not None
    assert before + losses(second, 2) == whole
