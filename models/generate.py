"""Sampling from a trained Transformer with a key/value cache.

The prompt runs through the model once (prefill), keeping each layer's keys and values;
every new token then runs alone, attending to the cached keys and values, so a step costs
one token's work instead of the whole sequence's. The modules are the model's own
(projections, norms and per-head q/k norms, MLPs, RoPE tables); only the attention is
evaluated here, against the cache, with the model's sliding window. Greedy decoding with
the cache gives the tokens that full forwards give, and its logits theirs
(tests/test_generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaleforge.models.rope import apply_rope
from scaleforge.models.transformer import Attention, Block, Transformer


@dataclass
class Sampling:
    """How the next token is drawn: temperature 0 is greedy (argmax); `top_k` keeps only
    the k most likely tokens (None: all); only ids below `vocab_size` are drawn (None: every
    id of the model; a model may be wider than its tokenizer)."""

    temperature: float = 1.0
    top_k: int | None = None
    vocab_size: int | None = None


class KVCache:
    """Each layer's keys and values so far, (B, n_kv_heads, T, head_dim)."""

    def __init__(self) -> None:
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def extend(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append this step's k, v for `layer`; return all of its keys and values."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def _attention(attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, ...] | None,
               cache: KVCache, layer: str) -> torch.Tensor:
    """Attention of the new positions x (B, T, d) to the cached ones and to each other."""
    B, T, _ = x.shape
    q = attn.wq(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
    k = attn.wk(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
    v = attn.wv(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
    if attn.q_norm is not None and attn.k_norm is not None:  # per head, before RoPE (Qwen 3)
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = q * attn.query_scale  # muP's attention multiplier; 1.0 under SP
    past = cache.keys[layer].size(2) if layer in cache.keys else 0
    k, v = cache.extend(layer, k, v)
    # Position past + i sees the cache and the new positions up to itself, within the
    # sliding window when the model has one.
    distance = (torch.arange(past, past + T, device=x.device)[:, None]
                - torch.arange(past + T, device=x.device)[None])
    mask = (distance >= 0) & (distance < (attn.kernel.window or past + T))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                       enable_gqa=q.size(1) != k.size(1))
    return attn.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d_model)


def _forward_cached(model: Transformer, tokens: torch.Tensor, cache: KVCache,
                    start: int) -> torch.Tensor:
    """Logits (B, T, vocab_size) of `tokens` (B, T) at positions start .. start+T-1."""
    assert model.tok_embeddings is not None and model.norm is not None
    assert model.output is not None
    T = tokens.size(1)
    h = model.tok_embeddings(tokens)
    if model.pos_embeddings is not None:
        h = h + model.pos_embeddings(torch.arange(start, start + T, device=h.device))
    rope = None
    if model.rope_cos is not None and model.rope_sin is not None:
        rope = (model.rope_cos[start:start + T], model.rope_sin[start:start + T])
    for name, block in model.layers.items():
        assert isinstance(block, Block)
        if not isinstance(block.attention, Attention):
            raise ValueError(
                f"generation with a KV cache runs grouped-query attention only; the "
                f"{model.cfg.family} family's {type(block.attention).__name__} has no cache"
            )
        h = h + _attention(block.attention, block.attention_norm(h), rope, cache, name)
        h = h + block.feed_forward(block.ffn_norm(h))
    return model.logits(model.norm(h))


def _next_token(logits: torch.Tensor, sampling: Sampling,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row from the last position's logits (B, vocab_size) -> (B, 1)."""
    logits = logits[:, :sampling.vocab_size]
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.size(-1):
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
             sampling: Sampling, generator: torch.Generator | None = None,
             stop_id: int | None = None) -> torch.Tensor:
    """`prompt` (B, T) int64 followed by up to `max_new_tokens` sampled tokens, (B, T + n).
    Stops early when every row has produced `stop_id`. T + max_new_tokens must not exceed
    model.max_seq_len (the positions the model was built for)."""
    total = prompt.size(1) + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt.size(1)} tokens) + max_new_tokens={max_new_tokens} exceeds "
            f"model.max_seq_len={model.cfg.max_seq_len}; shorten the prompt or lower "
            "max_new_tokens"
        )
    model.eval()
    cache = KVCache()
    logits = _forward_cached(model, prompt, cache, 0)
    tokens, position = prompt, prompt.size(1)
    done = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        token = _next_token(logits[:, -1], sampling, generator)  # (B, 1)
        tokens = torch.cat([tokens, token], dim=1)
        if stop_id is not None:
            done |= token[:, 0] == stop_id
            if bool(done.all()):
                break
        logits = _forward_cached(model, token, cache, position)
        position += 1
    return tokens
