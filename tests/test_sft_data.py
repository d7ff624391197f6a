"""Instruction data (sf-preprocess sft, data_pipeline/chat_template.py, conversation_shards.py,
packed_conversations.py): conversations rendered with a chat template, the loss on the
assistants' tokens only, packed whole into windows with their own document ids, resumed
exactly, and one-line errors for what cannot be trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from micro_runs import micro_config
from scaleforge.data_pipeline.batch import IGNORE_INDEX
from scaleforge.data_pipeline.chat_template import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    load_template,
    render_conversation,
)
from scaleforge.data_pipeline.config import DataConfig
from scaleforge.data_pipeline.conversation_shards import (
    ConversationShardsJob,
    write_conversation_shards,
)
from scaleforge.data_pipeline.docstring_pairs import write_docstring_pairs
from scaleforge.data_pipeline.loader import TrainBatches, build_loaders
from scaleforge.data_pipeline.packed_conversations import PackedConversations
from scaleforge.data_pipeline.split import VAL_WINDOWS_WANTED
from scaleforge.data_pipeline.tokenizer import Tokenizer
from scaleforge.errors import ConfigError
from scaleforge.models import loss as model_loss
from scaleforge.models.build import build
from sft_runs import CHATML  # a Qwen-style chat template, as HF tokenizers carry it

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "Return a plus b."},
        {"role": "user", "content": "def neg(x):"},
        {"role": "assistant", "content": "Return minus x."}]


@pytest.fixture(scope="module")
def sft_shards(tmp_path_factory, tokenizer_dir) -> Path:
    """Signature -> docstring pairs of 400 kB of the standard library as conversation shards
    of the 400-piece test tokenizer (default template)."""
    directory = tmp_path_factory.mktemp("sft")
    write_docstring_pairs(directory / "pairs.jsonl", 400_000, 120)
    out = directory / "shards"
    write_conversation_shards(ConversationShardsJob(
        input=str(directory / "pairs.jsonl"), tokenizer=tokenizer_dir, out=str(out),
        val_fraction=0.1, shard_tokens=3000))
    return out


def _data(path: Path, seq_len: int = 64, overlong: str = "drop") -> DataConfig:
    cfg = DataConfig(mode="shards", path=str(path), vocab_size=None, seq_len=seq_len,
                     document_masking=True)
    cfg.sft.overlong = overlong
    return cfg


def test_prompt_tokens_carry_no_loss_their_logit_gradients_are_zero(sft_shards):
    batch = next(iter(build_loaders(_data(sft_shards), 4).train))
    ignored = batch.targets == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    cfg = micro_config("unused", "data.vocab_size=512", "model.rope_per_document=true",
                       "data.document_masking=true").model
    cfg.vocab_size = 512
    torch.manual_seed(0)
    model = build(cfg, seed=0)
    logits = model(batch.inputs, batch.document_ids).detach().requires_grad_()
    expected = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                               ignore_index=IGNORE_INDEX)
    loss = model_loss.cross_entropy(logits.clone(), batch.targets)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    gradient = logits.grad
    assert gradient is not None
    assert gradient[ignored].abs().max() == 0  # prompts, template markers, padding
    assert (gradient[~ignored].abs().amax(dim=-1) > 0).all()  # every assistant token


def test_targets_are_the_assistant_replies_and_their_end(sft_shards, tokenizer_dir):
    pairs = [json.loads(line) for line in
             (sft_shards.parent / "pairs.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer.load(tokenizer_dir)
    packed = build_loaders(_data(sft_shards, seq_len=128), 2).train.samples.sources[0]
    tokens, trained, documents = packed.window_arrays(0)
    first = [tokens[i] for i in range(len(tokens)) if trained[i] and documents[i] == 0]
    assert first[-1] == tokenizer.eos_id  # the reply ends the conversation
    reply = tokenizer.decode(first[:-1])
    assert reply.strip() in {pair["response"].strip() for pair in pairs}


def test_hf_chat_template_trains_the_assistant_turns_only(tmp_path):
    tokenizer = _chatml_tokenizer(tmp_path)
    template = load_template("auto", tokenizer.path)
    assert template.source == CHATML
    rendered = render_conversation(CHAT, template, tokenizer, "test")
    trained = [i for i, flag in zip(rendered.ids, rendered.trained, strict=True) if flag]
    expected = (tokenizer.encode("Return a plus b.<|im_end|>\n")
                + tokenizer.encode("Return minus x.<|im_end|>\n"))
    assert trained == expected
    assert tokenizer.decode(rendered.ids) == template.render(CHAT, False).replace(
        "<|im_start|>", "").replace("<|im_end|>", "")


def test_a_record_without_an_assistant_turn_is_a_one_line_error(tmp_path, tokenizer_dir):
    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"messages": CHAT}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"chat.jsonl:2: the conversation has no assistant"):
        write_conversation_shards(ConversationShardsJob(
            input=str(tmp_path / "chat.jsonl"), tokenizer=tokenizer_dir,
            out=str(tmp_path / "out")))


@pytest.mark.parametrize(("line", "message"), [
    ('{"messages": [', r"chat.jsonl:2 is not a JSON object \(.*\); fix or remove that line"),
    ("[1, 2]", r"chat.jsonl:2 is not a JSON object \(a list\); fix or remove that line"),
])
def test_a_line_that_is_not_a_json_object_is_named(tmp_path, tokenizer_dir, line, message):
    """The conversations' JSONL is read by data_pipeline.sources.read_jsonl, as text JSONL."""
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CHAT}) + f"\n{line}\n")
    with pytest.raises(ConfigError, match=message):
        write_conversation_shards(ConversationShardsJob(
            input=str(tmp_path / "chat.jsonl"), tokenizer=tokenizer_dir,
            out=str(tmp_path / "out")))


