"""The scaleforge operators (csrc/) against the PyTorch code they replace: forward and
gradients in fp32 (tight) and bf16 (loose), odd shapes, opcheck and fp64 gradcheck.

The device loop runs every comparison on the CPU and, marked `cuda`, on the GPU when there
is one. The library is imported (built, once per machine: csrc/extension.py caches it) at
the first test that uses it, not when the file is collected: a failed build fails these
tests alone (or skips them, with SCALEFORGE_KERNELS_OPTIONAL=1, as bench/gpu_check.sh runs
them), and every other test of the run still runs.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from scaleforge.errors import KernelBuildError
from scaleforge.models.rope import apply_rope, rope_tables


class LazyKernels:
    """A module of scaleforge.csrc imported at its first attribute read; a build error is
    kept and raised again (or the test skipped) without building again."""

    def __init__(self, name: str):
        self._name = name
        self._error: KernelBuildError | None = None

    def _module(self) -> ModuleType:
        if self._error is None:
            try:
                return importlib.import_module(self._name)
            except KernelBuildError as error:
                self._error = error
        if os.environ.get("SCALEFORGE_KERNELS_OPTIONAL") == "1":
            pytest.skip(f"the kernels could not be built: {self._error}")
        raise self._error

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_") or attribute == "pytestmark":  # pytest's collection asks
            raise AttributeError(attribute)
        return getattr(self._module(), attribute)


kernels = LazyKernels("scaleforge.csrc")
extension = LazyKernels("scaleforge.csrc.extension")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# (rtol, atol) per dtype: fp32 as tight as a different summation order allows; bf16 within
# a few of its 8-bit-mantissa roundings (the fused kernels round once where torch rounds
# after each op).
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2)}
EPS = 1e-5


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """models/transformer.py's RMSNorm.forward."""
    return weight * F.rms_norm(x.float(), (x.size(-1),), eps=EPS).type_as(x)


def forward_and_grads(fn, inputs: list[torch.Tensor], seed: int = 0):
    """(outputs, gradients of the inputs) for a random upstream gradient of each output."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=generator).to(o) for o in outputs]
    differentiable = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(outputs, differentiable, upstream)
    return outputs, grads


def assert_same(actual, expected, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCE[dtype]
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.float(), e.float(), rtol=rtol, atol=atol)


def randn(*shape: int, device: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 64), (3, 37), (1, 7), (0, 16)])
def test_rms_norm_matches_torch(device, dtype, shape):
    x = randn(*shape, device=device, dtype=dtype)
    weight = 1 + 0.1 * randn(shape[-1], device=device, dtype=torch.float32, seed=1)
    fused = forward_and_grads(lambda a, w: kernels.rms_norm(a, w, EPS), [x, weight])
    reference = forward_and_grads(reference_rms_norm, [x, weight])
    assert fused[0][0].dtype == reference[0][0].dtype
    assert_same(fused[0] + fused[1], reference[0] + reference[1], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_shape", "k_heads"), [((2, 4, 9, 16), 2), ((1, 1, 1, 6), 1),
                                                  ((0, 2, 3, 8), 1)])
def test_rope_matches_torch_on_queries_and_keys(device, dtype, q_shape, k_heads):
    batch, heads, T, head_dim = q_shape
    cos, sin = rope_tables(head_dim, T + 3, 10000.0, device=device)
    cos, sin = cos[:T], sin[:T]
    # Queries as the attention makes them: a transposed (B, T, H, hd) view.
    q = randn(batch, T, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    k = randn(batch, k_heads, T, head_dim, device=device, dtype=dtype, seed=1)

    def reference(q, k):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    fused = forward_and_grads(lambda q, k: kernels.rope(q, k, cos, sin), [q, k])
    expected = forward_and_grads(reference, [q, k])
    assert_same(fused[0] + fused[1], expected[0] + expected[1], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 40), (1, 13), (0, 5)])
def test_swiglu_matches_torch(device, dtype, shape):
    gate = randn(*shape, device=device, dtype=dtype)
    up = randn(*shape, device=device, dtype=dtype, seed=1)
    fused = forward_and_grads(kernels.swiglu, [gate, up])
    expected = forward_and_grads(lambda g, u: F.silu(g) * u, [gate, up])
    assert_same(fused[0] + fused[1], expected[0] + expected[1], dtype)


def lce_inputs(tokens: int, d: int, vocab: int, device: str, dtype: torch.dtype):
    hidden = randn(tokens, d, device=device, dtype=dtype)
    weight = randn(vocab, d, device=device, dtype=dtype, seed=1) / d**0.5
    generator = torch.Generator(device="cpu").manual_seed(2)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    targets[::5] = kernels.IGNORE_INDEX
    return hidden, weight, targets.to(device)


def unfused_loss(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "d", "vocab", "chunk_tokens"),
                         [(50, 24, 37, 7), (64, 16, 300, 0), (1, 8, 5, 0)])
def test_linear_cross_entropy_matches_unfused_loss_and_grads(device, dtype, tokens, d, vocab,
                                                             chunk_tokens):
    hidden, weight, targets = lce_inputs(tokens, d, vocab, device, dtype)
    if tokens == 1:
        targets[0] = 3  # the one token must count
    fused = forward_and_grads(
        lambda h, w, t: kernels.linear_cross_entropy(h, w, t, chunk_tokens=chunk_tokens),
        [hidden, weight, targets])
    expected = forward_and_grads(unfused_loss, [hidden, weight, targets])
    assert fused[0][0].dtype == torch.float32
    assert_same(fused[0] + fused[1], expected[0] + expected[1], dtype)


@pytest.mark.parametrize("tokens", [6, 0])
def test_linear_cross_entropy_without_a_trained_token_adds_zero_loss_and_gradient(tokens):
    """A prompt-only SFT micro-batch (every target ignored), or no tokens at all: loss 0 and
    zero gradients, as models/loss.py's unfused loss gives (F.cross_entropy gives NaN)."""
    hidden, weight, targets = lce_inputs(tokens, 8, 11, "cpu", torch.float32)
    targets[:] = kernels.IGNORE_INDEX
    loss, grads = forward_and_grads(kernels.linear_cross_entropy, [hidden, weight, targets])
    assert loss[0].item() == 0.0
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_linear_cross_entropy_chunking_does_not_change_the_result():
    hidden, weight, targets = lce_inputs(40, 16, 29, "cpu", torch.float32)
    whole = forward_and_grads(kernels.linear_cross_entropy, [hidden, weight, targets])
    chunked = forward_and_grads(
        lambda h, w, t: kernels.linear_cross_entropy(h, w, t, chunk_tokens=3),
        [hidden, weight, targets])
    assert_same(whole[0] + whole[1], chunked[0] + chunked[1], torch.float32)


