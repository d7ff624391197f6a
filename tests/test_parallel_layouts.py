"""The numerics contract: every parallel layout trains like one process.

Each test runs real processes (gloo on CPU, one thread per rank) for 5 steps of llama_micro
(or a GPT of the same size) on the same seed and data as a single-process run, and compares
per-step losses, grad norms, validation loss and the gathered weights (fp32: losses and
grad norms within LOSS_RTOL, each weight within its Adam bound; what these bound and why on
any CPU: the notes on LOSS_RTOL in layout_runs.py). Clipping is active
(optim.grad_clip below the gradient norm) so global-norm clipping across tp and dp is
exercised too. Every test first checks the parameters are DTensors with the layout's mesh
and placements, so a layout that silently fell back to another would fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layout_runs import (
    COMMON,
    GPT_MICRO,
    LOSS_RTOL,
    PIPELINE_MODEL,
    assert_weights_match,
    run_layout,
    train_and_record,
)
from micro_runs import micro_config

STEPS = 5


def _reference(tmp_path: Path, *overrides: str) -> dict:
    cfg = micro_config(tmp_path / "reference", *COMMON, *overrides)
    return train_and_record(cfg, tmp_path / "reference", STEPS, world_size=1)


def _compare(result: dict, reference: dict, loss_rtol: float = LOSS_RTOL,
             update_rtol: float | None = None, grad_norm_rtol: float | None = None) -> float:
    """Assert the contract; return the largest relative loss difference.

    Weights: fp32, each entry within its Adam bound (layout_runs.assert_weights_match); bf16
    (`update_rtol`), the difference of each tensor within `update_rtol` of the norm of its
    single-process update."""
    for key in ("initial", "final"):
        assert result[key].keys() == reference[key].keys()
    for name, tensor in reference["initial"].items():
        assert torch.equal(result["initial"][name], tensor), name
    losses, expected = torch.tensor(result["losses"]), torch.tensor(reference["losses"])
    torch.testing.assert_close(losses, expected, rtol=loss_rtol, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]),
                               torch.tensor(reference["grad_norms"]),
                               rtol=grad_norm_rtol or loss_rtol, atol=0)
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=loss_rtol)
    worst_bound = 0.0
    if update_rtol is None:
        worst_bound = assert_weights_match(result["final"], reference)
    else:
        for name, tensor in reference["final"].items():
            update = (tensor - reference["initial"][name]).norm()
            difference = (result["final"][name] - tensor).norm()
            assert difference <= update_rtol * update, (name, difference, update)
    worst_weight = max((result["final"][k] - v).abs().max().item()
                       for k, v in reference["final"].items())
    worst_loss = ((losses - expected).abs() / expected.abs()).max().item()
    print(f"max relative loss difference {worst_loss:.2e}, max weight difference "
          f"{worst_weight:.2e}, at most {worst_bound:.2e} of its Adam bound")
    return worst_loss


def _check_layout(placements: dict, mesh_shape: tuple[int, ...], expected: dict[str, str],
                  num_params: int) -> None:
    """Every parameter is a DTensor on `mesh_shape`; named ones have the given placements."""
    assert len(placements) == num_params, "some parameters are not DTensors"
    assert {shape for shape, _ in placements.values()} == {mesh_shape}
    for name, placement in expected.items():
        assert placements[name][1] == placement, name


TP_PLACEMENTS = {
    "tok_embeddings.weight": "(Shard(dim=0),)",
    "layers.0.attention.wq.weight": "(Shard(dim=0),)",
    "layers.0.attention.wk.weight": "(Shard(dim=0),)",
    "layers.0.attention.wo.weight": "(Shard(dim=1),)",
    "layers.0.feed_forward.w1.weight": "(Shard(dim=0),)",
    "layers.0.feed_forward.w2.weight": "(Shard(dim=1),)",
    "layers.0.attention_norm.weight": "(Replicate(),)",
    "norm.weight": "(Replicate(),)",
    "output.weight": "(Shard(dim=0),)",
}
LAYOUTS = {
    "tp2": (["parallel.tp=2"], 2, (2,), TP_PLACEMENTS),
    "dp_shard2": (["parallel.dp_shard=2"], 2, (2,),
                  {"layers.0.attention.wo.weight": "(Shard(dim=0),)",
                   "norm.weight": "(Shard(dim=0),)"}),
    "dp_replicate2": (["parallel.dp_replicate=2"], 2, (2, 1),
                      {"layers.0.attention.wo.weight": "(Replicate(), Shard(dim=0))"}),
    "tp2_dp_shard2": (["parallel.tp=2", "parallel.dp_shard=2"], 4, (2, 2),
                      {"layers.0.attention.wo.weight": "(Shard(dim=0), Shard(dim=1))",
                       "layers.0.attention.wq.weight": "(_StridedShard(dim=0, sf=2), Shard(dim=0))",
                       "norm.weight": "(Shard(dim=0), Replicate())"}),
    "hsdp_dp_replicate2_dp_shard2": (
        ["parallel.dp_replicate=2", "parallel.dp_shard=-1"], 4, (2, 2),
        {"layers.0.attention.wo.weight": "(Replicate(), Shard(dim=0))"}),
    # Context parallel: FSDP shards over dp_shard x cp (the cp ranks hold the same weights).
    "cp2": (["parallel.cp=2"], 2, (2,), {"layers.0.attention.wo.weight": "(Shard(dim=0),)"}),
    "cp2_tp2": (["parallel.cp=2", "parallel.tp=2"], 4, (2, 2),
                {"layers.0.attention.wo.weight": "(Shard(dim=0), Shard(dim=1))",
                 "norm.weight": "(Shard(dim=0), Replicate())"}),
    "cp2_dp_shard2": (["parallel.cp=2", "parallel.dp_shard=2"], 4, (4,),
                      {"layers.0.attention.wo.weight": "(Shard(dim=0),)"}),
    "cp2_hsdp_dp_replicate2": (["parallel.cp=2", "parallel.dp_replicate=2"], 4, (2, 2),
                               {"layers.0.attention.wo.weight": "(Replicate(), Shard(dim=0))"}),
}
NUM_PARAMS_LLAMA_MICRO = 3 + 2 * 9  # embedding, final norm, head; 9 per block


@pytest.mark.parametrize(
    "layout",
    ["tp2", "dp_shard2", "dp_replicate2", "tp2_dp_shard2", "cp2",
     pytest.param("hsdp_dp_replicate2_dp_shard2", marks=pytest.mark.slow),
     pytest.param("cp2_tp2", marks=pytest.mark.slow),
     pytest.param("cp2_dp_shard2", marks=pytest.mark.slow),
     pytest.param("cp2_hsdp_dp_replicate2", marks=pytest.mark.slow)],
)
def test_layout_matches_single_process_in_fp32(tmp_path, layout):
    overrides, world_size, mesh_shape, placements = LAYOUTS[layout]
    cfg = micro_config(tmp_path / "run", *COMMON, *overrides)
    result = run_layout(cfg, world_size, STEPS)
    _check_layout(result["placements"], mesh_shape, placements, NUM_PARAMS_LLAMA_MICRO)
    worst = _compare(result, _reference(tmp_path))
    print(f"{layout}: max relative loss difference {worst:.2e}")


def test_gpt_with_tied_embeddings_and_positions_under_tp2_matches_single_process(tmp_path):
    cfg = micro_config(tmp_path / "run", *COMMON, *GPT_MICRO, "parallel.tp=2")
    assert cfg.model.tie_embeddings
    result = run_layout(cfg, 2, STEPS)
    # token + position embeddings, final LayerNorm (2), 16 per block; the head is tied.
    _check_layout(result["placements"], (2,), {
        "tok_embeddings.weight": "(Shard(dim=0),)",
        "pos_embeddings.weight": "(Shard(dim=0),)",
        "layers.0.attention.wq.bias": "(Shard(dim=0),)",
        "layers.0.attention.wo.bias": "(Replicate(),)",
        "layers.0.ffn_norm.bias": "(Replicate(),)",
    }, 4 + 2 * 16)
    reference = _reference(tmp_path, *GPT_MICRO)
    worst = _compare(result, reference)
    assert torch.equal(result["final"]["output.weight"], result["final"]["tok_embeddings.weight"])
    print(f"gpt tp2: max relative loss difference {worst:.2e}")


# bf16: FSDP casts the gathered weights to bf16 (MixedPrecisionPolicy) where one process
# autocasts each op's inputs, so the runs round different values to bf16, not the same ones
# in another order: the differences are bf16 roundings (2^-9 relative each, round to
# nearest), independent in sign across tokens and ops. Every CPU's bf16 matmul accumulates
# in fp32 (oneDNN with AVX512-BF16/AMX or by conversion on AVX2, ARM's BFMMLA), so the CPU
# and thread count change only fp32 orders, 2^15 times smaller (layout_runs' notes).
# - Losses within 1e-4 relative: about 2^-9 / sqrt(512), one rounding of each of a step's
#   512 token losses averaged. Measured 1.4e-5 (dp_shard2, AMD EPYC), 7e-6 elsewhere.
# - Grad norms within 1e-2: 4 x 2^-9, the roundings of a gradient's ~16 ops (random sign,
#   sqrt(16) = 4) of its backward path. Measured 9e-4.
# - Each weight's difference within 10% of the norm of its own update over the run: Adam
#   steps an entry whose gradient is within that noise of zero by up to 2 lr either way (a
#   per-entry bound as in fp32 would saturate), so a tensor's ratio is about 2 sqrt(f) for
#   a fraction f of such entries: 10% allows f = 0.25%. Measured at most 4%.
BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL, BF16_UPDATE_RTOL = 1e-4, 1e-2, 0.1


BF16_LAYOUTS = {
    "dp_shard2": (["parallel.dp_shard=2"], 2, (2,)),
    "tp2_dp_shard2": (["parallel.tp=2", "parallel.dp_shard=2"], 4, (2, 2)),
}


@pytest.mark.parametrize("layout", ["dp_shard2", pytest.param("tp2_dp_shard2",
                                                              marks=pytest.mark.slow)])
def test_bf16_layout_stays_close_to_single_process_bf16(tmp_path, layout):
    overrides, world_size, mesh_shape = BF16_LAYOUTS[layout]
    cfg = micro_config(tmp_path / "run", *COMMON, "trainer.precision=bf16", *overrides)
    result = run_layout(cfg, world_size, STEPS)
    assert result["autocast"] == "fp32"  # FSDP's policy casts, not autocast
    _check_layout(result["placements"], mesh_shape, {}, NUM_PARAMS_LLAMA_MICRO)
    reference = _reference(tmp_path, "trainer.precision=bf16")
    worst = _compare(result, reference, BF16_LOSS_RTOL, update_rtol=BF16_UPDATE_RTOL,
                     grad_norm_rtol=BF16_GRAD_NORM_RTOL)
    print(f"bf16 {layout}: max relative loss difference {worst:.2e}")


PIPELINE_LAYOUTS = {
    "pp2_1F1B": (["parallel.pp=2"], 2, [[0], [1]]),
    "pp2_Interleaved1F1B": (["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B",
                             "parallel.pp_stages_per_rank=2"], 2, [[0, 2], [1, 3]]),
    "pp2_dp_shard2": (["parallel.pp=2", "parallel.dp_shard=2"], 4, [[0], [0], [1], [1]]),
    "pp2_dp_replicate2": (["parallel.pp=2", "parallel.dp_replicate=2"], 4,
                          [[0], [0], [1], [1]]),
    "tp2_pp2": (["parallel.pp=2", "parallel.tp=2"], 4, [[0], [0], [1], [1]]),
    "tp2_pp2_Interleaved1F1B": (["parallel.pp=2", "parallel.tp=2",
                                 "parallel.pp_schedule=Interleaved1F1B",
                                 "parallel.pp_stages_per_rank=2"],
                                4, [[0, 2]] * 2 + [[1, 3]] * 2),
    # Zero-bubble schedules keep FSDP's gathered weights until the weight-gradient pass.
    "pp2_dp_shard2_ZBVZeroBubble": (["parallel.pp=2", "parallel.dp_shard=2",
                                     "parallel.pp_schedule=ZBVZeroBubble",
                                     "parallel.pp_stages_per_rank=2",
                                     "parallel.fsdp_reshard_after_forward=false",
                                     "trainer.micro_batch_size=1", "trainer.eval_batches=8"],
                                    4, [[0, 3]] * 2 + [[1, 2]] * 2),
    "tp2_pp2_dp_shard2": (["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2"], 8,
                          [[0]] * 4 + [[1]] * 4),
    # One entry of the token embedding, whose gradient is ~1e-8 and carries the ~3e-9
    # rounding noise of the split sequence, takes a step 15% off (1e-4 after 5 steps): within
    # its Adam bound (measured 2026-12-07: at most 6% of any entry's bound).
    "cp2_pp2": (["parallel.pp=2", "parallel.cp=2"], 4, [[0], [0], [1], [1]]),
}


@pytest.mark.parametrize(
    "layout",
    ["pp2_1F1B", "pp2_Interleaved1F1B", "pp2_dp_shard2", "tp2_pp2",
     pytest.param("pp2_dp_replicate2", marks=pytest.mark.slow),
     pytest.param("tp2_pp2_Interleaved1F1B", marks=pytest.mark.slow),
     pytest.param("pp2_dp_shard2_ZBVZeroBubble", marks=pytest.mark.slow),
     pytest.param("tp2_pp2_dp_shard2", marks=pytest.mark.slow),
     pytest.param("cp2_pp2", marks=pytest.mark.slow)],
)
def test_pipeline_layout_trains_like_single_process_in_fp32(tmp_path, layout):
    overrides, world_size, stage_ids = PIPELINE_LAYOUTS[layout]
    cfg = micro_config(tmp_path / "run", *COMMON, *PIPELINE_MODEL, *overrides)
    result = run_layout(cfg, world_size, STEPS)
    # The stages asked for ran on the ranks expected: no fallback to a single stage.
    assert result["stage_ids"] == stage_ids
    # Rank 0's stage (embedding, layers 0-1) is sharded over dp by FSDP, or over tp;
    # names carry the stage's index in the pipeline's model_parts ("0.").
    placements = {name.split(".", 1)[1]: value for name, value in result["placements"].items()}
    if layout == "tp2_pp2_dp_shard2":
        _check_layout(placements, (2, 2), {}, 1 + 2 * 9)
    elif "tp" in layout:
        rank0_placements = {k: v for k, v in TP_PLACEMENTS.items() if k.startswith(("tok", "l"))}
        _check_layout(placements, (2,), rank0_placements, 1 + 2 * 9)
    elif layout == "pp2_dp_shard2_ZBVZeroBubble":  # stages 0 and 3: both ends of the model
        _check_layout(placements, (2,), {"output.weight": "(Shard(dim=0),)"}, 3 + 2 * 9)
    elif "cp" in layout:  # FSDP over the cp ranks of each stage
        _check_layout(placements, (2,), {}, 1 + 2 * 9)
    elif "dp" in layout:
        mesh_shape = (2,) if "dp_shard" in layout else (2, 1)
        _check_layout(placements, mesh_shape, {}, 1 + 2 * 9)
    else:
        assert result["placements"] == {}
    same_data = [o for o in overrides if not o.startswith("parallel.")]
    worst = _compare(result, _reference(tmp_path, *PIPELINE_MODEL, *same_data))
    print(f"{layout}: max relative loss difference {worst:.2e}")


def test_bf16_pp2_stays_close_to_single_process_bf16(tmp_path):
    # Autocast wraps the schedule as it wraps the single-process forward; activations cross
    # the stage boundary in the residual stream's fp32, so the numbers differ only by
    # reduction order (measured: losses within 1e-7 relative, weights within 6e-6).
    overrides = [*PIPELINE_MODEL, "trainer.precision=bf16"]
    cfg = micro_config(tmp_path / "run", *COMMON, *overrides, "parallel.pp=2")
    result = run_layout(cfg, 2, STEPS)
    assert result["autocast"] == "bf16" and result["stage_ids"] == [[0], [1]]
    reference = _reference(tmp_path, *overrides)
    worst = _compare(result, reference, BF16_LOSS_RTOL, update_rtol=BF16_UPDATE_RTOL,
                     grad_norm_rtol=BF16_GRAD_NORM_RTOL)
    print(f"bf16 pp2: max relative loss difference {worst:.2e}")


# Context parallel with the model's other options, against one process with the same ones:
# GPT's learned positions (global positions) and tied embeddings, selective checkpointing
# (the gathered K/V recomputed in backward), a sliding window, the fused kernels (RoPE at
# global positions, the fused loss on the rank's tokens) and compiled blocks.
CP_OPTIONS = {
    "gpt": GPT_MICRO,
    "selective": ["trainer.activation_checkpointing=selective"],
    "fused_kernels": ["model.kernels=fused"],
    "compile": ["trainer.compile=true"],
    # A window of 20 keys (the mask of global positions): it ends inside other chunks of 16.
    "sliding_window": ["model.sliding_window=20"],
}


@pytest.mark.parametrize("option", ["selective", "gpt", "sliding_window",
                                    pytest.param("fused_kernels", marks=pytest.mark.slow),
                                    pytest.param("compile", marks=pytest.mark.slow)])
def test_cp2_with_model_options_matches_single_process_in_fp32(tmp_path, option):
    overrides = CP_OPTIONS[option]
    cfg = micro_config(tmp_path / "run", *COMMON, *overrides, "parallel.cp=2")
    result = run_layout(cfg, 2, STEPS)
    # Compiled blocks are compared with eager ones in one process: on this CPU (torch 2.13)
    # the single-process compiled run gave NaN losses or crashed in malloc (measured
    # 2026-12-01), with or without cp; test_parallel_compile.py holds compile to eager.
    same = [o for o in overrides if o != "trainer.compile=true"]
    worst = _compare(result, _reference(tmp_path, *same))
    print(f"cp2 with {option}: max relative loss difference {worst:.2e}")


# Per-document attention (document ids from the loader, RoPE restarting per document, a
# block-diagonal mask): tp2 all-gathers the sequence before attention, so every rank's
# heads see all positions; FSDP and the pipeline pass the ids on to every stage.
DOCUMENTS = ["data.document_masking=true", "model.rope_per_document=true"]
DOCUMENT_LAYOUTS = {
    "tp2": (["parallel.tp=2"], 2, []),
    "dp_shard2_selective": (["parallel.dp_shard=2", "trainer.activation_checkpointing=selective"],
                            2, []),
    "tp2_pp2": (["parallel.pp=2", "parallel.tp=2"], 4, PIPELINE_MODEL),
    # Context parallel: the whole sequences' ids mask the gathered keys; RoPE positions
    # within documents are taken from the whole sequence too.
    "cp2_full": (["parallel.cp=2", "trainer.activation_checkpointing=full"], 2, []),
}


@pytest.mark.parametrize("layout", list(DOCUMENT_LAYOUTS))
def test_document_masking_layout_matches_single_process_in_fp32(tmp_path, layout):
    overrides, world_size, model = DOCUMENT_LAYOUTS[layout]
    cfg = micro_config(tmp_path / "run", *COMMON, *DOCUMENTS, *model, *overrides)
    result = run_layout(cfg, world_size, STEPS)
    same_run = [o for o in overrides if not o.startswith("parallel.")]
    reference = _reference(tmp_path, *DOCUMENTS, *model, *same_run)
    worst = _compare(result, reference)
    print(f"documents {layout}: max relative loss difference {worst:.2e}")
