"""`sf-convert`: ScaleForge checkpoints to and from Hugging Face model directories.

    sf-convert to-hf ckpt=runs/mine out=hf/mine dtype=bf16
    sf-convert compare ckpt=runs/mine hf=hf/mine prompt='def '
    sf-convert from-hf hf=hf/mine out=ckpts/from_hf

to-hf: `ckpt` is a checkpoint directory (`RUN_DIR/checkpoints/step_<N>`) or a run directory,
whose newest complete checkpoint is converted, else its `final_model.pt` (with the run's
`config.yaml`). Writes config.json + model.safetensors, loadable with
`transformers.AutoModelForCausalLM.from_pretrained(out)`; `dtype` is fp32 (default) or bf16.
The tokenizer of the run's data is written too (tokenizer.json + tokenizer_config.json, with
its BOS/EOS/PAD tokens): `AutoTokenizer.from_pretrained(out)` encodes as training did.
config.json's `bos_token_id` and `eos_token_id` (and generation_config.json) are the EOS id:
each training document followed an EOS and ended with one, so generation starts after an
EOS (prepend it to the prompt's ids) and stops at the next. A LoRA run (model.lora) is
exported with its adapters merged into the weights; `peft=DIR` also writes them in PEFT's
format, with the unmerged base in DIR/base.

compare: our logits against transformers' for `prompt` (after the EOS that starts a
document), tokenized with the run's tokenizer: the largest absolute difference and how many
greedy next tokens agree.

from-hf: `hf` is a local Llama (3.1+ RoPE scaling included), Mistral, Qwen2 (2.5), Qwen3, Mixtral or
GPT-2 directory (config.json + safetensors; pickled .bin
files are refused). Writes a model-only checkpoint directory with fp32 weights and prints
the sf-train command that starts from it (`trainer.init_from=out` and the model settings).

Arguments are key=value. Errors print one `error:` line and exit with 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from scaleforge.errors import ConfigError, check_choice, exit_on_config_error
from scaleforge.launch.key_value import Handlers, required, run_subcommand

if TYPE_CHECKING:
    import torch

    from scaleforge.core.config import Config
    from scaleforge.models.config import TransformerConfig

# torch and the settings' modules are imported where a command needs them, so --help
# answers without them.
DTYPES = ("fp32", "bf16")


@dataclass
class ToHfSettings:
    """Settings of `to-hf`."""

    # A step_<N> checkpoint, or a run directory (its newest checkpoint, else final_model.pt).
    ckpt: str = required("DIR (a checkpoint or run directory)")
    out: str = required("DIR")  # the Hugging Face model directory to write
    dtype: str = "fp32"  # the weights' dtype: fp32 or bf16
    # A LoRA run (model.lora): also write its adapters in PEFT's format into this directory
    # (adapter_config.json, adapter_model.safetensors) and the base model, not merged, into
    # its base/ (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base),
    # DIR)); null: the merged model only.
    peft: str | None = None


@dataclass
class CompareSettings:
    """Settings of `compare`."""

    # A run or checkpoint directory (as for to-hf).
    ckpt: str = required("DIR (a checkpoint or run directory)")
    # The Hugging Face model directory to compare with (what to-hf wrote from ckpt).
    hf: str = required("DIR (a Hugging Face model directory)")
    # The text whose logits are compared, after the start-of-document token (EOS).
    prompt: str = "def "


@dataclass
class FromHfSettings:
    """Settings of `from-hf`."""

    # A local Hugging Face model directory (config.json and safetensors).
    hf: str = required("DIR (a Hugging Face model directory)")
    out: str = required("DIR")  # the model-only checkpoint directory to write


def read_training_weights(ckpt: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(training Config, model state dict) of a checkpoint directory or a run directory: its
    newest complete checkpoint, else its final_model.pt with its config.yaml."""
    import torch

    from scaleforge.core.checkpoint.paths import is_complete, latest_checkpoint
    from scaleforge.core.checkpoint.safe_load import load_checkpoint_config
    from scaleforge.core.checkpoint.weights import load_model_checkpoint

    final = ckpt / "final_model.pt"
    if is_complete(ckpt) or latest_checkpoint(ckpt) is not None or not final.is_file():
        # Raises a ConfigError naming ckpt= when there is no complete checkpoint.
        return load_model_checkpoint(ckpt)
    if not (ckpt / "config.yaml").is_file():
        raise ConfigError(f"ckpt={ckpt} has final_model.pt but no config.yaml to say its shape")
    state = torch.load(final, map_location="cpu", weights_only=True)
    return load_checkpoint_config(ckpt), state


def hf_conversion() -> ModuleType:
    """scaleforge.models.hf, or a ConfigError saying how to install `transformers`."""
    try:
        from scaleforge.models import hf
    except ImportError as error:
        raise ConfigError(
            f"sf-convert needs transformers and safetensors ({error.name} is missing): "
            "pip install -e '.[hf]'"
        ) from None
    return hf


