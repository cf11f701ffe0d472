"""How often a run logs, checkpoints and evaluates is not part of the job id (app/settings.py `facts()`), and
does not change what it trains (app/cadence.py): a run interrupted with one cadence and rerun with another
resumes from its checkpoint and ends with the adapter of an uninterrupted run, bit for bit. A signal stops
training right after the checkpoint, with no evaluation first.

The runs go through the CLI in this process (`python -m app train`'s own code, its signal handlers
included); a callback sends the signal at a chosen step, so the interruption is deterministic.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from app.errors import EXIT_INTERRUPTED
from app.jobdir import job_id
from app.settings import load_settings
from tests.conftest import SAMPLE, read_result, run_cli, smoke_env

BASE = {"model": "org/model", "training_file": "train.jsonl", "output_dir": "/tmp/cadence-test"}
CADENCE = {"logging_steps": 7, "save_steps": 9, "eval_batch_size": 3, "test_file_eval_strategy": "steps",
           "test_file_eval_steps": 4, "eval_every_n_steps": 11}


def _id(**values) -> str:
    settings, _ = load_settings(**{**BASE, **values})
    return job_id(settings.identity(), {"training_file": "abc"}, settings.job_id_suffix)


@pytest.mark.parametrize("name", list(CADENCE))
def test_cadence_leaves_the_job_id(name):
    assert _id(**{name: CADENCE[name]}) == _id()


def test_sampling_at_a_temperature_at_every_log_makes_the_logging_cadence_count():
    """Such sampling draws from the training RNG at every logging step: the weights then depend on it."""
    greedy = json.dumps([{"dataset": "p.jsonl", "eval_steps": "log"}])
    hot = json.dumps([{"dataset": "p.jsonl", "eval_steps": "log", "temperature": 1.0}])
    assert _id(sampling_callbacks=greedy, logging_steps=5) == _id(sampling_callbacks=greedy)
    assert _id(sampling_callbacks=hot, logging_steps=5) != _id(sampling_callbacks=hot)


def _signal_at(monkeypatch, step: int, sig: signal.Signals) -> None:
    """The next run that reaches the end of optimizer step `step` sends `sig` to itself, as `docker stop` or
    Ctrl-C would (once: a resumed run starts past it)."""
    from transformers import TrainerCallback

    import app.cadence

    real, sent = app.cadence.cadence_callbacks, []

    class Send(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step and not sent:
                sent.append(sig)
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(app.cadence, "cadence_callbacks", lambda: [Send(), *real()])


def _metrics(out: Path) -> list[dict]:
    [path] = out.glob("ftjob-*/metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _subset(tmp_path: Path, count: int) -> Path:
    path = tmp_path / f"train-{count}.jsonl"
    path.write_text("".join((SAMPLE / "train.jsonl").read_text().splitlines(keepends=True)[:count]))
    return path


@pytest.mark.integration
def test_a_rerun_with_another_cadence_resumes_and_trains_the_same_weights(tiny_model, tmp_path, monkeypatch, capfd):
    # 16 rows, 2 per micro-batch, 2 micro-batches a step: 4 steps an epoch; 8 steps cross an epoch boundary.
    # Dropout draws from the RNG that evaluations draw from too: the weights would depend on the eval cadence.
    train = _subset(tmp_path, 16)
    common = dict(training_file=train, test_file=SAMPLE / "test.jsonl", max_steps=8, lora_dropout=0.1, packing="false")
    first = dict(logging_steps=1, save_steps=100, eval_batch_size=4, test_file_eval_strategy="steps",
                 test_file_eval_steps=2)
    second = dict(logging_steps=3, save_steps=3, eval_batch_size=5, test_file_eval_strategy="epoch")

    reference = tmp_path / "reference"
    assert run_cli(monkeypatch, smoke_env(tiny_model, reference, **common, **first), "train") == 0

    out = tmp_path / "interrupted"
    _signal_at(monkeypatch, 4, signal.SIGTERM)  # seen at the end of step 5: checkpoint-5, in the second epoch
    assert run_cli(monkeypatch, smoke_env(tiny_model, out, **common, **first), "train") == EXIT_INTERRUPTED
    interrupted = read_result(out)
    assert interrupted["status"] == "interrupted" and interrupted["outputs"]["global_step"] == 5
    capfd.readouterr()

    assert run_cli(monkeypatch, smoke_env(tiny_model, out, **common, **second), "train") == 0
    log = capfd.readouterr().err
    result = read_result(out)
    assert result["id"] == interrupted["id"] == read_result(reference)["id"]
    assert "resumes from checkpoint-5" in log and f"resuming job {result['id']} from checkpoint-5" in log
    assert "logging_steps 3 (was 1)" in log and "save_steps 3 (was 100)" in log
    assert result["outputs"]["global_step"] == 8
    assert result["params"]["validated_params"]["logging_steps"] == 3  # the result states the last run's cadence

    # The same weights as the uninterrupted run with the first cadence, bit for bit.
    ours = load_file(Path(result["outputs"]["model_path"]) / "adapter_model.safetensors")
    theirs = load_file(Path(read_result(reference)["outputs"]["model_path"]) / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].equal(theirs[k]) for k in ours), "the evaluation cadence changed the trained weights"

    # After the resume, the second cadence: logging every 3 steps (and the last), checkpoints every 3,
    # evaluation at the resumed start and at the end of the epoch.
    lines = _metrics(out)
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6, 8]
    assert [r["step"] for r in lines if "eval_loss" in r] == [0, 2, 4, 5, 8]
    assert (Path(result["outputs"]["model_path"]).parent / "checkpoints" / "checkpoint-6").is_dir()


@pytest.mark.integration
def test_ctrl_c_at_the_end_of_an_epoch_exits_after_the_checkpoint_without_evaluating(tiny_model, tmp_path, monkeypatch):
    # 8 rows, 2 per micro-batch, 2 micro-batches a step: 2 steps an epoch, evaluated at each epoch's end.
    env = smoke_env(tiny_model, tmp_path, training_file=_subset(tmp_path, 8), test_file=SAMPLE / "test.jsonl",
                    max_steps=0, epochs=3, test_file_eval_strategy="epoch", packing="false")
    _signal_at(monkeypatch, 1, signal.SIGINT)  # seen at the end of step 2: the last step of the first epoch
    assert run_cli(monkeypatch, env, "train") == EXIT_INTERRUPTED
    assert read_result(tmp_path)["outputs"]["global_step"] == 2
    assert [r["step"] for r in _metrics(tmp_path) if "eval_loss" in r] == [0]  # no evaluation before exiting
    [checkpoint] = tmp_path.glob("ftjob-*/checkpoints/checkpoint-*")
    assert checkpoint.name == "checkpoint-2"

    assert run_cli(monkeypatch, env, "train") == 0
    # The resumed run evaluates step 2 once (at its start), then each epoch's end.
    assert [r["step"] for r in _metrics(tmp_path) if "eval_loss" in r] == [0, 2, 4, 6]