def test_linear_cross_entropy_rejects_a_target_outside_the_vocabulary():
    hidden, weight, targets = lce_inputs(6, 8, 11, "cpu", torch.float32)
    targets[1] = 11
    with pytest.raises(RuntimeError, match=r"outside \[0, 11\)"):
        kernels.linear_cross_entropy(hidden, weight, targets)


def test_linear_cross_entropy_casts_to_the_autocast_dtype():
    hidden, weight, targets = lce_inputs(12, 8, 20, "cpu", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = kernels.linear_cross_entropy(hidden, weight, targets)
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


def opcheck_cases():
    """(operator, arguments) for torch.library.opcheck; the differentiable inputs require
    grad (not the rope tables, which are buffers)."""
    cos, sin = rope_tables(8, 5, 10000.0)
    hidden, weight, targets = lce_inputs(10, 8, 13, "cpu", torch.float32)

    def grad(*shape_or_tensor):
        tensor = (shape_or_tensor[0] if isinstance(shape_or_tensor[0], torch.Tensor)
                  else torch.randn(*shape_or_tensor))
        return tensor.requires_grad_()

    return [
        ("rms_norm", (grad(3, 10), grad(10), EPS)),
        ("rope", (grad(2, 3, 5, 8), grad(2, 1, 5, 8), cos, sin)),
        ("swiglu", (grad(4, 6), grad(4, 6))),
        ("linear_cross_entropy", (grad(hidden), grad(weight), targets, kernels.IGNORE_INDEX, 4)),
    ]


@pytest.mark.parametrize("name", ["rms_norm", "rope", "swiglu", "linear_cross_entropy"])
def test_opcheck(name):
    args = dict(opcheck_cases())[name]
    torch.library.opcheck(getattr(torch.ops.scaleforge, name), args)


def test_gradcheck_in_fp64():
    double = {"dtype": torch.float64}
    x, w = torch.randn(3, 6, **double), torch.randn(6, **double)
    assert torch.autograd.gradcheck(lambda a, b: kernels.rms_norm(a, b, EPS),
                                    (x.requires_grad_(), w.requires_grad_()))
    cos, sin = (t.double() for t in rope_tables(4, 3, 10000.0))
    q, k = torch.randn(1, 2, 3, 4, **double), torch.randn(1, 1, 3, 4, **double)
    assert torch.autograd.gradcheck(lambda a, b: kernels.rope(a, b, cos, sin),
                                    (q.requires_grad_(), k.requires_grad_()))
    gate, up = torch.randn(2, 5, **double), torch.randn(2, 5, **double)
    assert torch.autograd.gradcheck(kernels.swiglu, (gate.requires_grad_(), up.requires_grad_()))
    hidden, weight, targets = lce_inputs(7, 4, 9, "cpu", torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, v: kernels.linear_cross_entropy(h, v, targets, chunk_tokens=3),
        (hidden.requires_grad_(), weight.requires_grad_()))


def test_missing_ninja_is_named_in_one_line(monkeypatch):
    monkeypatch.setattr(extension.cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(KernelBuildError, match="needs ninja") as error:
        extension.check_toolchain()
    assert "\n" not in str(error.value)


def test_build_key_follows_the_sources_and_the_torch_version():
    key = extension.build_key(with_cuda=False)
    assert key.startswith(f"torch{torch.__version__.replace('+', '_')}-cpu-")
    assert key == extension.build_key(with_cuda=False)


@pytest.mark.slow
def test_linear_cross_entropy_peak_memory_is_a_fraction_of_the_unfused_loss():
    # The CPU case, N = 8192 tokens, d = 512, V = 32768 (bench/kernels.py, measured
    # in fresh subprocesses: about 144 MiB fused against 3,072 MiB unfused).
    from scaleforge.bench.kernels import peak_bytes

    fused = peak_bytes("linear_cross_entropy", "fused", "cpu", gpu_sizes=False)
    unfused = peak_bytes("linear_cross_entropy", "eager", "cpu", gpu_sizes=False)
    assert fused <= 0.35 * unfused, (fused, unfused)
