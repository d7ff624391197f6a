"""The chunked cross-entropy (models/loss.py): its loss and gradient against F.cross_entropy
on an fp32 copy of the logits, plain and vocabulary-parallel (tp 2), and the memory it holds
(measured with torch's MemTracker, which counts the bytes of live tensor storages, so the
figures are exact and the same on every machine; through torch_compat.mem_tracker, which
leaves out the fake tensors torch 2.11's DTensor makes on first use of an op)."""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from distributed import run_distributed_test
from micro_runs import micro_config, synthetic_data
from scaleforge.core.trainer import Trainer
from scaleforge.models.loss import IGNORE_INDEX, cross_entropy
from scaleforge.torch_compat import mem_tracker

# Not a power of two, so scaling the gradient by it is not exact in bf16.
GRAD_SCALE = 1 / 3


def _logits_and_targets(dtype: torch.dtype, tokens: int = 46, vocab: int = 50,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (2, tokens / 2, vocab) of a few units' spread and targets with 5 ignored."""
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, tokens // 2, vocab, generator=generator)).to(dtype)
    targets = torch.randint(vocab, (2, tokens // 2), generator=generator)
    targets[0, :3] = IGNORE_INDEX
    targets[1, -2:] = IGNORE_INDEX
    return logits, targets


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient of GRAD_SCALE x loss) of F.cross_entropy on an fp32 copy."""
    leaf = logits.clone().requires_grad_()
    loss = F.cross_entropy(leaf.float().flatten(0, 1), targets.flatten())
    (loss * GRAD_SCALE).backward()
    return loss.detach(), leaf.grad


def _chunked(logits: torch.Tensor, targets: torch.Tensor,
             chunk_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient of GRAD_SCALE x loss) of `cross_entropy` on logits that, as the
    model's, are not a leaf (the loss writes the gradient over them)."""
    leaf = logits.clone().requires_grad_()
    loss = cross_entropy(leaf.clone(), targets, chunk_tokens)
    (loss * GRAD_SCALE).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("chunk_tokens", [None, 5, 1])
def test_fp32_loss_and_gradient_match_f_cross_entropy(chunk_tokens):
    logits, targets = _logits_and_targets(torch.float32)
    loss, grad = _chunked(logits, targets, chunk_tokens)
    expected_loss, expected_grad = _reference(logits, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
    # Ignored tokens get no gradient; the others' rows sum to zero (softmax - onehot).
    assert not grad[0, :3].any() and not grad[1, -2:].any()
    torch.testing.assert_close(grad.sum(-1), torch.zeros(grad.shape[:2]), rtol=0, atol=1e-8)


def test_bf16_loss_and_gradient_match_the_upcast_reference():
    """Both compute in fp32 from the same bf16 logits and round the gradient to bf16 once."""
    logits, targets = _logits_and_targets(torch.bfloat16)
    loss, grad = _chunked(logits, targets, chunk_tokens=5)
    expected_loss, expected_grad = _reference(logits, targets)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    # One bf16 rounding step (2^-8 relative) at most.
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=2**-8, atol=1e-7)


def test_loss_without_gradients_leaves_the_logits_unchanged():
    logits, targets = _logits_and_targets(torch.float32)
    kept = logits.clone()
    with torch.no_grad():
        loss = cross_entropy(logits, targets, chunk_tokens=5)
    assert torch.equal(logits, kept)
    torch.testing.assert_close(loss, _reference(logits, targets)[0], rtol=1e-6, atol=0)


# Memory: one micro-batch's LM head (hidden states @ head weight) and loss, forward and
# backward, in bf16, with 64 tokens per chunk: the logits are 8 MiB, one chunk in fp32 2 MiB;
# under tp 2 each rank holds half the vocabulary, so half of both.
TOKENS, WIDTH, VOCAB, CHUNK_TOKENS = 512, 32, 8192, 64


def _upcast_loss_backward(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """The loss before the chunked one, and its backward: F.cross_entropy on an fp32 copy
    (vocabulary-parallel under `loss_parallel` for DTensor logits)."""
    with loss_parallel() if isinstance(logits, DTensor) else contextlib.nullcontext():
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()


def _chunked_loss_backward(logits: torch.Tensor, targets: torch.Tensor) -> None:
    cross_entropy(logits, targets, CHUNK_TOKENS).backward()


def _peak_bytes(loss_backward, mesh: DeviceMesh | None = None) -> int:
    """Peak bytes of live tensors during the head's forward, then `loss_backward` (the loss
    and backward through it and the head), beyond the head's inputs; with `mesh`, the head
    is sharded on the vocabulary over it."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, TOKENS, WIDTH, generator=generator, dtype=torch.bfloat16)
    head = torch.randn(VOCAB, WIDTH, generator=generator, dtype=torch.bfloat16)
    targets = torch.randint(VOCAB, (1, TOKENS), generator=generator)
    if mesh is not None:
        hidden = distribute_tensor(hidden, mesh, [Replicate()])
        head = distribute_tensor(head, mesh, [Shard(0)])
    hidden.requires_grad_()
    head.requires_grad_()
    tracker = mem_tracker()
    with tracker:
        loss_backward(hidden @ head.T, targets)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def _check_peaks(chunked_peak: int, upcast_peak: int, tp: int) -> None:
    """The chunked loss holds this rank's logits, one fp32 chunk of them and the head's
    gradients; the upcast one more than its logits twice over on top (an fp32 copy)."""
    logits_bytes = TOKENS * VOCAB // tp * 2
    chunk_bytes = CHUNK_TOKENS * VOCAB // tp * 4
    head_grads = (TOKENS + VOCAB // tp) * WIDTH * 2
    slack = 16 * TOKENS * 8  # a few fp32 and int64 vectors of one value per token
    bound = logits_bytes + chunk_bytes + head_grads + slack
    print(f"tp {tp}: peak of head + loss: chunked {chunked_peak / 2**20:.2f} MiB, upcast "
          f"{upcast_peak / 2**20:.2f} MiB; logits {logits_bytes / 2**20:.0f} MiB, bound "
          f"{bound / 2**20:.2f} MiB")
    assert chunked_peak <= bound
    assert upcast_peak > bound + 2 * logits_bytes


def test_loss_holds_the_logits_and_one_fp32_chunk_not_an_fp32_copy():
    _check_peaks(_peak_bytes(_chunked_loss_backward), _peak_bytes(_upcast_loss_backward), tp=1)


def _check_vocabulary_parallel_memory() -> None:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    _check_peaks(_peak_bytes(_chunked_loss_backward, mesh),
                 _peak_bytes(_upcast_loss_backward, mesh), tp=2)


def test_vocabulary_parallel_loss_holds_its_shard_and_one_fp32_chunk():
    run_distributed_test(_check_vocabulary_parallel_memory, world_size=2)


def _check_vocabulary_parallel(chunk_tokens: int) -> None:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    logits, targets = _logits_and_targets(torch.float32, vocab=64)
    expected_loss, expected_grad = _reference(logits, targets)
    leaf = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_()
    loss = cross_entropy(leaf.clone(), targets, chunk_tokens)
    (loss * GRAD_SCALE).backward()
    assert not isinstance(loss, DTensor)
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-6, atol=0)
    assert isinstance(leaf.grad, DTensor) and leaf.grad.placements == (Shard(2),)
    assert leaf.grad.to_local().shape == (2, 23, 32)
    torch.testing.assert_close(leaf.grad.full_tensor(), expected_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk_tokens", [None, 5])
def test_vocabulary_parallel_loss_and_gradient_match_on_two_ranks(chunk_tokens):
    """Logits sharded on the vocabulary over 2 ranks (as tensor parallelism's LM head makes
    them), some targets in each shard and some ignored."""
    run_distributed_test(_check_vocabulary_parallel, world_size=2, func_args=(chunk_tokens,))


def test_trainer_keeps_no_reference_to_the_logits_during_backward(tmp_path):
    """The loss is the logits' last holder: when backward reaches the head, nothing but the
    autograd graph (already done with them) may keep them, or they would live on into the
    next micro-batch's forward."""
    cfg = micro_config(tmp_path, "trainer.micro_batch_size=2")  # 4 micro-batches per step
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    alive_at_head_backward = []

    def watch(module, args, logits):
        logits_ref = weakref.ref(logits)
        args[0].register_hook(lambda grad: alive_at_head_backward.append(logits_ref() is not None))

    trainer.model_parts[0].output.register_forward_hook(watch)
    trainer.train_step(trainer.train_batches)
    assert alive_at_head_backward == [False] * trainer.micro_batches
