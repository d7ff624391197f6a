"""Decoder-only transformer: one pre-norm skeleton, the parts its family's spec builds.

The parts every family composes are here; each family (models/<family>/, registered in
models/families.py) picks its norm, attention and MLP and says whether it has learned
positions or RoPE (models/family.py). The two first families:
llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, no biases; and the
       options of its descendants: scaled RoPE (Llama 3.1), q/k/v biases (Qwen 2.5), per-head
       q/k RMSNorm and a free head width (Qwen 3), sliding-window attention (Mistral).
gpt:   LayerNorm, learned positions, GELU MLP, biases (GPT-2).

Both are pre-norm: h = h + attention(norm(h)); h = h + feed_forward(norm(h)).
Attention runs the kernel object `cfg.attention` names (models/attention/), one per attention
module (`Attention.kernel`); given document ids, no token attends to another document of its
packed row.
Module names are a contract: the tensor-parallel plan, the pipeline splitter and the
Hugging Face conversion address weights as `layers.<i>.attention.wq` and so on.
`model.kernels` (models/kernels.py) picks PyTorch code or the fused csrc/ operators for
RMSNorm, RoPE and SwiGLU's gate; the weights and their names are the same either way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from scaleforge.models.attention import AttentionKernel, document_positions, make_kernel, masks_for
from scaleforge.models.config import TransformerConfig
from scaleforge.models.family import family_spec
from scaleforge.models.kernels import (
    fused_linear_cross_entropy,
    fused_rms_norm,
    fused_rope,
    fused_swiglu,
    load_fused,
    uses_fused,
)
from scaleforge.models.loss import cross_entropy
from scaleforge.models.moe import MoE, expert_hidden
from scaleforge.models.mup import output_multiplier, query_scale
from scaleforge.models.rope import apply_rope, rope_tables

# Output projections that write into the residual stream; their init is scaled down by
# sqrt(2 * n_layers) so the residual variance does not grow with depth (GPT-2).
RESIDUAL_PROJECTIONS = ("attention.wo", "feed_forward.w2", "feed_forward.shared.w2")


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float, kernels: str = "torch"):
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_fused(self.kernels, x.device.type):
            return fused_rms_norm(x, self.weight, self.eps)
        # Statistics in fp32 as in Llama's reference code: bf16 squares lose too many bits.
        # The weight multiplies after the cast back, in the input's precision, as Llama's.
        normed = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return self.weight * normed.type_as(x)


def make_norm(cfg: TransformerConfig) -> nn.Module:
    """The family's normalisation over d_model (RMSNorm for llama, LayerNorm for gpt)."""
    return family_spec(cfg.family).make_norm(cfg)


class Attention(nn.Module):
    """Causal self-attention; each of the kv heads serves n_heads / n_kv_heads query heads.

    q and k may be normalised per head before RoPE (`qk_norm`, Qwen 3); the attention may
    look back over a sliding window of keys only (`sliding_window`, Mistral). `bias` puts
    biases on all four projections (GPT-2); `qkv_bias` on q, k and v only (Qwen 2.5).
    """

    def __init__(self, cfg: TransformerConfig, bias: bool = False):
        super().__init__()
        self.head_dim = cfg.head_size
        self.kernels = cfg.kernels
        # The attention kernel (models/attention/): what it computes and the masks it takes.
        self.kernel: AttentionKernel = make_kernel(cfg.attention, cfg.sliding_window)
        qkv_bias = bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_size, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_size, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_size, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_size, cfg.d_model, bias=bias)
        # RMSNorm over each head's channels (one weight of head_size shared by all heads).
        self.q_norm = RMSNorm(cfg.head_size, cfg.norm_eps, cfg.kernels) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_size, cfg.norm_eps, cfg.kernels) if cfg.qk_norm else None
        # muP's attention multiplier (models/mup.py): 1.0 under the standard parametrization.
        self.query_scale = query_scale(cfg)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: object,
    ) -> torch.Tensor:
        """`mask`: what `self.kernel.mask` built for this batch."""
        B, T, _ = x.shape
        # Head counts are read from the projections' widths (-1), not the config: under
        # tensor parallelism each rank holds only its share of the heads.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, n_heads, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        # The fused operator takes (T, head_dim) tables, not per-document ones (B, 1, T, hd).
        if rope is not None and rope[0].dim() == 2 and uses_fused(self.kernels, q.device.type):
            q, k = fused_rope(q, k, *rope)
        elif rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.query_scale != 1.0:  # muP: scores sqrt(base_head_dim) q.k / head_dim
            q = q * self.query_scale
        # kv heads grouped inside the kernel, without copies of K and V; mask: causal,
        # within documents when the batch has them, within the window when there is one.
        y = self.kernel(q, k, v, mask)  # (B, n_heads, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d_model)


