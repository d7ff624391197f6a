"""The registry of model families: one line per family folder (models/family.py says
what a family hands the rest)."""

from scaleforge.models.deepseek_v3.spec import SPEC as DEEPSEEK_V3
from scaleforge.models.family import register
from scaleforge.models.gpt.spec import SPEC as GPT
from scaleforge.models.llama.spec import SPEC as LLAMA

register(LLAMA)
register(GPT)
register(DEEPSEEK_V3)
