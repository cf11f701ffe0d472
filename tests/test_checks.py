"""Every check that needs no tokenizer runs before tokenizing (app/checks.py): an unwritable output folder,
4-bit without CUDA, FT_MAX_SEQ_LENGTH past the model's context, a model too large for the CPU (FT_ALLOW_CPU);
and a warm-up as long as the run is said."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from app.checks import CPU_MAX_PARAMS, check_warmup, context_length, optimizer_steps, parameter_count
from tests.conftest import read_result, run_cli, smoke_env

QWEN2_7B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                max_position_embeddings=131072, tie_word_embeddings=False)


@pytest.fixture
def no_tokenizing(monkeypatch):
    """Fails the test if the data is tokenized: the check must come first."""
    import app.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized before the check")

    monkeypatch.setattr(app.pipeline, "load_tokenizer", refuse)


def _model_with_config(tiny_model, tmp_path, **changes):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in tiny_model.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((tiny_model / "config.json").read_text())
    config.pop("layer_types", None)  # one per layer: rebuilt from num_hidden_layers
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _fails(monkeypatch, capfd, env, command="train") -> tuple[int, str]:
    code = run_cli(monkeypatch, env, command)
    return code, capfd.readouterr().err


@pytest.mark.parametrize("command", ["train", "check"])
def test_an_unwritable_output_folder_is_refused_before_tokenizing(command, tiny_model, tmp_path, monkeypatch, capfd,
                                                                   no_tokenizing):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = _fails(monkeypatch, capfd, smoke_env(tiny_model, blocker / "out"), command)
    assert code == 2 and f"FT_OUTPUT_DIR={blocker / 'out'}: not writable ({blocker} is a file" in err


def test_preview_writes_nothing_and_does_not_need_the_output_folder(tiny_model, tmp_path, monkeypatch, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_cli(monkeypatch, smoke_env(tiny_model, blocker / "out"), "preview", "-n", "1") == 0


def test_four_bit_without_cuda_is_refused_before_tokenizing(tiny_model, tmp_path, monkeypatch, capfd, no_tokenizing):
    code, err = _fails(monkeypatch, capfd, smoke_env(tiny_model, tmp_path, load_in_4bit="true"))
    assert code == 3 and "FT_LOAD_IN_4BIT=true" in err


def test_a_sequence_longer_than_the_models_context_is_refused_before_tokenizing(tiny_model, tmp_path, monkeypatch,
                                                                                capfd, no_tokenizing):
    limit = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    code, err = _fails(monkeypatch, capfd, smoke_env(tiny_model, tmp_path, max_seq_length=1_000_000))
    assert code == 2 and "FT_MAX_SEQ_LENGTH=1000000" in err and f"FT_MAX_SEQ_LENGTH={limit} or less" in err
    assert read_result(tmp_path)["error"]["exit_code"] == 2


def test_context_length_counts_a_rope_extension():
    assert context_length({"max_position_embeddings": 32768}) == 32768
    yarn = {"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 32768}}
    assert context_length(yarn) == 131072
    llama31 = {"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                                   "original_max_position_embeddings": 8192}}
    assert context_length(llama31) == 131072
    assert context_length({"text_config": {"max_position_embeddings": 8192}}) == 8192
    assert context_length(None) is None and context_length({}) is None


@pytest.mark.parametrize("command", ["train", "check"])
def test_a_7b_model_on_the_cpu_is_refused_before_tokenizing_unless_allowed(command, tiny_model, tmp_path, monkeypatch,
                                                                           capfd, no_tokenizing):
    assert parameter_count(QWEN2_7B) > CPU_MAX_PARAMS > parameter_count(json.loads((tiny_model / "config.json").read_text()))
    model = _model_with_config(tiny_model, tmp_path, **QWEN2_7B)
    code, err = _fails(monkeypatch, capfd, smoke_env(model, tmp_path / "out"), command)
    assert code == 3 and "7.62B parameters" in err and "FT_ALLOW_CPU=true" in err and "--gpus" in err


def test_allow_cpu_lets_a_large_model_through_the_check(tiny_model, tmp_path, monkeypatch, capfd):
    model = _model_with_config(tiny_model, tmp_path, **QWEN2_7B)
    env = smoke_env(model, tmp_path / "out", allow_cpu="true")
    assert run_cli(monkeypatch, env, "check") == 0


def _settings(**values):
    return SimpleNamespace(**{"max_steps": None, "epochs": 1, "warmup_steps": 5, "learning_rate": 1e-4, **values})


def test_optimizer_steps_count_as_the_trainer_counts():
    assert optimizer_steps(_settings(max_steps=7), 1000, 2, 8, 1) == 7
    assert optimizer_steps(_settings(epochs=6), 48, 4, 2, 1) == 36  # make run: 12 batches, 6 steps an epoch
    assert optimizer_steps(_settings(), 10, 2, 2, 1) == 3  # 5 batches: the last step has one
    assert optimizer_steps(_settings(), 10, 2, 2, 2) == 2  # 5 batches over 2 ranks: 3 each
    assert optimizer_steps(_settings(), 1, 2, 8, 1) == 1


def test_a_warmup_as_long_as_the_run_is_said(caplog):
    with caplog.at_level(logging.WARNING):
        check_warmup(_settings(warmup_steps=5), 1)
    assert "FT_WARMUP_STEPS=5" in caplog.text and "learning rate 0" in caplog.text and "FT_WARMUP_STEPS=0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_warmup(_settings(warmup_steps=100), 45)
    assert "never reaches FT_LEARNING_RATE" in caplog.text and "below 45" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_warmup(_settings(warmup_steps=10), 45)
        check_warmup(_settings(warmup_steps=0), 1)
    assert caplog.text == ""


def test_max_steps_1_with_warmup_warns_in_check(tiny_model, tmp_path, monkeypatch, capfd):
    assert run_cli(monkeypatch, smoke_env(tiny_model, tmp_path, max_steps=1, warmup_steps=5), "check") == 0
    err = capfd.readouterr().err
    assert "WARNING" in err and "FT_WARMUP_STEPS=5" in err and "learning rate 0" in err
