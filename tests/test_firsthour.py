"""The small traps of a researcher's first hour (issue 17), each gone: the Makefile's env-file variable,
`make test-gpu` without CUDA, `python -m app --help`, the hub CLI's name, the message for Python users of a
completed job, the adapter's base model path, `pip install -e .` and the client's relative paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.backends.base import base_model_reference
from tests.conftest import ROOT


def _make(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


@pytest.mark.parametrize("variable", ["ENV_FILE", "ENV"])
def test_check_preview_and_train_read_the_same_env_file_variable(variable):
    for target in ("check", "preview"):
        plan = _make("-n", target, f"{variable}=env/code.env").stdout
        assert ". env/code.env;" in plan and "env/smoke.env" not in plan, plan
    assert "ENV_FILE=env/code.env " in _make("-n", "train", f"{variable}=env/code.env").stdout
    assert ". env/smoke.env;" in _make("-n", "check").stdout  # the default stays the smoke preset


def test_make_test_gpu_without_pytest_says_what_to_install():
    done = _make("test-gpu", "GPU_PYTHON=false")
    assert done.returncode == 2 and "GPU_PYTHON=" in done.stderr and "requirements/gpu.txt" in done.stderr


@pytest.mark.integration
def test_make_test_gpu_skips_cleanly_without_cuda():
    done = _make("test-gpu")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "skipped" in done.stdout and "needs a CUDA GPU" in done.stdout and "error" not in done.stdout.lower()


def test_help_lists_every_setting_with_its_default_the_exit_codes_and_the_presets():
    from app.settings import Settings, env_names

    done = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""  # on stdout: `python -m app --help | less`
    text = done.stdout
    for name in env_names():
        assert f"  {name}=" in text, name
    assert "  FT_R=16\n" in text and "  FT_MODEL=(required)" in text
    assert Settings.model_fields["warmup_steps"].description in text
    for code in ("0", "1", "2", "3", "4", "75"):
        assert f"\n  {code} " in text
    for preset in (ROOT / "env").glob("*.env"):
        assert f"env/{preset.name}" in text


def test_the_offline_message_names_the_hub_cli_that_exists():
    from app.errors import SettingsError
    from app.model_source import resolve_model

    with pytest.raises(SettingsError) as err:
        resolve_model("nobody-org/no-such-model")  # conftest: HF_HUB_OFFLINE=1
    assert "hf download nobody-org/no-such-model" in err.value.message
    assert "huggingface-cli" not in (ROOT / "app" / "model_source.py").read_text()


def test_a_completed_job_tells_python_users_how_to_retrain(tmp_path, caplog):
    from app.jobdir import JobDir, previous_completed

    job = JobDir(tmp_path / "ftjob-x")
    (job.root / "adapter").mkdir(parents=True)
    job.result.write_text(json.dumps({"status": "completed", "outputs": {"model_path": str(job.root / "adapter")}}))
    with caplog.at_level("INFO"):
        assert previous_completed(job, overwrite=False, job_id="ftjob-x") is not None
    assert "FT_OVERWRITE=true" in caplog.text and "overwrite=True" in caplog.text


def test_an_adapter_names_its_base_model_so_that_it_loads_from_anywhere(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert base_model_reference(str(snapshot)) == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub model: its id
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert base_model_reference("models/mine") == str(tmp_path / "models" / "mine")  # a local folder: absolute
    assert base_model_reference("org/not-here") == "org/not-here"


def test_the_client_runs_the_job_in_the_callers_folder(tmp_path, monkeypatch):
    """Relative paths mean what they mean to the caller; a package of the caller's named `app` is not imported."""
    import app.client

    calls = []

    def fake_run(args, env, timeout=None, **kwargs):
        calls.append((args, kwargs, env, Path.cwd()))
        (Path(env["FT_OUTPUT_DIR"]) / "result.json").write_text(json.dumps({"status": "completed"}))
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(app.client.subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    job = app.client.fine_tune(model="models/mine", training_file="data/train.jsonl", ft_output_dir="out")
    [(args, kwargs, env, cwd)] = calls
    assert job.status == "completed" and cwd == tmp_path and "cwd" not in kwargs
    assert args[1:] == ["-P", "-m", "app", "train"]
    assert env["FT_OUTPUT_DIR"] == str(tmp_path / "out") and str(ROOT) in env["PYTHONPATH"].split(os.pathsep)


def test_library_dataset_bars_are_off_even_on_a_terminal(monkeypatch):
    from app.cli import configure_logging

    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    configure_logging()
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"


@pytest.mark.integration
def test_pip_install_editable_makes_the_client_importable_from_any_folder(tmp_path):
    """`pip install -e .` into a fresh venv (offline: the build uses this venv's setuptools)."""
    import setuptools

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    build_tools = str(Path(setuptools.__file__).parent.parent)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "-e", str(ROOT)], check=True, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": build_tools}, capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([str(python), "-c", "import app.client; print(app.client.REPO)"], cwd=elsewhere,
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == ROOT
    assert (venv / "bin" / "ft-job").is_file()