def test_a_missing_template_is_a_one_line_error(tokenizer_dir):
    with pytest.raises(ConfigError, match="has no chat template.*template=default"):
        load_template("tokenizer", Path(tokenizer_dir))
    with pytest.raises(ConfigError, match="neither one of auto"):
        load_template("nothing.jinja", Path(tokenizer_dir))
    assert load_template("auto", Path(tokenizer_dir)).source == DEFAULT_TEMPLATE


def test_overlong_conversations_are_dropped_or_truncated_and_counted():
    lengths = [5, 12, 3, 20, 4]  # window of 10 tokens: two are too long
    offsets = np.cumsum([0, *lengths])
    tokens = np.arange(offsets[-1], dtype=np.uint16) % 7 + 1
    masks = np.ones(offsets[-1], dtype=np.uint8)

    def packed(overlong):
        return PackedConversations([tokens], [masks], offsets, 9, overlong, eos_id=0)

    dropped, truncated = packed("drop"), packed("truncate")
    assert (dropped.report.dropped, dropped.report.truncated) == (2, 0)
    assert (truncated.report.dropped, truncated.report.truncated) == (0, 2)
    assert "2 longer than the window dropped (data.sft.overlong=drop)" in \
        dropped.report.describe("train", 9)
    assert dropped.report.conversations == 5
    # drop: [5 + 3] [4]; truncate: [5] [10] [3] [10] [4]
    assert len(dropped) == 2 and len(truncated) == 5
    window, trained, documents = dropped.window_arrays(0)
    assert window[:8].tolist() == [*tokens[:5], *tokens[17:20]]
    assert documents.tolist() == [0] * 5 + [1] * 3 + [2] * 2
    assert not trained[8:].any() and (window[8:] == 0).all()  # padding: EOS, untrained
    with pytest.raises(ConfigError, match="data.sft.overlong='cut' is not one of drop"):
        packed("cut")


def test_conversations_need_document_masking(sft_shards):
    cfg = _data(sft_shards)
    cfg.document_masking = False
    with pytest.raises(ConfigError, match="set data.document_masking=true"):
        build_loaders(cfg, 4)