class SwiGLU(nn.Module):
    """Llama MLP: w2(silu(w1 x) * w3 x), w1 the gate, w3 the up projection (Shazeer 2020)."""

    def __init__(self, cfg: TransformerConfig, hidden: int | None = None):
        super().__init__()
        self.kernels = cfg.kernels
        hidden = hidden or cfg.mlp_hidden
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x), self.w3(x)
        if uses_fused(self.kernels, gate.device.type):
            return self.w2(fused_swiglu(gate, up))
        return self.w2(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """GPT-2 MLP: w2(gelu(w1 x)), with GPT-2's tanh approximation of GELU."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.mlp_hidden)
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


def make_feed_forward(cfg: TransformerConfig, layer: int) -> nn.Module:
    """Layer `layer`'s MLP: the family's (SwiGLU for llama, GELU for gpt), or
    Mixture-of-Experts where model.moe makes it one (models/moe.py; shared experts as one
    wider SwiGLU)."""
    if cfg.moe.is_moe_layer(layer):
        shared = cfg.moe.shared_experts * expert_hidden(cfg)
        return MoE(cfg, SwiGLU(cfg, shared) if shared else None)
    return family_spec(cfg.family).make_mlp(cfg)


class Block(nn.Module):
    """One pre-norm transformer layer."""

    def __init__(self, cfg: TransformerConfig, layer: int = 0):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = family_spec(cfg.family).make_attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = make_feed_forward(cfg, layer)

    def forward(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: object,
    ) -> torch.Tensor:
        h = h + self.attention(self.attention_norm(h), rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_kernel(block: nn.Module) -> AttentionKernel:
    """The kernel of a block's attention module (`block.attention.kernel`)."""
    kernel = getattr(block.get_submodule("attention"), "kernel", None)
    assert isinstance(kernel, AttentionKernel), "a block's attention holds its kernel"
    return kernel


class Transformer(nn.Module):
    """Token ids in, next-token logits out (`forward`); the training loss (`loss`).

    A pipeline stage keeps only its layers (`layers` is keyed "0", "1", ... so the names of
    the kept ones do not change) and sets the modules it does not own to None: without
    `tok_embeddings` (and `pos_embeddings`) the input is already hidden states (B, T, d);
    without `norm` and `output` the hidden states are returned.

    Under context parallelism parallel/ wraps each attention module's kernel and passes the
    tokens' global `positions`: the input is then this rank's chunks of each sequence and the
    document ids the whole sequences'.
    """

    # RoPE tables (max_seq_len, rope width); None for a family with learned positions.
    rope_cos: torch.Tensor | None
    rope_sin: torch.Tensor | None

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        spec = family_spec(cfg.family)
        load_fused(cfg.kernels)
        embeddings = nn.Embedding(cfg.vocab_rows, cfg.d_model)
        self.tok_embeddings: nn.Embedding | None = embeddings
        self.pos_embeddings = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if spec.learned_positions else None
        )
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: nn.Module | None = make_norm(cfg)
        output = nn.Linear(cfg.d_model, cfg.vocab_rows, bias=False)
        self.output: nn.Linear | None = output
        if cfg.tie_embeddings:
            output.weight = embeddings.weight
        # muP's readout multiplier on the head's input (models/mup.py); 1.0 under SP.
        self.output_multiplier = output_multiplier(cfg)
        # Derived from the config, so not saved in checkpoints (persistent=False).
        cos, sin = (None, None) if spec.rope_dim(cfg) is None else self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, rope_dim)
        self.register_buffer("rope_sin", sin, persistent=False)

    def check_length(self, length: int) -> None:
        """Raise ValueError when sequences of `length` tokens exceed model.max_seq_len."""
        if length > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {length} exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                "shorten the input or raise model.max_seq_len"
            )

    def _rope_tables(
        self, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        rope_dim = family_spec(cfg.family).rope_dim(cfg)
        assert rope_dim is not None, "called for a family with RoPE only"
        return rope_tables(rope_dim, cfg.max_seq_len, cfg.rope_theta, device=device,
                           scaling=cfg.rope_scaling)

    def _rope(
        self, T: int, document_ids: torch.Tensor | None, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (cos, sin) tables of positions 0 .. T-1 (or of `positions` (T,), the global
        ones of a sequence shard), each (T, head_dim); with `cfg.rope_per_document`, of each
        position within its document, (B, 1, T, head_dim) (broadcast over heads); None for
        the gpt family."""
        if self.rope_cos is None or self.rope_sin is None:
            return None
        if not self.cfg.rope_per_document:
            if positions is not None:
                return self.rope_cos[positions], self.rope_sin[positions]
            return self.rope_cos[:T], self.rope_sin[:T]
        if document_ids is None:
            raise ValueError(
                "model.rope_per_document=true needs the batch's document ids; train with "
                "data.document_masking=true or pass document_ids to the model"
            )
        within = document_positions(document_ids)  # (B, T), of the whole sequences
        within = within if positions is None else within[:, positions]
        return self.rope_cos[within][:, None], self.rope_sin[within][:, None]

    def forward(
        self,
        tokens: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab_size), T <= max_seq_len; the hidden
        states the LM head reads (B, T, d_model) instead with `head=False` or on a pipeline
        stage without `output` (a stage without `tok_embeddings` reads hidden states).

        `document_ids` (B, T) int64 (data_pipeline.samples.document_ids; under context
        parallelism (B, T x cp), of the whole sequences): which document of its row each
        position belongs to; given, no token attends to another document, and
        with `cfg.rope_per_document` the RoPE positions restart at each document.

        `positions` (T,) int64: the tokens' positions in their sequences, 0 .. T-1 when not
        given (context parallelism gives this rank's chunks' global ones; the caller then
        checks the whole length, `check_length`).
        """
        h = tokens if self.tok_embeddings is None else self.tok_embeddings(tokens)  # (B, T, d)
        T = h.size(1)
        if positions is None:
            self.check_length(T)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(torch.arange(T, device=h.device) if positions is None
                                        else positions)
        rope = self._rope(T, document_ids, positions)
        layers = list(self.layers.values())
        # Each kernel's mask, built once per forward (once for all kernels that share it).
        masks = masks_for([attention_kernel(layer) for layer in layers], document_ids, T,
                          h.device, h.dtype)
        for layer, mask in zip(layers, masks, strict=True):
            h = layer(h, rope, mask)
        if self.norm is not None:
            h = self.norm(h)
        return h if self.output is None or not head else self.logits(h)  # (B, T, vocab_size)

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the LM head multiplies: the final hidden states (B, T, d_model), times
        muP's readout multiplier when the model has one."""
        return h if self.output_multiplier == 1.0 else h * self.output_multiplier

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on the final (normed) hidden states (B, T, d_model) -> (B, T, vocab)."""
        assert self.output is not None, "a pipeline stage without the head has no logits"
        return self.output(self.head_input(h))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor,
             document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The mean next-token cross-entropy of `tokens` against `targets` (B, T) int64, a
        0-dim fp32 tensor: the training objective (a model with its head only).

        The body runs as this module's forward (`head=False`), so data and context
        parallelism's forward hooks apply as to any forward (FSDP's root keeps its weights,
        the head's included, gathered after forward). Then, with `model.kernels` picking the
        fused operators and a plain head weight, the head and the loss run as one operator
        (linear_cross_entropy), so the logits never exist; a vocabulary-parallel head
        (tensor parallelism makes its weight a DTensor) and `model.kernels=torch` go through
        models/loss.py's chunked loss on the logits (vocabulary-parallel on sharded ones),
        which reuses them as the buffer of their gradient.
        """
        if self.output is None:
            raise ValueError("this pipeline stage has no LM head; its loss is the last stage's")
        h = self.head_input(self(tokens, document_ids, head=False))  # (B, T, d_model)
        weight = self.output.weight
        if uses_fused(self.cfg.kernels, h.device.type) and not isinstance(weight, DTensor):
            return fused_linear_cross_entropy(h.flatten(0, 1), weight, targets.flatten())
        return cross_entropy(self.output(h), targets)
