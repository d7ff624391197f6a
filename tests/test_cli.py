"""The sf-train and sf-preprocess entry points, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from commands import BIN, run_tool
from run_metrics import metrics_records


def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path, stdlib_overrides):
    result = run_tool(
        "sf-train", "+experiment=demo", *stdlib_overrides, "data.vocab_size=1024",
        "trainer.max_steps=4", "trainer.global_batch_tokens=8192", "trainer.eval_every=2",
        "trainer.log_every=1", "optim.warmup_steps=1", "logging.wandb=offline",
        f"run_dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert f"run directory: {run_dir}" in result.stdout
    records = metrics_records(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "final_model.pt").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["data.corpus=/no/such/dir/*.txt"], "data.corpus"),
        (["data.vocab_size=100"], "data.vocab_size"),
        (["data.seq_len=4096"], "data.seq_len"),
        (["trainer.global_batch_tokens=1000"], "trainer.global_batch_tokens"),
    ],
)
def test_bad_input_stops_before_training_with_one_line(tmp_path, stdlib_overrides, overrides,
                                                       named):
    result = run_tool("sf-train", *stdlib_overrides, *overrides, "logging.wandb=disabled",
                  f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_empty_corpus_is_rejected(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text("")
    result = run_tool("sf-preprocess", "prepare", f"data.corpus={corpus}/*.txt",
                  f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode == 2 and "data.corpus" in result.stderr
    assert "empty" in result.stderr


def test_preprocess_prepares_data_that_training_reuses(tmp_path, stdlib_overrides):
    result = run_tool("sf-preprocess", "prepare", *stdlib_overrides, "data.vocab_size=1024",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shards: " in result.stdout
    assert not (tmp_path / "runs").exists()  # preprocessing makes no run directory


def test_preprocess_tokenizer_then_shards_then_train_on_them(tmp_path, jsonl_corpus):
    tokenizer, shards = tmp_path / "tok", tmp_path / "shards"
    result = run_tool("sf-preprocess", "tokenizer", f"input={jsonl_corpus}", "vocab_size=512",
                  f"out={tokenizer}", "model_type=unigram", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "512 ids" in result.stdout
    result = run_tool("sf-preprocess", "shards", f"input={jsonl_corpus}", f"tokenizer={tokenizer}",
                  f"out={shards}", "workers=2", "val_fraction=0.2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "docs/s" in result.stderr and "tok/s" in result.stderr  # the progress bar
    assert (shards / "manifest.json").is_file()
    result = run_tool(
        "sf-train", "data=shards", f"data.path={shards}", "data.vocab_size=512", "data.seq_len=64",
        "data.num_workers=2", "model=llama_micro", "trainer.max_steps=2",
        "trainer.global_batch_tokens=512", "trainer.micro_batch_size=4", "trainer.device=cpu",
        "trainer.precision=fp32", "optim.warmup_steps=1", "logging.wandb=disabled",
        f"run_dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["shards", "input=x", "tokenizer=t"], "out"),
        (["shards", "inputs=x"], "'inputs=x' is not one of input"),
        (["tokenizer", "input=/no/such/*.jsonl", "vocab_size=300", "out=t"], "input="),
        (["tokenizer", "input=a", "vocab_size=many", "out=t"], "vocab_size"),
    ],
)
def test_preprocess_bad_arguments_name_the_key(tmp_path, arguments, named):
    result = run_tool("sf-preprocess", *arguments, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert named in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def fresh_shards(tmp_path_factory) -> Path:
    """A shards directory as a new user makes one: 400 small standard-library documents,
    a 512-piece tokenizer and `sf-preprocess shards` with its defaults (val_fraction=0.01)."""
    from scaleforge.data_pipeline.corpus import find_documents, read_document

    directory = tmp_path_factory.mktemp("fresh")
    sources = [p for p in find_documents("stdlib", 8_000_000) if p.stat().st_size > 1000]
    with open(directory / "docs.jsonl", "w") as stream:
        for path in sources[:400]:
            stream.write(json.dumps({"text": read_document(path)[:800]}) + "\n")
    corpus = str(directory / "docs.jsonl")
    result = run_tool("sf-preprocess", "tokenizer", f"input={corpus}", "vocab_size=512",
                      f"out={directory / 'tok'}", cwd=directory)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_tool("sf-preprocess", "shards", f"input={corpus}",
                      f"tokenizer={directory / 'tok'}", f"out={directory / 'shards'}",
                      cwd=directory)
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / "shards"


def test_fresh_shards_train_with_no_other_setting(fresh_shards, tmp_path):
    """The data's vocabulary comes from the manifest, data.seq_len from the model, and the
    preset's warmup is clamped to the run (the global batch is made small for speed)."""
    result = run_tool("sf-train", "data=shards", f"data.path={fresh_shards}", "model=llama_micro",
                      "trainer.max_steps=5", "trainer.global_batch_tokens=2048",
                      f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: optim.warmup_steps=100 exceeds trainer.max_steps=5" in result.stdout
    assert f"data: {fresh_shards} (" in result.stdout  # the data summary line
    assert "weight 1.00" in result.stdout and "this run reads 10,240 tokens" in result.stdout
    records = metrics_records(tmp_path / "run")
    assert records[-1]["step"] == 5 and "val_loss" in records[-1]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "vocab_size: 512" in config and "seq_len: 64" in config


@pytest.mark.slow
def test_fresh_shards_train_exactly_as_the_issue_says(fresh_shards, tmp_path):
    result = run_tool("sf-train", "data=shards", f"data.path={fresh_shards}", "model=llama_micro",
                      "trainer.max_steps=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_preprocess_warns_about_a_small_validation_split(jsonl_corpus, tokenizer_dir, tmp_path):
    result = run_tool("sf-preprocess", "shards", f"input={jsonl_corpus}",
                      f"tokenizer={tokenizer_dir}", f"out={tmp_path / 'shards'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "rerun with val_fraction=0." in warning[0], result.stderr


def _advised_val_fraction(text: str) -> str:
    """The value of the last `val_fraction=` in `text` (a warning or an error line)."""
    return text.rsplit("val_fraction=", 1)[1].split()[0]


def test_a_small_corpus_goes_from_shards_to_training_following_only_printed_advice(
        texts, tmp_path):
    """~500 small files: sf-preprocess shards with the default val_fraction warns with the
    fraction to rerun with; rerun so, training starts cleanly the first time. And the
    training error for shards without validation names the fraction that fixes it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pieces = [text[start:start + 360] for text in texts for start in range(0, 3000, 360)]
    for number, piece in enumerate(pieces[:494]):
        (corpus / f"{number:03d}.txt").write_text(piece)
    glob = f"input={corpus}/*.txt"
    result = run_tool("sf-preprocess", "tokenizer", glob, "vocab_size=512", "out=tok",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_tool("sf-preprocess", "shards", glob, "tokenizer=tok", "out=shards/first",
                      "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = result.stderr.strip().splitlines()[-1]
    assert warning.startswith("warning: validation holds"), result.stderr
    fraction = _advised_val_fraction(warning)
    assert float(fraction) > 0.01, warning
    result = run_tool("sf-preprocess", "shards", glob, "tokenizer=tok", "out=shards/mine",
                      f"val_fraction={fraction}", "progress=false", cwd=tmp_path)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr[-3000:]
    train = ["data=shards", "model=llama_micro", "trainer.max_steps=2",
             "trainer.global_batch_tokens=1024", "logging.wandb=disabled"]
    result = run_tool("sf-train", *train, "data.path=shards/mine", "run_dir=runs/mine",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Shards without validation: sf-train's error names the rerun that fixes it.
    result = run_tool("sf-preprocess", "shards", glob, "tokenizer=tok", "out=shards/none",
                      "val_fraction=0", "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_tool("sf-train", *train, "data.path=shards/none", "run_dir=runs/none",
                      cwd=tmp_path)
    assert result.returncode == 2 and "rerun sf-preprocess shards with val_fraction=" in \
        result.stderr, result.stderr[-3000:]
    fraction = _advised_val_fraction(result.stderr)
    result = run_tool("sf-preprocess", "shards", glob, "tokenizer=tok", "out=shards/fixed",
                      f"val_fraction={fraction}", "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_tool("sf-train", *train, "data.path=shards/fixed", "run_dir=runs/fixed",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_demo_without_evaluation_and_with_a_clamped_warmup(tmp_path, stdlib_overrides):
    result = run_tool("sf-train", "+experiment=demo", *stdlib_overrides, "data.vocab_size=1024",
                      "trainer.max_steps=5", "trainer.eval_every=0",
                      "trainer.global_batch_tokens=4096", "logging.wandb=disabled",
                      f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: optim.warmup_steps=20 exceeds trainer.max_steps=5" in result.stdout
    records = metrics_records(tmp_path / "run")
    assert records[-1]["step"] == 5 and not any("val_loss" in r for r in records)


def test_three_mistakes_are_three_error_lines_in_one_start(tmp_path, stdlib_overrides):
    result = run_tool("sf-train", *stdlib_overrides, "trainer.precision=fp8",
                      "optim.schedule=step", "data.seq_len=4096", "logging.wandb=disabled",
                      f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert [line.split("=")[0] for line in lines] == [
        "error: trainer.precision", "error: optim.schedule", "error: data.seq_len"]


def test_the_issues_three_mistakes_across_sections_are_three_error_lines(tmp_path):
    """A model field, an optimizer field and the batch rule (which needs the layout) fail
    together: every section is checked whatever else failed."""
    result = run_tool("sf-train", "+experiment=demo", "model.n_heads=3", "optim.lr=-1",
                      "trainer.micro_batch_size=7", "logging.wandb=disabled", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert "model.n_heads" in lines[0] and "optim.lr" in lines[1]
    assert "trainer.micro_batch_size" in lines[2]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=llama_7"], ["error: model=llama_7 is not a preset of configs/model/; did you "
                             "mean llama_7b?"]),
        (["optim.lr=abc"], ["error: optim.lr=abc is not a number"]),
        (["model=llama_7", "optim.lr=abc", "+experiment=dem", "trainer.max_step=3"],
         ["error: model=llama_7 is not a preset of configs/model/; did you mean llama_7b?",
          "error: optim.lr=abc is not a number",
          "error: experiment=dem is not a preset of configs/experiment/; did you mean demo?",
          "error: trainer.max_step is not a setting; did you mean trainer.max_steps?"]),
    ],
)
def test_a_wrong_preset_or_type_is_one_line_with_the_nearest_name(tmp_path, overrides,
                                                                  expected):
    result = run_tool("sf-train", *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == expected


@pytest.mark.parametrize(
    ("command", "described"),
    [
        (["sf-train"], "trainer.eval_every=100"),
        (["sf-train", "model=llama_micro"], "model.vocab_size=null"),
        (["sf-sweep"], "sf-sweep fit settings"),
        (["sf-sweep", "fit", "--help"], "sf-sweep fit settings"),
        (["sf-convert"], "sf-convert to-hf settings"),
        (["sf-preprocess"], "sf-preprocess shards settings"),
        (["sf-preprocess", "prepare", "--help"], "data.max_corpus_bytes=8000000"),
        (["sf-plan"], "sf-plan settings"),
        (["sf-generate"], "temperature=0.8"),
    ],
)
def test_help_exits_0_and_describes_the_keys(tmp_path, command, described):
    arguments = command[1:] if "--help" in command else [*command[1:], "--help"]
    result = run_tool(command[0], *arguments, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if described in line)
    assert line == described or len(line.split(None, 1)) == 2 or "settings" in line, line


def test_help_meanings_come_from_the_dataclasses(tmp_path):
    result = run_tool("sf-train", "--help", cwd=tmp_path)
    lines = result.stdout.splitlines()
    eval_every = next(line for line in lines if line.strip().startswith("trainer.eval_every="))
    assert "0: never" in eval_every
    assert any("peak learning rate" in line for line in lines if "optim.lr=" in line)


def test_a_typo_in_a_key_suggests_the_nearest_one(tmp_path):
    result = run_tool("sf-train", "trainer.max_step=3", "optim.lrr=1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: trainer.max_step is not a setting; did you mean trainer.max_steps?",
        "error: optim.lrr is not a setting; did you mean optim.lr?"]
    result = run_tool("sf-sweep", "fit", "tabel=x.csv", cwd=tmp_path)
    assert result.returncode == 2 and "did you mean table?" in result.stderr


def readme_block(marker: str) -> list[str]:
    """The command lines of the README's code block between <!-- marker --> and
    <!-- /marker -->."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
    return [line for line in block.splitlines() if line and not line.startswith("```")]


def test_readme_first_run_commands_run_as_written(tmp_path, texts):
    """The README's "A first run on your own text", line by line in a shell, in a folder
    holding raw/*.jsonl and .venv (a link to this environment)."""
    (tmp_path / ".venv").symlink_to(BIN.parent)
    (tmp_path / "raw").mkdir()
    for part in range(2):
        with open(tmp_path / "raw" / f"part{part}.jsonl", "w") as stream:
            for text in texts[part * 30:(part + 1) * 30]:
                for piece in range(0, len(text), 500):  # 360 documents, ~8 in validation
                    stream.write(json.dumps({"text": text[piece:piece + 500]}) + "\n")
    lines = readme_block("first-run")
    assert [line.split()[0] for line in lines] == [
        ".venv/bin/sf-preprocess", ".venv/bin/sf-preprocess", ".venv/bin/sf-train",
        ".venv/bin/sf-generate", ".venv/bin/sf-convert", ".venv/bin/sf-convert"]
    outputs = []
    for line in lines:
        result = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, (line, result.stderr[-3000:])
        outputs.append(result.stdout)
    assert "run directory:" in outputs[2]
    assert "model.vocab_size=null: the tokenizer's 512 ids rounded up to a multiple of 128: " \
        "512" in outputs[2]
    assert "\ndef " in "\n" + outputs[3].splitlines()[-1]
    hf_dir = tmp_path / "runs" / "hf" / "mine"  # every output under runs/, which git ignores
    assert (hf_dir / "tokenizer.json").is_file()
    hf_config = json.loads((hf_dir / "config.json").read_text())
    assert hf_config["bos_token_id"] == hf_config["eos_token_id"] is not None
    assert (hf_dir / "generation_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".venv", "raw", "runs"]
    difference = float(outputs[5].split("max abs diff of the logits ")[1].split()[0])
    assert difference < 1e-4, outputs[5]


HELP_COMMANDS = [["sf-train"], ["sf-train", "model=llama_7b"], ["sf-preprocess"],
                 ["sf-sweep"], ["sf-convert"], ["sf-plan"], ["sf-generate"]]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_help_imports_no_torch_and_describes_every_key_whole(tmp_path, command):
    """--help answers without importing torch (sf-train --help took 21 s on a loaded
    2-core machine when it did) and gives every key a meaning, none cut off at a colon or
    pointing "(see above)" at a docstring help does not show."""
    module = {"sf-train": "train", "sf-preprocess": "preprocess", "sf-sweep": "sweep",
              "sf-convert": "convert", "sf-plan": "plan", "sf-generate": "generate"}[command[0]]
    script = (f"import sys; sys.argv = {[*command, '--help']!r}\n"
              f"from scaleforge.launch.{module} import main\n"
              "main()\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([str(BIN / "python"), "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    keys = 0
    for number, line in enumerate(lines):
        if not line.startswith("  ") or "=" not in line.split()[0]:
            continue
        keys += 1
        parts = line.split(None, 1)
        meaning = parts[1] if len(parts) == 2 else lines[number + 1].strip()
        assert meaning and not meaning.startswith(("-", "  ")), line
        assert "(see above)" not in meaning and not meaning.endswith(":"), line
        assert "see scaling/" not in meaning, line
    assert keys >= 5
