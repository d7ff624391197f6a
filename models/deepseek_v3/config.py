"""`model.mla.*`: the shape of multi-head latent attention (the deepseek_v3 family)."""

from __future__ import annotations

from dataclasses import dataclass

from scaleforge.errors import ConfigError


@dataclass
class LatentAttentionConfig:
    """Multi-head latent attention's widths (DeepSeek-V3's defaults).

    Each head's query and key are a part without position (`qk_nope_head_dim`) and a RoPE
    part (`qk_rope_head_dim`); keys' no-position part and values come from a latent of
    `kv_lora_rank` channels shared by all heads, the keys' RoPE part is one head shared by
    all; queries come from a latent of `q_lora_rank` channels (0: straight from the input,
    as DeepSeek-V2-Lite). Read by the deepseek_v3 family only.
    """

    q_lora_rank: int = 1536  # query latent width; 0: no query compression
    kv_lora_rank: int = 512  # key/value latent width
    qk_nope_head_dim: int = 128  # a head's query/key channels without RoPE
    qk_rope_head_dim: int = 64  # a head's query/key channels with RoPE (the key's shared)
    v_head_dim: int = 128  # a head's value channels

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def check(self, prefix: str = "model.mla") -> None:
        """Raise ConfigError naming the first bad `prefix.field`."""
        if self.q_lora_rank < 0:
            raise ConfigError(f"{prefix}.q_lora_rank={self.q_lora_rank} must be >= 0 "
                              "(0: queries without a latent)")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be positive")
        if self.v_head_dim > self.qk_head_dim:
            raise ConfigError(
                f"{prefix}.v_head_dim={self.v_head_dim} must not exceed qk_nope_head_dim + "
                f"qk_rope_head_dim = {self.qk_head_dim} (values are padded to the query width "
                "for the attention kernel)"
            )
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{prefix}.qk_rope_head_dim={self.qk_rope_head_dim} must be "
                              "even (RoPE rotates pairs of channels)")
