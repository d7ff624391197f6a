"""models/attention/: the sdpa kernel with grouped-query heads, per-document masks (sdpa's
block-diagonal mask, flex's BlockMask, flash's varlen offsets), RoPE positions per
document, and the refusal of backends this machine cannot run. Single process, CPU; the
flash and flex kernels themselves run in tests/test_cuda.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from micro_runs import micro_config, synthetic_data
from scaleforge.core.config import validate
from scaleforge.core.trainer import Trainer
from scaleforge.errors import ConfigError
from scaleforge.models import TransformerConfig, build
from scaleforge.models.attention import (
    KERNELS,
    AttentionRun,
    SdpaKernel,
    Supports,
    VarlenDocuments,
    check_attention,
    document_positions,
    make_kernel,
)
from scaleforge.models.rope import rope_tables

EOS = 0


def llama(**overrides: object) -> TransformerConfig:
    settings: dict = dict(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                          ffn_hidden=128, vocab_size=101, max_seq_len=64)
    return TransformerConfig(**(settings | overrides))


def documents_of(lengths: list[int]) -> torch.Tensor:
    """Token ids (1, sum(lengths)) of documents of the given lengths, each ending in EOS."""
    generator = torch.Generator().manual_seed(sum(lengths))
    parts = []
    for length in lengths:
        body = torch.randint(1, 101, (length - 1,), generator=generator)
        parts.append(torch.cat([body, torch.tensor([EOS])]))
    return torch.cat(parts)[None]


def ids_of(tokens: torch.Tensor) -> torch.Tensor:
    from scaleforge.data_pipeline.samples import document_ids

    return document_ids(tokens, EOS)


def attention_mask(backend: str, document_ids: torch.Tensor | None, seq_len: int,
                   device: torch.device, window: int | None = None) -> object:
    """The mask the kernel `backend` builds for a batch."""
    return make_kernel(backend, window).mask(document_ids, seq_len, device, torch.float32)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, mask: object,
           window: int | None = None) -> torch.Tensor:
    """The kernel `backend`'s attention under `mask`."""
    return make_kernel(backend, window)(q, k, v, mask)


def repeated_kv_attention(kernel: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: object) -> torch.Tensor:
    """The attention before enable_gqa: K and V copied per query head, plain causal SDPA."""
    repeats = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_sdpa_with_enable_gqa_trains_like_copied_kv_heads(tmp_path, monkeypatch):
    cfg = micro_config(tmp_path)  # llama_micro: 4 query heads share 2 kv heads
    assert cfg.model.kv_heads < cfg.model.n_heads

    def losses(run_dir: str) -> list[float]:
        trainer = Trainer(cfg, tmp_path / run_dir, data=synthetic_data(cfg))
        return [trainer.train_step(trainer.train_batches)[0].item() for _ in range(3)]

    grouped = losses("grouped")
    monkeypatch.setattr(SdpaKernel, "__call__", repeated_kv_attention)
    copied = losses("copied")
    torch.testing.assert_close(torch.tensor(grouped), torch.tensor(copied), rtol=1e-6, atol=0)


def test_document_positions_restart_at_each_document():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, 8, 9, 9], [EOS, 1, 2, 3, 4, EOS, EOS, 5]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 0, 0]])
    assert torch.equal(document_positions(ids_of(tokens)), expected)


def test_sdpa_document_mask_is_block_diagonal_and_causal():
    ids = ids_of(torch.tensor([[3, EOS, 4, 5, EOS, 6]]))
    mask = attention_mask("sdpa", ids, 6, torch.device("cpu"))
    assert isinstance(mask, torch.Tensor) and mask.shape == (1, 1, 6, 6)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_flash_varlen_offsets_cut_the_flattened_batch_at_every_document():
    tokens = torch.tensor([[3, EOS, 4, 5, EOS, 6], [7, 8, 9, EOS, EOS, 1]])
    mask = attention_mask("flash", ids_of(tokens), 6, torch.device("cpu"))
    assert isinstance(mask, VarlenDocuments)
    # row 0: [0, 2) [2, 5) [5, 6); row 1 starts a document at 6: [6, 10) [10, 11) [11, 12)
    assert mask.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 11, 12]
    assert mask.cu_seqlens.dtype == torch.int32 and mask.max_seqlen == 6


