"""The attention backends on one CUDA GPU (marked `cuda`: skipped without one): sdpa, flex
and flash (where flash-attn is installed) give the same numbers in bf16, with and without
per-document masks and a sliding window, train alike, and a document packed after others
keeps the logits it has alone; FSDP over an NCCL group of one rank trains like the plain
model. Seconds each, plus flex's first compilation."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_distributed_test
from micro_runs import micro_config, synthetic_data
from scaleforge.core.trainer import Trainer
from scaleforge.data_pipeline.samples import document_ids
from scaleforge.models import TransformerConfig, build
from scaleforge.models.attention import make_kernel

pytestmark = pytest.mark.cuda

FLASH = pytest.param("flash", marks=pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None
    and importlib.util.find_spec("flash_attn_interface") is None,
    reason="flash-attn is not installed"))
BACKENDS = ["sdpa", "flex", FLASH]
EOS = 0
# bf16 operands: relative errors of 1e-3 to 1e-2 against an fp32 reference.
BF16_RELATIVE = 2e-2


def attention_mask(backend: str, document_ids: torch.Tensor | None, seq_len: int,
                   device: torch.device | str, window: int | None = None) -> object:
    """The mask the kernel `backend` builds for a batch."""
    return make_kernel(backend, window).mask(document_ids, seq_len, torch.device(device),
                                             torch.float32)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, mask: object,
           window: int | None = None) -> torch.Tensor:
    """The kernel `backend`'s attention under `mask`."""
    return make_kernel(backend, window)(q, k, v, mask)


def _documents(batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    tokens = torch.randint(1, 100, (batch, seq_len), generator=generator)
    tokens[torch.rand(batch, seq_len, generator=generator) < 1 / 64] = EOS
    return document_ids(tokens, EOS).cuda()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("window", [None, 100], ids=["full", "sliding_window"])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_gives_the_fp32_reference_numbers_in_bf16(backend, documents, window):
    generator = torch.Generator().manual_seed(0)
    B, T = 2, 512
    q = torch.randn(B, 8, T, 64, generator=generator).cuda()
    k, v = (torch.randn(B, 2, T, 64, generator=generator).cuda() for _ in range(2))
    ids = _documents(B, T, generator) if documents else None
    device = torch.device("cuda")
    reference_mask = attention_mask("sdpa", ids, T, device, window)
    expected = attend(q.double(), k.double(), v.double(), "sdpa", reference_mask,
                      window).float()
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    actual = attend(q16, k16, v16, backend, attention_mask(backend, ids, T, device, window),
                    window)
    assert actual.shape == expected.shape and actual.dtype == torch.bfloat16
    assert _relative_error(actual, expected) < BF16_RELATIVE


@pytest.mark.parametrize("backend", BACKENDS)
def test_document_packed_after_others_keeps_its_logits_on_cuda(backend):
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, ffn_hidden=256,
                            vocab_size=101, max_seq_len=256, attention=backend,
                            rope_per_document=True)
    model = build(cfg, device="cuda")
    tokens = torch.randint(1, 101, (1, 256), device="cuda")
    tokens[0, [40, 99, 170]] = EOS  # the last document: positions 171 .. 255
    last = tokens[:, 171:]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        together = model(tokens, document_ids(tokens, EOS))
        alone = model(last, document_ids(last, EOS))
    assert _relative_error(together[:, 171:], alone.float()) < BF16_RELATIVE


@pytest.mark.parametrize("backend", ["flex", FLASH])
def test_backend_trains_like_sdpa_with_document_masking(tmp_path, backend):
    def losses(attention: str) -> list[float]:
        cfg = micro_config(tmp_path, "trainer.device=cuda", "trainer.precision=bf16",
                           "data.document_masking=true", f"model.attention={attention}")
        trainer = Trainer(cfg, tmp_path / attention, data=synthetic_data(cfg))
        return [trainer.train_step(trainer.train_batches)[0].item() for _ in range(3)]

    torch.testing.assert_close(torch.tensor(losses(backend)), torch.tensor(losses("sdpa")),
                               rtol=2e-2, atol=0)


def _fsdp_on_one_gpu() -> tuple[list[float], list[float]]:
    """(plain losses, FSDP losses) of three steps of a masked model on this rank's GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    mesh = init_device_mesh("cuda", (1,))
    cfg = TransformerConfig(n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, ffn_hidden=256,
                            vocab_size=101, max_seq_len=128)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 101, (4, 129), generator=generator).cuda()
    ids = document_ids(tokens[:, :-1], EOS)
    runs = []
    for sharded in (False, True):
        model = build(cfg, device="cuda", seed=3)
        if sharded:
            for block in model.layers.values():
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(3):
            logits = model(tokens[:, :-1], ids)
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append(losses)
    return runs[0], runs[1]


def test_fsdp_over_nccl_at_world_size_one_trains_like_the_plain_model():
    plain, sharded = run_distributed_test(_fsdp_on_one_gpu, world_size=1, backend="nccl")[0]
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(plain), rtol=1e-4, atol=0)