def to_hf(settings: ToHfSettings) -> Path:
    """Convert a ScaleForge checkpoint to a Hugging Face model directory; return it."""
    import torch

    check_choice("dtype", settings.dtype, DTYPES)
    ckpt = Path(settings.ckpt)
    if not ckpt.is_dir():
        raise ConfigError(f"ckpt={ckpt} is not a directory")
    config, state = read_training_weights(ckpt)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[settings.dtype]
    model_cfg = config.model
    if settings.peft is not None and not model_cfg.lora.enabled:
        raise ConfigError(f"peft={settings.peft}: {ckpt} is not a LoRA run (model.lora.rank=0); "
                          "leave peft unset")
    if model_cfg.lora.enabled:  # LoRA adapters folded into their weights: a plain model
        from scaleforge.models.lora import LoRAConfig, merged_state_dict

        if settings.peft is not None:
            _export_peft(state, config, Path(settings.peft), dtype)
        state = merged_state_dict(state, model_cfg.lora)
        model_cfg = replace(model_cfg, lora=LoRAConfig())
        print(f"LoRA adapters (rank {config.model.lora.rank}) merged into the weights of "
              f"{config.trainer.init_from}")
    out = hf_conversion().save_hf(state, model_cfg, Path(settings.out), dtype)
    print(f"{config.model.family} model ({config.model.name}) from {ckpt} -> {out}")
    _export_tokenizer(config, out)
    return out


def _export_peft(state: dict[str, torch.Tensor], config: Config, out: Path,
                 dtype: torch.dtype) -> None:
    """A LoRA run's adapters in PEFT's format into `out`, its base model into `out/base`."""
    import json

    from safetensors.torch import save_file

    from scaleforge.models.lora import LoRAConfig, is_adapter

    hf = hf_conversion()
    lora = config.model.lora
    adapters, targets = hf.peft_adapter_state(state, config.model)
    base_cfg = replace(config.model, lora=LoRAConfig())
    base = hf.save_hf({k: v for k, v in state.items() if not is_adapter(k)}, base_cfg,
                      out / "base", dtype)
    save_file({k: v.to(dtype) for k, v in adapters.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "inference_mode": True, "base_model_name_or_path": str(base.resolve()),
    }, indent=1))
    print(f"PEFT adapter ({len(adapters) // 2} projections: {', '.join(targets)}) -> {out}; "
          f"its base model -> {base}")


def _export_tokenizer(config: Config, out: Path) -> None:
    """Write the tokenizer of the run's data beside the model (a warning when the data's
    tokenizer cannot be found, e.g. the run's corpus cache or shards are gone)."""
    from scaleforge.data_pipeline.hf_tokenizer import export_hf_tokenizer
    from scaleforge.data_pipeline.vocabulary import data_tokenizer

    try:
        tokenizer = data_tokenizer(config.data)
    except ConfigError as error:
        print(f"warning: no tokenizer written (the run's data tokenizer: {error})")
        return
    export_hf_tokenizer(tokenizer, out)
    _set_document_ids(out, tokenizer.eos_id, tokenizer.pad_id)
    print(f"tokenizer ({tokenizer.vocab_size} ids) from {tokenizer.path} -> {out}; "
          f"bos_token_id = eos_token_id = {tokenizer.eos_id} (documents start after an EOS)")
    _export_chat_template(config, out)


def _export_chat_template(config: Config, out: Path) -> None:
    """A run on conversation shards (sf-preprocess sft): their chat template into the
    exported tokenizer_config.json, so transformers' apply_chat_template renders prompts
    as training did."""
    import json

    from scaleforge.data_pipeline.conversation_shards import shards_template
    from scaleforge.data_pipeline.manifest import load_manifest

    if config.data.mode != "shards" or not config.data.path:
        return
    template = shards_template(load_manifest(Path(config.data.path)))
    if template is None:
        return
    path = out / "tokenizer_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**settings, "chat_template": template.source}, indent=1))
    print(f"chat template ({template.name}) -> {path}")


def _set_document_ids(out: Path, eos_id: int, pad_id: int | None) -> None:
    """config.json's bos/eos ids and a generation_config.json: training saw each document
    after an EOS and ending with one, so EOS both starts a sequence (`generate` without
    input ids) and stops generation."""
    import json

    path = out / "config.json"
    config = json.loads(path.read_text())
    config.update(bos_token_id=eos_id, eos_token_id=eos_id)
    path.write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": eos_id, "eos_token_id": eos_id,
                  "pad_token_id": eos_id if pad_id is None or pad_id < 0 else pad_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def compare(settings: CompareSettings) -> float:
    """Print our logits against transformers' for the prompt (the start-of-document token
    first), their largest absolute difference and how many greedy next tokens agree;
    return the difference."""
    import torch
    from transformers import AutoModelForCausalLM

    from scaleforge.data_pipeline.tokenizer import Tokenizer
    from scaleforge.data_pipeline.vocabulary import data_tokenizer
    from scaleforge.models import build

    ckpt, hf_dir = Path(settings.ckpt), Path(settings.hf)
    for key, path in (("ckpt", ckpt), ("hf", hf_dir)):
        if not path.is_dir():
            raise ConfigError(f"{key}={path} is not a directory")
    config, state = read_training_weights(ckpt)
    try:
        tokenizer = data_tokenizer(config.data)
    except ConfigError:  # the run's data is gone: the tokenizer to-hf exported
        if not (hf_dir / "tokenizer.json").is_file():
            raise
        tokenizer = Tokenizer.load(hf_dir / "tokenizer.json")
    ids = [tokenizer.eos_id, *tokenizer.encode(settings.prompt)][:config.model.max_seq_len]
    ours = build(config.model)
    ours.load_state_dict(state)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        our_logits = ours.eval()(tokens).float()
        their_logits = theirs.eval()(tokens).logits.float()[..., :our_logits.shape[-1]]
    difference = float((our_logits - their_logits).abs().max())
    agree = int((our_logits.argmax(-1) == their_logits.argmax(-1)).sum())
    print(f"compare: {ckpt} vs {hf_dir} (transformers {type(theirs).__name__}) on "
          f"{len(ids)} tokens ({settings.prompt!r} after the start-of-document token): "
          f"max abs diff of the logits {difference:.3g} (largest logit "
          f"{float(our_logits.abs().max()):.3g}); greedy next token agrees at {agree} of "
          f"{len(ids)} positions")
    return difference


