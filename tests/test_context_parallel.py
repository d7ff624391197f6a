"""Context parallelism's pieces: the head-and-tail split, the cut of a batch, and the K/V
all-gather whose backward reduce-scatters. The training runs under cp (cp2, cp2 x tp2,
cp2 x dp_shard2, cp2 x HSDP, cp2 x pp2, with documents) are in test_parallel_layouts.py, the cp2
checkpoint resumed in one process in test_checkpoint_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed_test
from scaleforge.data_pipeline.batch import Batch, step_batch
from scaleforge.errors import ConfigError
from scaleforge.models.attention import SdpaKernel
from scaleforge.models.config import TransformerConfig
from scaleforge.models.sequence_shard import head_tail_chunks
from scaleforge.parallel.allgather_attention import AllGatherKernel
from scaleforge.parallel.context_parallel import check_cp_impl
from scaleforge.parallel.sequence_collectives import gather_sequence
from scaleforge.parallel.topology import ParallelDims


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_head_and_tail_chunks_cover_every_position_once_with_equal_causal_work(size):
    seq_len = 8 * size
    positions = [[p for chunk in head_tail_chunks(seq_len, rank, size)
                  for p in range(chunk.start, chunk.stop)] for rank in range(size)]
    assert sorted(sum(positions, [])) == list(range(seq_len))
    # Causal work of a query at position p: p + 1 keys. Every rank gets the same amount.
    assert len({sum(p + 1 for p in rank_positions) for rank_positions in positions}) == 1


def test_rank_holds_chunk_r_and_its_mirror():
    assert head_tail_chunks(16, 0, 2) == (slice(0, 4), slice(12, 16))
    assert head_tail_chunks(16, 1, 2) == (slice(4, 8), slice(8, 12))
    with pytest.raises(ValueError, match="2 x 2 equal chunks"):
        head_tail_chunks(18, 0, 2)


def test_step_batch_keeps_this_ranks_chunks_of_inputs_and_targets_and_whole_document_ids():
    inputs = torch.arange(16).view(2, 8)
    targets, documents = inputs + 100, inputs // 3
    columns = head_tail_chunks(8, 1, 2)  # positions 2, 3, 4, 5
    kept = step_batch(Batch(inputs, targets, documents), True, columns=columns)
    kept_inputs, kept_targets, kept_documents = kept.inputs, kept.targets, kept.document_ids
    assert kept_inputs.tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert torch.equal(kept_targets, kept_inputs + 100)
    assert kept_documents is documents


def test_plain_causal_attention_has_no_mask_and_puts_the_keys_in_sequence_order():
    kernel = AllGatherKernel(SdpaKernel(), rank=0, size=2, gather=lambda part: part)
    plan = kernel.mask(None, 4, torch.device("cpu"), torch.float32)
    assert plan.mask is None
    # Rank 0 holds positions 0, 1 and 6, 7; the keys arrive as rank 0's then rank 1's:
    # positions 0, 1, 6, 7, 2, 3, 4, 5.
    keys = torch.tensor([0, 1, 6, 7, 2, 3, 4, 5])
    assert plan.key_order is not None and keys[plan.key_order].tolist() == list(range(8))
    assert plan.query_starts == (0, 6)


def test_mask_is_causal_by_global_position_within_documents_and_the_window():
    kernel = AllGatherKernel(SdpaKernel(), rank=0, size=2, gather=lambda part: part)
    keys, queries = [0, 1, 6, 7, 2, 3, 4, 5], (0, 1, 6, 7)  # as above
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    masked = kernel.mask(documents, 4, torch.device("cpu"), torch.float32).mask
    assert masked is not None
    assert (masked[0, 0] == 0).tolist() == [
        [key <= query and bool(documents[0, key] == documents[0, query]) for key in keys]
        for query in queries]
    windowed = AllGatherKernel(SdpaKernel(window=3), rank=0, size=2, gather=lambda part: part
                               ).mask(None, 4, torch.device("cpu"), torch.float32).mask
    assert windowed is not None
    assert (windowed[0, 0] == 0).tolist() == [[0 <= query - key < 3 for key in keys]
                                              for query in queries]


def _gather_forward_and_backward() -> tuple[torch.Tensor, torch.Tensor]:
    rank = dist.get_rank()
    local = torch.full((1, 2, 3, 4), float(rank + 1), requires_grad=True)  # (B, heads, T/N, hd)
    gathered = gather_sequence(local, dist.group.WORLD)
    # Each position's gradient is its global index + 1 on this rank, times (rank + 1).
    weights = torch.arange(1, 7, dtype=torch.float32).view(1, 1, 6, 1) * (rank + 1)
    (gathered * weights).sum().backward()
    assert local.grad is not None
    return gathered.detach(), local.grad


def test_gather_concatenates_ranks_in_order_and_backward_sums_each_parts_gradient():
    (gathered0, grad0), (gathered1, grad1) = run_distributed_test(_gather_forward_and_backward)
    assert torch.equal(gathered0, gathered1)
    assert gathered0[0, 0, :, 0].tolist() == [1, 1, 1, 2, 2, 2]
    # The gradient of each rank's part: the sum over both ranks (weights x1 and x2).
    assert grad0[0, 0, :, 0].tolist() == [3 * 1, 3 * 2, 3 * 3]
    assert grad1[0, 0, :, 0].tolist() == [3 * 4, 3 * 5, 3 * 6]


@pytest.mark.parametrize(("document_masking", "window", "named"), [
    (True, None, "data.document_masking=true"), (False, 8, "model.sliding_window=8")])
def test_torch_cp_impl_refuses_a_mask_on_cuda(document_masking, window, named):
    dims = ParallelDims(tp=1, pp=1, dp_replicate=1, dp_shard=1, cp=2)
    model = TransformerConfig(sliding_window=window)
    check_cp_impl("torch", dims, TransformerConfig(), False, "cuda")  # plain causal: runs
    check_cp_impl("allgather", dims, model, document_masking, "cpu")
    with pytest.raises(ConfigError, match=f"parallel.cp_impl=torch with {named}"):
        check_cp_impl("torch", dims, model, document_masking, "cuda")


def _torch_cp_on_cpu() -> str:
    from torch.distributed.device_mesh import init_device_mesh

    from scaleforge.parallel.torch_cp_attention import torch_ring_attention

    ring = torch_ring_attention(init_device_mesh("cpu", (1,), mesh_dim_names=("cp",)))
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(NotImplementedError) as info:
        ring(q, k, v)
    return str(info.value)


def test_torch_cp_impl_has_no_cpu_kernel_which_is_why_it_is_refused_on_cpu():
    # When torch gains one, this fails: then parallel.cp_impl=torch may run on CPU too.
    (message,) = run_distributed_test(_torch_cp_on_cpu, world_size=1)
    assert "_scaled_dot_product_flash_attention_for_cpu" in message