def test_flex_document_block_mask_gives_the_sdpa_numbers():
    # flex_attention runs eagerly here (CPU: a reference implementation), which checks the
    # mask function; the trainer runs it compiled on CUDA only.
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 32, 16, generator=generator)
    k, v = (torch.randn(2, 2, 32, 16, generator=generator) for _ in range(2))
    tokens = torch.randint(1, 50, (2, 32), generator=generator)
    tokens[0, [4, 19, 20]] = EOS
    tokens[1, 30] = EOS
    ids = ids_of(tokens)
    cpu = torch.device("cpu")
    expected = attend(q, k, v, "sdpa", attention_mask("sdpa", ids, 32, cpu))
    flex_eager = torch.nn.attention.flex_attention.flex_attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's notice that it runs uncompiled
        actual = flex_eager(q, k, v, block_mask=attention_mask("flex", ids, 32, cpu),
                            enable_gqa=True)
        causal = flex_eager(q, k, v, block_mask=attention_mask("flex", None, 32, cpu),
                            enable_gqa=True)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(causal, attend(q, k, v, "sdpa", None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_documents", [False, True])
def test_sliding_window_masks_agree_and_follow_the_rule(with_documents):
    """Query i sees keys i - window + 1 .. i (within its document): sdpa's boolean mask
    against the rule written out, and flex's mask function (eager on CPU) against sdpa."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 32, 16, generator=generator)
    k, v = (torch.randn(2, 2, 32, 16, generator=generator) for _ in range(2))
    tokens = torch.randint(1, 50, (2, 32), generator=generator)
    tokens[0, [4, 19]] = EOS
    ids = ids_of(tokens) if with_documents else None
    cpu, window = torch.device("cpu"), 5
    mask = attention_mask("sdpa", ids, 32, cpu, window)
    assert isinstance(mask, torch.Tensor)
    i, j = torch.arange(32)[:, None], torch.arange(32)[None, :]
    rule = (j <= i) & (j > i - window)
    if ids is not None:
        rule = rule & (ids[:, :, None] == ids[:, None, :])
    assert torch.equal(mask.expand(2, 1, 32, 32), rule.expand(2, 32, 32)[:, None])
    expected = attend(q, k, v, "sdpa", mask, window)
    flex_eager = torch.nn.attention.flex_attention.flex_attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's notice that it runs uncompiled
        actual = flex_eager(q, k, v, block_mask=attention_mask("flex", ids, 32, cpu, window),
                            enable_gqa=True)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope_per_document", [True, False])
def test_document_packed_after_others_has_the_logits_it_has_alone(rope_per_document):
    torch.manual_seed(0)
    model = build(llama(rope_per_document=rope_per_document))
    earlier, last = documents_of([13, 21, 9]), documents_of([19])
    packed = torch.cat([earlier, last], dim=1)  # (1, 62): the last document at offset 43
    with torch.no_grad():
        alone = model(last, ids_of(last))
        together = model(packed, ids_of(packed))
    torch.testing.assert_close(together[:, 43:], alone, rtol=1e-5, atol=1e-5)
    if not rope_per_document:  # without the mask the document reads the ones before it
        with torch.no_grad():
            unmasked = model(packed)
        assert (unmasked[:, 43:] - alone).abs().max() > 1e-2


def test_rope_per_document_rotates_each_document_from_position_zero():
    model = build(llama(rope_per_document=True))
    tokens = documents_of([5, 7])
    cos, sin = model._rope(12, ids_of(tokens))
    table_cos, table_sin = rope_tables(model.cfg.head_size, 12, model.cfg.rope_theta)
    positions = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert torch.equal(cos[0, 0], table_cos[positions])
    assert torch.equal(sin[0, 0], table_sin[positions])


def test_rope_per_document_without_document_ids_raises_naming_the_settings():
    model = build(llama(rope_per_document=True))
    with pytest.raises(ValueError, match="data.document_masking=true"):
        model(documents_of([8]))


@pytest.mark.parametrize("backend", ["flash", "flex"])
def test_cuda_backends_are_refused_on_cpu_at_validation(tmp_path, backend):
    cfg = micro_config(tmp_path, f"model.attention={backend}")
    with pytest.raises(ConfigError, match=f"model.attention={backend} runs on CUDA only"):
        validate(cfg)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("flash_attn") is not None,
    reason="flash-attn is installed here",
)
def test_flash_without_the_package_stops_with_the_install_line():
    with pytest.raises(ConfigError, match="pip install flash-attn --no-build-isolation"):
        check_attention("flash", AttentionRun(device_type="cuda", precision="bf16"))


def test_flash_in_fp32_is_refused():
    with pytest.raises(ConfigError, match="trainer.precision=bf16"):
        check_attention("flash", AttentionRun(device_type="cuda", precision="fp32"))


def test_unknown_backend_and_rope_per_document_on_gpt_are_config_errors():
    with pytest.raises(ConfigError, match="model.attention='xformers' is not one of"):
        llama(attention="xformers").check()
    with pytest.raises(ConfigError, match="model.rope_per_document=true"):
        TransformerConfig(family="gpt", rope_per_document=True).check()


def test_validation_asks_the_kernel_what_it_supports(monkeypatch):
    """A kernel registered with one line is a model.attention choice; what its `Supports`
    leaves out is refused in one line naming the kernels that can run it instead."""

    class CausalOnly(SdpaKernel):
        name = "causal_only"
        supports = Supports(sliding_window=False, documents=False)

    monkeypatch.setitem(KERNELS, "causal_only", CausalOnly)
    check_attention("causal_only", AttentionRun(device_type="cpu", precision="fp32"))
    with pytest.raises(ConfigError, match=r"model.attention=causal_only with data.document_"
                       r"masking=true: causal_only takes no document mask; use model.attention"
                       r"=sdpa$"):
        check_attention("causal_only", AttentionRun(device_type="cpu", precision="fp32",
                                                    document_masking=True))
    with pytest.raises(ConfigError, match="parallel.cp=2 with model.attention=flex"):
        check_attention("flex", AttentionRun(cp=2))
    check_attention("sdpa", AttentionRun(device_type="cpu", sliding_window=8, cp=2,
                                         document_masking=True, grouped_query=True))
