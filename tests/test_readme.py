"""The README's examples run as written: its data lines are training data in the format they show, its
commands run in a clone, its adapter-loading snippet loads a trained adapter from another folder, its
result.json excerpt has the keys of a real one, its memory table is the estimator's, its links exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.data import load_conversations
from app.formatting import IGNORE, Formatter, encode_all
from tests.conftest import ROOT, SAMPLE

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)


def _blocks(language: str, containing: str = "") -> list[str]:
    return [body for lang, body in BLOCKS if lang == language and containing in body]


def test_the_first_screen_says_what_it_is_then_the_two_commands():
    first_section = README.split("\n## ", 1)[0]
    commands = _blocks("bash")[0]
    assert commands in first_section and "make run" in commands and "make test" in commands
    assert "min" in commands.split("make test", 1)[1].splitlines()[0], "make test's line says how long it takes"


def test_the_data_examples_are_training_data_in_the_formats_they_show(tokenizers, tmp_path):
    examples = _blocks("jsonl")
    formats, rows = [], []
    for index, block in enumerate(examples):
        path = tmp_path / f"example-{index}.jsonl"
        path.write_text(block)
        conversations = load_conversations(path)
        formats.append(conversations[0].format)
        [row] = encode_all(Formatter(tokenizers["chatml"], 4096), conversations)
        trained = [t for t, label in zip(row.input_ids, row.labels, strict=True) if label != IGNORE]
        assert tokenizers["chatml"].decode(trained) == "def is_even(n):\n    return n % 2 == 0<|im_end|>"
        rows.append(row.input_ids)
    assert formats == ["messages", "sharegpt", "prompt_completion", "alpaca"]
    assert rows[1] == rows[2] == rows[3]  # the same conversation, whatever the format


def test_the_memory_table_is_the_estimators():
    from app.backends.unsloth import UnslothBackend
    from app.memory import Batch, Shape, Workload, estimate_peak
    from app.settings import ALL_PROJECTIONS

    configs = {  # the published config.json numbers of each model
        "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, True, 151936), "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, True, 151936),
        "Qwen2.5-3B": (2048, 11008, 36, 16, 2, True, 151936), "Qwen2-7B": (3584, 18944, 28, 28, 4, False, 152064),
        "Llama-3.1-8B": (4096, 14336, 32, 32, 8, False, 128256), "Qwen2.5-14B": (5120, 13824, 48, 40, 8, False, 152064),
        "Qwen2.5-32B": (5120, 27648, 64, 40, 8, False, 152064),
    }
    table = re.findall(r"^\| (\S+) \| ([\d.]+B) \| (\d+) \| (\d+) \| (\d+) \|$", README, flags=re.M)
    assert [row[0] for row in table] == list(configs)
    batch = Batch.worst([2048, 2048], 2, flat=True)
    for name, params, *gib in table:
        hidden, inter, layers, heads, kv, tied, vocab = configs[name]
        shape = Shape.from_config(dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                                       vocab_size=vocab, model_type="llama" if "Llama" in name else "qwen2"))
        assert f"{shape.params / 1e9:.1f}B" == params
        for column, (four_bit, checkpointing) in zip(gib, [(False, False), (False, True), (True, True)], strict=True):
            work = Workload(batch=batch, load_in_4bit=four_bit, r=16, target_modules=tuple(ALL_PROJECTIONS),
                            optimizer_8bit=True, checkpointing=checkpointing)
            assert f"{estimate_peak(shape, UnslothBackend.memory, work).total_gb:.0f}" == column, (name, column)


def test_the_links_point_at_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
    assert "../shared/docs" not in README  # not in a clone


def _clone(tmp_path: Path, tiny_model: Path) -> Path:
    """A folder laid out as a clone after `make run`'s model build: the code, the presets, the data, the model."""
    clone = tmp_path / "clone"
    (clone / ".cache" / "models").mkdir(parents=True)
    for name in ("app", "env", "data"):
        (clone / name).symlink_to(ROOT / name)
    (clone / ".cache" / "models" / "smoke").symlink_to(tiny_model)
    return clone


@pytest.mark.integration
def test_the_check_and_preview_commands_run_as_written(tiny_model, tmp_path):
    [block] = _blocks("bash", "python -m app check")
    clone = _clone(tmp_path, tiny_model)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.split("\n--- row", 1)[0])["state"] == "new"  # check's summary
    assert len(json.loads((clone / "p.json").read_text())) == 2


def _keys(excerpt, real, where="") -> list[str]:
    """Paths of the excerpt's keys that the real result lacks."""
    missing = []
    for key, value in excerpt.items():
        if key not in real:
            missing.append(f"{where}{key}")
        elif isinstance(value, dict) and isinstance(real[key], dict):
            missing += _keys(value, real[key], f"{where}{key}.")
    return missing


@pytest.mark.integration
def test_the_adapter_snippet_loads_a_trained_adapter_from_another_folder(tiny_model, tmp_path):
    """Trained through the Python client with paths relative to the caller's folder; loaded from another one."""
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "tiny").symlink_to(tiny_model)
    (work / "train.jsonl").write_text("".join((SAMPLE / "train.jsonl").read_text().splitlines(keepends=True)[:8]))
    train = ("from app.client import fine_tune\n"
             "job = fine_tune(model='models/tiny', training_file='train.jsonl', ft_output_dir='output', max_steps=2,"
             " per_device_train_batch_size=2, gradient_accumulation_steps=1, warmup_steps=0, max_seq_length=512,"
             " learning_rate=1e-3)\n"
             "assert job.status == 'completed', job.error\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", train], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((work / "output" / "result.json").read_text())
    adapter = Path(result["params"]["validated_params"]["finetuned_model_id"])
    assert adapter.is_relative_to(work / "output")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(work / "models" / "tiny")

    [snippet] = _blocks("python", "AutoPeftModelForCausalLM")
    elsewhere = tmp_path / "notebook"
    elsewhere.mkdir()
    (elsewhere / "output").symlink_to(work / "output")  # the result, seen from another folder
    done = subprocess.run([sys.executable, "-c", snippet], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Write is_even(n)." in done.stdout  # the prompt, then what the model wrote

    [excerpt] = _blocks("json", '"finetuned_model_id"')
    assert not _keys(json.loads(excerpt), result), "README's result.json keys missing from a real one"
