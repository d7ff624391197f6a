"""Pipeline parallelism: stage splitting, validation, and multi-process gloo runs of every
schedule compared step by step with the single-process trainer (the numerics contract)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import schedules as torch_schedules

from distributed import run_distributed_test
from layout_runs import adam_record, record_adam_step, weights_against_bounds
from micro_runs import micro_config, synthetic_data
from scaleforge.core.config import Config, micro_batches_per_step
from scaleforge.core.lr_schedule import set_lr
from scaleforge.core.optimizer import build_optimizer
from scaleforge.core.trainer import Trainer, seed_everything
from scaleforge.data_pipeline.batch import step_batch
from scaleforge.errors import ConfigError
from scaleforge.models import build
from scaleforge.models.config import TransformerConfig
from scaleforge.models.loss import cross_entropy
from scaleforge.parallel.grad_clip import clip_grad_norm
from scaleforge.parallel.pipeline import (
    MicroBatch,
    build_pipeline,
    pipeline_eval,
    pipeline_step,
    split_model,
)
from scaleforge.parallel.pipeline_schedules import (
    SCHEDULES,
    available_schedules,
    stage_indices,
    stage_layer_ranges,
    theoretical_bubble_fraction,
    validate_pipeline,
)

# Losses and grad norms: as layout_runs.LOSS_RTOL (its notes say what they bound and why on
# any CPU); weights: each entry within its Adam bound (layout_runs.weights_against_bounds).
TOLERANCE = 1e-5
STEPS = 3
# Clip hard enough that every step clips: the weights then only match if the norm is global.
GRAD_CLIP = 0.05


def _overrides(n_layers: int, micro_batches: int, family: str) -> list[str]:
    model = {"llama": ["model=llama_micro"], "gpt": [
        "model=gpt_tiny", "model.d_model=64", "model.vocab_size=512", "model.max_seq_len=64",
    ]}[family]
    return model + [
        f"model.n_layers={n_layers}",
        "data.seq_len=32",
        "trainer.micro_batch_size=2",
        f"trainer.global_batch_tokens={micro_batches * 2 * 32}",
        f"trainer.max_steps={STEPS}",
        "optim.warmup_steps=1",
        f"trainer.eval_batches={micro_batches}",
        f"optim.grad_clip={GRAD_CLIP}",
    ]


def _micro_batches(cfg: Config) -> dict[str, list[MicroBatch]]:
    """{"train": the micro-batches of STEPS steps, "val": the trainer's validation set}, as
    Batches (document ids only with data.document_masking)."""
    train, val = synthetic_data(cfg)
    count = STEPS * micro_batches_per_step(cfg)
    masking = cfg.data.document_masking
    return {
        "train": [step_batch(b, masking) for b in itertools.islice(iter(train), count)],
        "val": [step_batch(b, masking) for b in val.batches(cfg.trainer.eval_batches)],
    }


def _single_process(cfg: Config, batches: dict, run_dir: Path) -> dict:
    """Losses, grad norms, validation losses (before step 1, after step 2 and at the end),
    final weights and AdamW's record (layout_runs.adam_record) of the plain Trainer on
    `batches`."""
    _, val = synthetic_data(cfg)
    trainer = Trainer(cfg, run_dir, data=(iter(batches["train"]), val))
    losses, norms, val_losses = [], [], [trainer.evaluate()]
    adam = adam_record(trainer.optimizer)
    for step in range(STEPS):
        loss, norm = trainer.train_step(trainer.train_batches)
        record_adam_step(adam, trainer.model_parts[0], trainer.optimizer)
        losses.append(loss.item())
        norms.append(norm.item())
        if step == 1:
            val_losses.append(trainer.evaluate())
    val_losses.append(trainer.evaluate())
    state = {k: v.detach().clone() for k, v in trainer.model_parts[0].state_dict().items()}
    return {"losses": losses, "norms": norms, "val_losses": val_losses, "state": state,
            "final": state, "adam": adam}


def _train_pipelined(cfg: Config, schedule: str, stages_per_rank: int, data: dict,
                     layers_per_stage: list[int] | None = None) -> dict:
    """The trainer's step, with the forward/backward replaced by the pipeline schedule;
    validation at the same points as `_single_process`."""
    batches = data["train"]
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, torch.device("cpu"))
    model = build(cfg.model)
    m = micro_batches_per_step(cfg)
    # The pipeline axis as the topology will hand it over: a 1-D DeviceMesh.
    pp_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("pp",))
    pipe = build_pipeline(model, pp_mesh, schedule, stages_per_rank, m, cross_entropy, "cpu",
                          layers_per_stage)
    del model  # the stages share the weights they own; the rest is freed
    optimizer = build_optimizer(pipe.model_parts, cfg.optim, "cpu")
    losses, norms, local_norms = [], [], []
    val_losses = [pipeline_eval(pipe, data["val"]).item()]
    for step in range(STEPS):
        set_lr(optimizer, step, cfg.optim, cfg.trainer.max_steps)
        loss = pipeline_step(pipe, batches[step * m:(step + 1) * m])
        params = list(pipe.parameters())
        local_norms.append(torch.nn.utils.get_total_norm([p.grad for p in params]).item())
        norms.append(clip_grad_norm(params, cfg.optim.grad_clip, pp_mesh.get_group()).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1:
            val_losses.append(pipeline_eval(pipe, data["val"]).item())
    val_losses.append(pipeline_eval(pipe, data["val"]).item())
    return {
        "losses": losses,
        "norms": norms,
        "local_norms": local_norms,
        "val_losses": val_losses,
        "state": {k: v.detach().clone() for k, v in pipe.state_dict().items()},
        "schedule_class": type(pipe.schedule).__name__,
        "stage_ids": pipe.stage_ids,
    }


def _train_cases(cases: list) -> dict[str, dict]:
    """name -> this rank's `_train_pipelined` record, for every case."""
    return {name: _train_pipelined(cfg, schedule, stages_per_rank, batches, *layers)
            for name, cfg, schedule, stages_per_rank, batches, *layers in cases}


def _run_job(world_size: int, cases: list) -> list[dict]:
    """Run `cases` [(name, cfg, schedule, stages_per_rank, batches[, layers_per_stage])] in
    one gloo job; every rank's records, in rank order."""
    return run_distributed_test(_train_cases, world_size=world_size, func_args=(cases,))


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _weights_against_bounds(ranks: list[dict], name: str, reference: dict) -> tuple[float, str]:
    """The pipelined weights, gathered from the stages by FQN, against their Adam bounds
    (layout_runs.weights_against_bounds): the largest ratio of a difference to its bound."""
    gathered: dict[str, torch.Tensor] = {}
    for result in ranks:
        for key, value in result[name]["state"].items():
            if key in gathered:  # a weight on two ranks would be two diverging copies
                raise AssertionError(f"{key} is held by more than one pipeline rank")
            gathered[key] = value
    assert gathered.keys() == reference["state"].keys()
    return weights_against_bounds(gathered, reference)


SCHEDULE_CASES = [
    ("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2), ("InterleavedZeroBubble", 2),
    ("ZBVZeroBubble", 2), ("DualPipeV", 2),
]
PP2_TIED_CASES = [("ZBVZeroBubble", 2), ("DualPipeV", 2)]
# Per-document attention with RoPE restarting per document: one schedule of each kind
# (one stage per rank, several, V with its sequential evaluation).
DOCUMENT_CASES = [("1F1B", 1), ("Interleaved1F1B", 2), ("ZBVZeroBubble", 2)]
DOCUMENTS = ["data.document_masking=true", "model.rope_per_document=true"]
EXPECTED_STAGES_PP2 = {"loop1": [[0], [1]], "loop2": [[0, 2], [1, 3]], "v": [[0, 3], [1, 2]]}


@pytest.fixture(scope="module")
def pp2_runs(tmp_path_factory):
    """One 2-process job running every schedule (llama, 4 layers, 4 micro-batches, 3 steps)
    plus the V schedules on a gpt model with tied embeddings; and the matching single-process
    references."""
    tmp = tmp_path_factory.mktemp("pp2")
    llama = micro_config(tmp / "ref_llama", *_overrides(4, 4, "llama"))
    gpt = micro_config(tmp / "ref_gpt", *_overrides(4, 4, "gpt"))
    documents = micro_config(tmp / "ref_documents", *_overrides(4, 4, "llama"), *DOCUMENTS)
    assert gpt.model.tie_embeddings
    data = {"llama": _micro_batches(llama), "gpt": _micro_batches(gpt),
            "documents": _micro_batches(documents)}
    cases = [(f"llama-{s}", llama, s, v, data["llama"]) for s, v in SCHEDULE_CASES]
    cases += [(f"gpt-{s}", gpt, s, v, data["gpt"]) for s, v in PP2_TIED_CASES]
    cases += [(f"documents-{s}", documents, s, v, data["documents"]) for s, v in DOCUMENT_CASES]
    cases.append(("llama-1F1B-uneven", llama, "1F1B", 1, data["llama"], [1, 3]))
    ranks = _run_job(2, cases)
    references = {
        "llama": _single_process(llama, data["llama"], tmp / "ref_llama"),
        "gpt": _single_process(gpt, data["gpt"], tmp / "ref_gpt"),
        "documents": _single_process(documents, data["documents"], tmp / "ref_documents"),
        # the same batches, their document ids ignored
        "unmasked": _single_process(llama, data["documents"], tmp / "ref_unmasked"),
    }
    return ranks, references


def _assert_matches(ranks: list[dict], name: str, reference: dict) -> tuple[float, float]:
    loss_diff = max(_relative(r[name][key][i], reference[key][i])
                    for r in ranks for key in ("losses", "val_losses")
                    for i in range(len(reference[key])))
    weight_diff, where = _weights_against_bounds(ranks, name, reference)
    assert loss_diff < TOLERANCE, f"{name}: loss differs by {loss_diff:.2e} relative"
    assert weight_diff <= 1, f"{name}: {where}"
    return loss_diff, weight_diff


@pytest.mark.parametrize("schedule,stages_per_rank", SCHEDULE_CASES)
def test_pp2_schedule_matches_single_process(pp2_runs, schedule, stages_per_rank):
    ranks, references = pp2_runs
    name = f"llama-{schedule}"
    for result in ranks:  # the schedule asked for is the one that ran: no silent fallback
        assert result[name]["schedule_class"] == SCHEDULES[schedule].torch_class
    layout = SCHEDULES[schedule].layout
    expected = EXPECTED_STAGES_PP2["v" if layout == "v" else f"loop{stages_per_rank}"]
    assert [r[name]["stage_ids"] for r in ranks] == expected
    loss_diff, weight_diff = _assert_matches(ranks, name, references["llama"])
    print(f"{name}: max loss rel diff {loss_diff:.1e}, weights {weight_diff:.1e} of bound")


@pytest.mark.parametrize("schedule,stages_per_rank", PP2_TIED_CASES)
def test_pp2_v_schedule_keeps_tied_embeddings_exact(pp2_runs, schedule, stages_per_rank):
    ranks, references = pp2_runs
    name = f"gpt-{schedule}"
    # Rank 0 owns both ends of the V; the tied weight must appear once, under its first name.
    assert "tok_embeddings.weight" in ranks[0][name]["state"]
    loss_diff, weight_diff = _assert_matches(ranks, name, references["gpt"])
    print(f"{name}: max loss rel diff {loss_diff:.1e}, weights {weight_diff:.1e} of bound")


@pytest.mark.parametrize("schedule,stages_per_rank", DOCUMENT_CASES)
def test_pp2_document_masking_matches_single_process(pp2_runs, schedule, stages_per_rank):
    ranks, references = pp2_runs
    name = f"documents-{schedule}"
    loss_diff, weight_diff = _assert_matches(ranks, name, references["documents"])
    # Masking changes the numbers (so matching them means the ids reached the attention).
    masked, unmasked = references["documents"]["losses"], references["unmasked"]["losses"]
    assert max(_relative(a, b) for a, b in zip(masked, unmasked, strict=True)) > 1e-3
    print(f"{name}: max loss rel diff {loss_diff:.1e}, weights {weight_diff:.1e} of bound")


def test_pp2_explicit_uneven_layer_split_matches_single_process(pp2_runs):
    ranks, references = pp2_runs
    name = "llama-1F1B-uneven"
    owned = [sorted({k.split(".")[1] for k in r[name]["state"] if k.startswith("layers.")})
             for r in ranks]
    assert owned == [["0"], ["1", "2", "3"]]
    _assert_matches(ranks, name, references["llama"])


def test_pp2_loss_is_reported_on_every_rank(pp2_runs):
    ranks, references = pp2_runs
    for name, _ in SCHEDULE_CASES:
        first, last = (r[f"llama-{name}"]["losses"] for r in ranks)
        assert first == last
    assert all(loss > 0 for loss in references["llama"]["losses"])


def test_pp2_clips_by_global_grad_norm(pp2_runs):
    ranks, references = pp2_runs
    reference_norms = references["llama"]["norms"]
    assert min(reference_norms) > GRAD_CLIP, "the test must make every step clip"
    for name, _ in SCHEDULE_CASES:
        for result in ranks:
            run = result[f"llama-{name}"]
            for step in range(STEPS):
                assert _relative(run["norms"][step], reference_norms[step]) < TOLERANCE
                # Each rank sees only part of the gradient: clipping by its local norm would
                # scale differently from the single process (and the weights would not match).
                assert run["local_norms"][step] < run["norms"][step] * (1 - 1e-3)


@pytest.mark.slow
def test_pp4_matches_single_process(tmp_path):
    """4 processes, 8 layers (one per stage with 2 stages per rank), 8 micro-batches, every
    schedule."""
    cfg = micro_config(tmp_path / "ref", *_overrides(8, 8, "llama"))
    batches = _micro_batches(cfg)
    cases = [(s, cfg, s, v, batches) for s, v in SCHEDULE_CASES]
    ranks = _run_job(4, cases)
    reference = _single_process(cfg, batches, tmp_path / "ref")
    for name, *_ in cases:
        loss_diff, weight_diff = _assert_matches(ranks, name, reference)
        print(f"pp4 {name}: max loss rel diff {loss_diff:.1e}, weights {weight_diff:.1e} of bound")


# ---- splitting -------------------------------------------------------------------------

def _model_cfg(**changes) -> TransformerConfig:
    base = dict(n_layers=4, d_model=32, n_heads=2, ffn_hidden=64, vocab_size=64,
                max_seq_len=16)
    return TransformerConfig(**(base | changes))


def test_all_requested_schedules_exist_in_this_torch():
    assert available_schedules() == tuple(SCHEDULES)


def test_stage_indices_loop_and_v_layouts():
    assert [stage_indices(r, 4, 2, "loop") for r in range(4)] == [[0, 4], [1, 5], [2, 6],
                                                                   [3, 7]]
    assert [stage_indices(r, 4, 2, "v") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]


def test_layers_balanced_or_explicit():
    assert stage_layer_ranges(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layer_ranges(6, 4, [1, 2, 2, 1]) == [range(0, 1), range(1, 3), range(3, 5),
                                                      range(5, 6)]


def test_stages_keep_full_model_names_and_share_its_weights():
    torch.manual_seed(0)
    model = build(_model_cfg())
    full = dict(model.named_parameters())
    for schedule, v in [("1F1B", 1), ("Interleaved1F1B", 2), ("DualPipeV", 2)]:
        owned: list[str] = []
        for rank in range(2):
            for index, stage in split_model(model, rank, 2, schedule, v):
                names = [n for n, _ in stage.named_parameters()]
                assert ("tok_embeddings.weight" in names) == (index == 0)
                assert ("output.weight" in names) == (index == 2 * v - 1)
                for name, param in stage.named_parameters():
                    assert param is full[name]
                owned += names
        assert sorted(owned) == sorted(full), schedule


def test_cut_stages_compose_to_the_full_model():
    torch.manual_seed(0)
    model = build(_model_cfg())
    tokens = torch.randint(0, 64, (2, 8))
    h = tokens
    for _, stage in sorted(itertools.chain.from_iterable(
            split_model(model, r, 2, "Interleaved1F1B", 2) for r in range(2)),
            key=lambda item: item[0]):
        h = stage(h)
    torch.testing.assert_close(h, model(tokens), rtol=0, atol=0)


# ---- bad input -------------------------------------------------------------------------

def test_layers_not_divisible_by_stages_is_rejected():
    with pytest.raises(ConfigError, match=r"model.n_layers=4 is not divisible.*parallel.pp"):
        validate_pipeline(_model_cfg(), 3, "1F1B", 1, 8)


def test_fewer_layers_than_stages_is_rejected():
    with pytest.raises(ConfigError, match=r"n_layers=2 is fewer than the 4.*pp_stages_per_rank"
                                          r".*; set model\.n_layers=4, or lower parallel\.pp"):
        validate_pipeline(_model_cfg(n_layers=2), 2, "Interleaved1F1B", 2, 8)


def test_bad_explicit_layer_list_is_rejected():
    with pytest.raises(ConfigError, match=r"parallel.pp_layers_per_stage=\[1, 2\].*summing to"):
        validate_pipeline(_model_cfg(), 2, "1F1B", 1, 4, layers_per_stage=[1, 2])
    validate_pipeline(_model_cfg(n_layers=5), 2, "1F1B", 1, 4, layers_per_stage=[2, 3])


def test_too_few_micro_batches_is_rejected():
    with pytest.raises(ConfigError, match=r"3 micro-batches.*fewer than the 4 pipeline stages"
                                          r".*trainer.global_batch_tokens.*"
                                          r"trainer.micro_batch_size.*parallel.pp"):
        validate_pipeline(_model_cfg(), 2, "InterleavedZeroBubble", 2, 3)
    with pytest.raises(ConfigError,
                       match=r"1 micro-batch per step.*is fewer than the 2 pipeline ranks"):
        validate_pipeline(_model_cfg(), 2, "Interleaved1F1B", 2, 1)


def test_interleaved_1f1b_runs_fewer_micro_batches_than_stages(tmp_path):
    """torch's Interleaved1F1B asks only for whole rounds: 2 micro-batches on pp 2 x 2
    stages per rank (4 stages) train as the single process does (as Llama 3 405B ran 16
    micro-batches on 16 ranks with interleaving)."""
    cfg = micro_config(tmp_path / "ref", *_overrides(4, 2, "llama"))
    data = _micro_batches(cfg)
    ranks = _run_job(2, [("interleaved-2mb", cfg, "Interleaved1F1B", 2, data)])
    _assert_matches(ranks, "interleaved-2mb", _single_process(cfg, data, tmp_path / "ref"))


def test_interleaved_needs_whole_rounds_of_micro_batches():
    with pytest.raises(ConfigError, match=r"Interleaved1F1B.*\(5\).*multiple of the 2 pipeline "
                                          r"ranks \(e\.g\. 6\)"):
        validate_pipeline(_model_cfg(), 2, "Interleaved1F1B", 2, 5)
    with pytest.raises(ConfigError, match=r"; set trainer\.global_batch_tokens=3072 \(6 micro-"):
        validate_pipeline(_model_cfg(), 2, "Interleaved1F1B", 2, 5, tokens_per_micro_batch=512)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ConfigError, match=r"parallel.pp_schedule='Zigzag' is unknown"):
        validate_pipeline(_model_cfg(), 2, "Zigzag", 1, 4)


def test_schedule_missing_from_torch_is_rejected(monkeypatch):
    monkeypatch.delattr(torch_schedules, "ScheduleDualPipeV")
    with pytest.raises(ConfigError, match=r"'DualPipeV' is not available in torch"):
        validate_pipeline(_model_cfg(), 2, "DualPipeV", 2, 4)


def test_single_stage_schedule_with_virtual_stages_is_rejected():
    with pytest.raises(ConfigError, match=r"'1F1B' runs one stage per rank.*"
                                          r"set parallel.pp_stages_per_rank=1"):
        validate_pipeline(_model_cfg(), 2, "1F1B", 2, 4)


def test_multi_stage_schedule_with_one_stage_per_rank_is_rejected():
    with pytest.raises(ConfigError, match=r"pp_stages_per_rank=1; set .* to 2 or more"):
        validate_pipeline(_model_cfg(), 2, "Interleaved1F1B", 1, 4)
    with pytest.raises(ConfigError, match=r"needs exactly 2 stages per rank"):
        validate_pipeline(_model_cfg(n_layers=6), 2, "ZBVZeroBubble", 3, 6)


def test_tied_embeddings_across_ranks_are_rejected():
    tied = _model_cfg(tie_embeddings=True)
    with pytest.raises(ConfigError, match=r"model.tie_embeddings=true with parallel.pp=2"):
        validate_pipeline(tied, 2, "1F1B", 1, 4)
    validate_pipeline(tied, 2, "ZBVZeroBubble", 2, 4)  # both ends on rank 0
    validate_pipeline(tied, 1, "1F1B", 1, 4)


# ---- bubble ----------------------------------------------------------------------------

def test_theoretical_bubble_fractions():
    assert theoretical_bubble_fraction("1F1B", 4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble_fraction("GPipe", 1, 8) == 0
    assert theoretical_bubble_fraction("Interleaved1F1B", 4, 8, 2) == pytest.approx(3 / 19)
    assert theoretical_bubble_fraction("InterleavedZeroBubble", 4, 8, 2) == pytest.approx(3 / 51)
    assert theoretical_bubble_fraction("DualPipeV", 4, 8, 2) == pytest.approx(6 / 54)
    assert theoretical_bubble_fraction("ZBVZeroBubble", 4, 8, 2) == 0
    with pytest.raises(ConfigError, match="parallel.pp_schedule"):
        theoretical_bubble_fraction("Zigzag", 2, 4)
