"""The llama family: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases; with the
options of its descendants (scaled RoPE: Llama 3.1; q/k/v biases: Qwen 2.5; per-head q/k
RMSNorm and a free head width: Qwen 3; sliding windows: Mistral) and Mixture-of-Experts
blocks (models/moe.py: Mixtral, DeepSeekMoE).

The spec is `models/llama/spec.py`'s SPEC (registered in models/families.py).
"""