def test_an_empty_validation_split_is_advised_the_val_fraction_that_fills_it(tmp_path,
                                                                             tokenizer_dir):
    """No validation conversation: the error gives the val_fraction, computed from the
    manifest's lowest-position conversations, whose rerun holds out the windows it says."""
    write_docstring_pairs(tmp_path / "pairs.jsonl", 400_000, 120)

    def shards(val_fraction: float) -> DataConfig:
        out = tmp_path / f"shards_{val_fraction}"
        write_conversation_shards(ConversationShardsJob(
            input=str(tmp_path / "pairs.jsonl"), tokenizer=tokenizer_dir, out=str(out),
            val_fraction=val_fraction))
        return _data(out)

    with pytest.raises(ConfigError, match=r"rerun sf-preprocess sft with val_fraction=") as info:
        build_loaders(shards(1e-6), 4)
    advised = float(str(info.value).split("val_fraction=")[1].split()[0])
    assert 1e-6 < advised <= 0.5
    loaders = build_loaders(shards(advised), 4)
    assert len(loaders.val.windows) >= VAL_WINDOWS_WANTED

def test_resume_continues_with_the_next_micro_batch(sft_shards):
    loaders = build_loaders(_data(sft_shards), 2, dp_rank=1, dp_size=2)
    train = loaders.train
    assert isinstance(train, TrainBatches)
    for _ in range(3):
        next(train)
    state = train.state_dict()
    expected = [next(train) for _ in range(4)]
    resumed = build_loaders(_data(sft_shards), 2, dp_rank=1, dp_size=2).train
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        for a, b in zip(got.tensors(), want.tensors(), strict=True):
            assert torch.equal(a, b)


def test_a_conversation_packed_after_another_has_its_logits_alone(sft_shards):
    packed = build_loaders(_data(sft_shards), 2).train.samples.sources[0]
    batch = packed.micro_batch([0])
    second = batch.document_ids[0] == 1
    assert second.any()
    cfg = micro_config("unused", "model.rope_per_document=true").model
    cfg.vocab_size = 512
    torch.manual_seed(0)
    model = build(cfg, seed=0).eval()
    together = model(batch.inputs, batch.document_ids)[0, second]
    alone_inputs = batch.inputs[:, second]
    alone = model(alone_inputs, torch.zeros_like(alone_inputs))[0]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_the_data_chat_template_and_a_run_directory_as_the_tokenizer(
        tmp_path, sft_shards, tokenizer_dir, shard_dir):
    from scaleforge.data_pipeline.vocabulary import data_chat_template
    from scaleforge.launch.preprocess import _model_tokenizer

    template = data_chat_template(_data(sft_shards), Tokenizer.load(tokenizer_dir))
    assert template.source == DEFAULT_TEMPLATE and template.name == "default"
    from omegaconf import OmegaConf

    cfg = micro_config(tmp_path / "run", "data=shards", f"data.path={shard_dir}",
                       "data.vocab_size=null")
    (tmp_path / "run").mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), tmp_path / "run" / "config.yaml")  # a run dir
    resolved = Tokenizer.load(_model_tokenizer(tmp_path / "run"))
    assert resolved.hash == Tokenizer.load(tokenizer_dir).hash  # the run's data tokenizer
    assert _model_tokenizer(Path(tokenizer_dir)) == Path(tokenizer_dir)


def _chatml_tokenizer(directory: Path) -> Tokenizer:
    """A small byte-level BPE tokenizer.json with ChatML's special tokens and template."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator([m["content"] for m in CHAT] * 10, trainer)
    rust.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    return Tokenizer.load(directory / "tokenizer.json")


def test_default_template_renders_roles_on_lines_of_their_own():
    text = ChatTemplate(DEFAULT_TEMPLATE, "default").render(CHAT[1:3], False)
    assert text == "<|user|>\ndef add(a, b):\n<|assistant|>\nReturn a plus b.\n"
