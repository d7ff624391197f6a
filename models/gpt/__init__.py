"""The gpt family (GPT-2): LayerNorm with biases, learned positions, GELU MLP, biases on
every projection, multi-head attention.

The spec is `models/gpt/spec.py`'s SPEC (registered in models/families.py).
"""
