"""The deepseek_v3 family (DeepSeek-V2 / V3, Liu et al. 2024, arXiv 2412.19437): the llama
block with multi-head latent attention (models/deepseek_v3/attention.py: K and V through a
compressed latent, decoupled RoPE on a shared key part) and DeepSeekMoE feed-forwards
(models/moe.py: shared experts, sigmoid routing, aux-loss-free balancing).

The spec is `models/deepseek_v3/spec.py`'s SPEC (registered in models/families.py); its
settings are `model.mla.*` (`LatentAttentionConfig`, models/deepseek_v3/config.py).
"""
