"""torchtitan's Llama 3 as a timing baseline, driven directly as its trainer drives one GPU
(its trainer's configs name tokenizer and dataset assets that a bench machine does not have).

Pinned to torchtitan 0.2.2: the newest release that imports on the GPU machines' torch 2.11
(0.3.0 imports `DataParallelMeshDims` from torch.distributed.fsdp, which 2.11 lacks).

`torchtitan_step(model_cfg, batch, attention, compile_blocks, device)` builds torchtitan's
Transformer at the shape of our `model_cfg` (`model_args`: same width, depth, heads, kv
heads, SwiGLU width, vocabulary, RoPE theta, norm eps; the output projection tied to the
embedding as ours, so the parameter count is the same) on the meta device, applies
torchtitan's own `parallelize_llama` at world size 1 (which, like its trainer on one GPU,
compiles each block when asked and applies no FSDP), materialises it with torchtitan's
initialisation and returns a training step over one fixed batch as torchtitan's trainer runs
it on one device: forward under bf16 autocast (its `maybe_enable_amp` without FSDP), fp32
cross-entropy (compiled with the model, torchtitan's default compile components), backward,
global-norm clipping, fused AdamW. `attention` "sdpa" is torchtitan's SDPA with a causal
mask (what we compare at equal kernels); "flex" its flex attention (its best on CUDA; flex
has no CPU backward).

torchtitan's package `torchtitan.models.llama3` imports its dataset and tokenizer stack
(datasets, pyarrow, pandas: far over what can travel to the GPU machine), so only the modules
the model needs are imported (`import_torchtitan`); torch's CPU wheel has no triton, which
`import torchtitan` needs for its MoE kernels (not run by Llama 3): on such a machine a
stand-in is present during that import only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scaleforge.models.config import TransformerConfig

TORCHTITAN_VERSION = "0.2.2"
# torchtitan's attention for our model.attention names compared at equal kernels.
ATTENTION = {"sdpa": ("sdpa", "causal"), "flex": ("flex", "causal")}


@contextlib.contextmanager
def _triton_stand_in() -> Iterator[None]:
    """Where triton is not installed (torch's CPU wheel): a stand-in module for the duration
    (torchtitan's MoE kernels decorate functions with triton.jit at import), removed after
    so that torch still finds no triton."""
    if importlib.util.find_spec("triton") is not None:
        yield
        return
    # torch.compile's machinery (imported by torchtitan at import time) decides first, with
    # no triton anywhere, that it has none.
    torch.compile(lambda x: x)
    triton = types.ModuleType("triton")
    language = types.ModuleType("triton.language")
    triton.jit = lambda function=None, **_: function if function else (lambda f: f)  # type: ignore[attr-defined]
    triton.autotune = lambda *_, **__: (lambda f: f)  # type: ignore[attr-defined]
    triton.Config = lambda *_, **__: None  # type: ignore[attr-defined]
    triton.cdiv = lambda a, b: -(-a // b)  # type: ignore[attr-defined]
    language.constexpr = int  # type: ignore[attr-defined]
    triton.language = language  # type: ignore[attr-defined]
    sys.modules["triton"], sys.modules["triton.language"] = triton, language
    try:
        yield
    finally:
        del sys.modules["triton"], sys.modules["triton.language"]


def import_torchtitan() -> types.SimpleNamespace:
    """torchtitan's Llama 3 args, model and parallelize modules, its ParallelDims and
    JobConfig, without the package `torchtitan.models.llama3` itself (see the module doc);
    `protocols.train_spec`, which model.py imports for `ModelProtocol` alone (re-exported
    from protocols.model) but which imports the data stack, is given that class alone."""
    name = "torchtitan.models.llama3"
    with _triton_stand_in():
        models = importlib.util.find_spec("torchtitan.models")
        if models is None or models.submodule_search_locations is None:
            raise ImportError("torchtitan is not installed")
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(Path(list(models.submodule_search_locations)[0]) / "llama3")]
            sys.modules[name] = package
        protocol = importlib.import_module("torchtitan.protocols.model")
        if "torchtitan.protocols.train_spec" not in sys.modules:
            train_spec = types.ModuleType("torchtitan.protocols.train_spec")
            train_spec.ModelProtocol = protocol.ModelProtocol  # type: ignore[attr-defined]
            sys.modules[train_spec.__name__] = train_spec
        config = importlib.import_module("torchtitan.config")
        return types.SimpleNamespace(
            args=importlib.import_module(f"{name}.model.args"),
            model=importlib.import_module(f"{name}.model.model"),
            parallelize=importlib.import_module(f"{name}.infra.parallelize"),
            ParallelDims=importlib.import_module("torchtitan.distributed").ParallelDims,
            JobConfig=config.JobConfig,
        )


def model_args(titan: types.SimpleNamespace, cfg: TransformerConfig, seq_len: int,
               attention: str) -> Any:
    """torchtitan's TransformerModelArgs at `cfg`'s shape. Its SwiGLU width is
    multiple_of x ceil(int(8 d / 3) / multiple_of) (no ffn_dim_multiplier): with multiple_of
    = our ffn_hidden that is ffn_hidden whenever int(8 d / 3) <= ffn_hidden (Llama 3's)."""
    if int(8 * cfg.d_model / 3) > cfg.mlp_hidden:
        raise ValueError(f"torchtitan's SwiGLU cannot be {cfg.mlp_hidden} wide at d_model "
                         f"{cfg.d_model} without ffn_dim_multiplier")
    attn_type, mask = ATTENTION[attention]
    return titan.args.TransformerModelArgs(
        dim=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size, multiple_of=cfg.mlp_hidden,
        ffn_dim_multiplier=None, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        max_seq_len=seq_len, attn_type=attn_type, attn_mask_type=mask)


def build_torchtitan_model(cfg: TransformerConfig, seq_len: int, attention: str,
                           compile_blocks: bool, device: torch.device,
                           fp8: str = "none") -> torch.nn.Module:
    """torchtitan's model parallelised by its `parallelize_llama` at world size 1 and
    initialised on `device`, its output projection tied to its embedding. `fp8`
    ("tensorwise" or "rowwise") converts its linears with torchtitan's own float8 converter
    (`quantize.linear.float8`, torchao's recipe of that name) before parallelising, as its
    trainer does, the output projection left out (filter_fqns), as ours."""
    titan = import_torchtitan()
    args = model_args(titan, cfg, seq_len, attention)
    with torch.device("meta"):
        model = titan.model.Transformer(args)
    job = titan.JobConfig()
    dims = titan.ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1,
                              world_size=1)
    if fp8 != "none":
        with _triton_stand_in():
            converter = importlib.import_module("torchtitan.components.quantization.float8")
        job.compile.enable = compile_blocks
        job.compile.components = ["model", "loss"]
        job.quantize.linear.float8.recipe_name = fp8
        job.quantize.linear.float8.filter_fqns = ["output"]
        converter.Float8LinearConverter(job, dims).convert(model)
    job.training.seq_len = seq_len
    job.compile.enable = compile_blocks
    job.compile.components = ["model", "loss"]
    job.activation_checkpoint.mode = "none"
    job.job.dump_folder = tempfile.mkdtemp(prefix="torchtitan-")
    titan.parallelize.parallelize_llama(model, dims, job)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.train()
    return model


def torchtitan_step(cfg: TransformerConfig, batch: tuple[torch.Tensor, torch.Tensor],
                    attention: str, compile_blocks: bool, device: torch.device,
                    lr: float = 3e-4, grad_clip: float = 1.0,
                    fp8: str = "none") -> Callable[[], None]:
    """One torchtitan training step on `batch` (inputs, targets), each (B, T) on `device`;
    `fp8` as `build_torchtitan_model`'s."""
    inputs, targets = batch
    model: Any = build_torchtitan_model(cfg, inputs.size(1), attention, compile_blocks, device,
                                        fp8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=True)
    masks = (model.get_attention_masks(inputs, tokenizer=None) if attention == "flex"
             else None)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))

    loss_fn = torch.compile(loss_fn) if compile_blocks else loss_fn

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(inputs, attention_masks=masks)
        loss_fn(logits, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def parameter_count(cfg: TransformerConfig, seq_len: int) -> int:
    """torchtitan's parameter count at `cfg`'s shape (built on meta, output tied)."""
    titan = import_torchtitan()
    with torch.device("meta"):
        model = titan.model.Transformer(model_args(titan, cfg, seq_len, "sdpa"))
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return sum(p.numel() for p in model.parameters())