def from_hf(settings: FromHfSettings) -> Path:
    """Convert a Hugging Face model directory to a model-only ScaleForge checkpoint."""
    from scaleforge.core.checkpoint.weights import save_model_checkpoint
    from scaleforge.core.config import Config

    model_cfg, state = hf_conversion().load_hf(Path(settings.hf))
    # Training keeps fp32 master weights whatever the published dtype.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    out = save_model_checkpoint(
        state, Config(model=model_cfg, run_dir=settings.out), Path(settings.out)
    )
    _import_tokenizer(Path(settings.hf), out)
    print(f"{model_cfg.family} model from {settings.hf} -> {out}; train from it (here on the "
          "built-in corpus, whose tokenizer has at most the model's ids and whose windows "
          "fit its context) with:")
    print(" ".join(["sf-train", f"trainer.init_from={out}", *model_overrides(model_cfg),
                    *smoke_data_overrides(model_cfg)]))
    return out


def smoke_data_overrides(model_cfg: TransformerConfig) -> list[str]:
    """Data settings under which the default corpus run fits `model_cfg`: a tokenizer
    vocabulary no larger than the model's, windows no longer than its context."""
    from scaleforge.data_pipeline.config import DataConfig

    data = DataConfig()
    vocab = min(model_cfg.vocab_rows, data.vocab_size or model_cfg.vocab_rows)
    return [f"data.vocab_size={vocab}", f"data.seq_len={min(data.seq_len, model_cfg.max_seq_len)}"]


def _import_tokenizer(hf_dir: Path, out: Path) -> None:
    """Copy the model's tokenizer.json (when it has one) beside the checkpoint, checked to
    load as ours, and say how to tokenize data with it."""
    import shutil

    from scaleforge.data_pipeline.tokenizer import Tokenizer

    source = hf_dir / "tokenizer.json"
    if not source.is_file():
        print(f"{hf_dir} has no tokenizer.json; tokenize data with the model's own tokenizer")
        return
    tokenizer = Tokenizer.load(shutil.copy(source, out / "tokenizer.json"))
    # The chat template and special tokens, for sf-preprocess sft's template=auto.
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, out / name)
    print(f"tokenizer ({tokenizer.vocab_size} ids) -> {tokenizer.path}; tokenize data with "
          f"sf-preprocess shards tokenizer={tokenizer.path} input=... out=...")


# The settings that fix a model's tensor shapes and its function; name and init_std do not.
SHAPE_SETTINGS = (
    "family",
    "n_layers",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "ffn_hidden",
    "vocab_size",
    "max_seq_len",
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
    "qkv_bias",
    "qk_norm",
    "head_dim",
    "sliding_window",
    "rope_scaling",
)


def model_overrides(model_cfg: TransformerConfig) -> list[str]:
    """sf-train overrides (`model.d_model=4096`, ...) that rebuild `model_cfg`'s model."""
    values = {name: getattr(model_cfg, name) for name in SHAPE_SETTINGS}
    values["ffn_hidden"] = model_cfg.mlp_hidden
    for group in ("rope_scaling", "moe", "mla"):  # nested settings: one override per field
        nested = getattr(model_cfg, group)
        if group == "moe" and not nested.enabled or group == "mla" and nested == type(nested)():
            continue
        values.update({f"{group}.{f.name}": getattr(nested, f.name) for f in fields(nested)})
    values.pop("rope_scaling")
    return [f"model.{name}={_override_value(value)}" for name, value in values.items()]


def _override_value(value: object) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


_HANDLERS: Handlers = {"to-hf": (ToHfSettings, to_hf), "from-hf": (FromHfSettings, from_hf),
                       "compare": (CompareSettings, compare)}


def dispatch(argv: list[str]) -> None:
    """Run the subcommand `argv[0]` with the key=value settings `argv[1:]`."""
    run_subcommand("sf-convert", _HANDLERS, argv, __doc__ or "")


def main() -> None:
    exit_on_config_error(dispatch, sys.argv[1:])


if __name__ == "__main__":
    main()
