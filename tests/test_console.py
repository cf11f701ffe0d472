"""What the user sees (app/console.py, app/cadence.py): the first line within a second, a banner that names the
job, its folder, backend, device, the settings that differ from the defaults, the data, the optimizer steps, the
effective batch; progress during training and evaluation, as a bar on a terminal and as lines on a log. Tested
on content (values, numbers), not on wording."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from app.console import Progress, changed_settings
from tests.conftest import ROOT, SAMPLE, read_result, run_cli, smoke_env

HEAVY = ("torch", "transformers", "datasets", "trl", "peft")


def _first_line_seconds(env: dict[str, str]) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "app", "check"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        return time.monotonic() - started, line
    finally:
        proc.kill()
        proc.wait()


def test_the_first_line_comes_within_a_second_before_any_heavy_import(tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
    env.update(smoke_env(tiny_model, tmp_path))
    # Timing: best of three (the CI machine is shared); measured 0.5 s on 2 loaded cores, 8-13 s before.
    seconds, line = min(_first_line_seconds(env) for _ in range(3))
    assert str(tiny_model) in line and "CPU" in line, line
    assert seconds < 1.0, f"first line after {seconds:.2f} s: {line}"
    # Structure: nothing heavy is imported when the banner is printed.
    spy = ("import sys, app.console as c\n"
           "def spy(*a, _orig=c.announce):\n"
           f"    print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.__stdout__)\n"
           "    return _orig(*a)\n"
           "c.announce = spy\n"
           "from app.cli import main\nsys.exit(main(['check']))\n")
    out = subprocess.run([sys.executable, "-c", spy], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "HEAVY=\n" in out.stdout, out.stdout + out.stderr[-2000:]


def test_the_banner_names_the_job_its_folder_device_changed_settings_data_steps_and_batch(
        tiny_model, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", "hf_banner_secret_value_123")
    env = smoke_env(tiny_model, tmp_path, test_file=SAMPLE / "test.jsonl")
    assert run_cli(monkeypatch, env, "check") == 0
    captured = capfd.readouterr()
    summary = json.loads(captured.out)
    lines = captured.err.splitlines()
    tokenized = next(i for i, line in enumerate(lines) if "training data:" in line)
    banner = "\n".join(lines[:tokenized])  # everything said before the data is tokenized
    assert summary["job_id"] in banner and summary["job_dir"] in banner and "hf" in banner and "CPU" in banner
    for name in ("FT_MAX_STEPS=4", "FT_GRADIENT_ACCUMULATION_STEPS=2", "FT_LEARNING_RATE=0.001",
                 f"FT_MODEL={tiny_model}", f"FT_OUTPUT_DIR={tmp_path}"):
        assert name in banner, name
    assert "FT_R=" not in banner and "FT_PER_DEVICE_TRAIN_BATCH_SIZE=" not in banner  # at their defaults
    assert "hf_banner_secret" not in captured.err and "HF_TOKEN" not in banner
    assert "48" in banner and "12" in banner and "messages" in banner  # the two files, their rows, their format
    plan = [line for line in lines if " plan: " in line]
    assert summary["optimizer_steps"] == 4 and summary["effective_batch"] == 4
    assert any(f" {summary['optimizer_steps']} " in line for line in plan)
    assert any(f" {summary['effective_batch']} " in line for line in plan)


def test_changed_settings_show_values_as_in_an_env_file():
    from app.settings import load_settings

    settings, _ = load_settings(model="org/m", training_file="t.jsonl", packing=False,
                                inoculation_prompt="Be terse. " * 50)
    changed = changed_settings(settings)
    assert changed["FT_PACKING"] == "false" and changed["FT_MODEL"] == "org/m"
    assert len(changed["FT_INOCULATION_PROMPT"]) < 80 and "500 chars" in changed["FT_INOCULATION_PROMPT"]
    assert "FT_EPOCHS" not in changed


def test_progress_on_a_log_is_a_line_per_period_with_the_step_the_total_and_the_eta(caplog):
    with caplog.at_level(logging.INFO):
        progress = Progress("train", 10, done=2, every_s=0, tty=False)
        for step in range(3, 11):
            progress.update(step, quiet=step == 5)  # a metrics line is about to say step 5
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == [f"{s}/10" for s in (3, 4, 6, 7, 8, 9, 10)]
    assert "ETA" in lines[0] and "100%" in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        quiet = Progress("train", 10, every_s=3600, tty=False)
        quiet.update(5)
        quiet.close()
    assert caplog.records == []  # nothing between metrics lines when they come often enough


def test_progress_on_a_terminal_is_a_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    progress = Progress("train", 8, stream=screen)
    assert progress.tty and progress.bar is not None
    for step in range(1, 9):
        progress.update(step, loss="1.2345")
    progress.close()
    assert "8/8" in screen.getvalue() and "loss=1.2345" in screen.getvalue()


@pytest.mark.integration
def test_training_shows_progress_of_every_step_and_evaluation_and_the_planned_steps_are_the_trainers(
        tiny_model, tmp_path, monkeypatch, capfd):
    import app.console

    monkeypatch.setattr(app.console, "PROGRESS_EVERY_S", 0.0)  # a line at every step and every eval batch
    train = tmp_path / "train.jsonl"
    train.write_text("".join((SAMPLE / "train.jsonl").read_text().splitlines(keepends=True)[:10]))
    env = smoke_env(tiny_model, tmp_path / "out", training_file=train, test_file=SAMPLE / "test.jsonl",
                    max_steps=0, epochs=2, logging_steps=100, eval_batch_size=5, packing="false")
    assert run_cli(monkeypatch, env, "train") == 0
    result = read_result(tmp_path / "out")
    steps = result["outputs"]["optimizer_steps"]
    assert steps == result["outputs"]["global_step"] == 6  # 10 rows / 2 per micro-batch / 2 micro-batches, x 2
    words = [line.split()[2:4] for line in capfd.readouterr().err.splitlines() if len(line.split()) > 3]
    assert [f"{s}/{steps}" for s in range(1, steps + 1)] == [w[1] for w in words if w[0] == "train"]
    evaluations = [w[1] for w in words if w[0] == "eval" and "/" in w[1] and "step" not in w[1]]
    assert evaluations == ["1/3", "2/3", "3/3"] * 3  # 12 test rows / 5 per batch: at the start, after each epoch
