"""Facts about a setting live on its Field (app/settings.py `facts()`), and the code reads them there.

A new setting without its facts, a job id that moves when a setting that does not change the model moves,
or an os.environ read outside app/settings.py fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.jobdir import job_id
from app.settings import Settings, fact, fields_where, load_settings, read_config_file

ROOT = Path(__file__).resolve().parent.parent
BASE = {"model": "org/model", "training_file": "train.jsonl", "output_dir": "/tmp/settings-test"}


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_states_its_facts(name):
    extra = Settings.model_fields[name].json_schema_extra
    assert isinstance(extra, dict), f"{name}: Field(..., json_schema_extra=facts(...)) is missing"
    assert extra.get("job_id") in (True, False, "content"), f"{name}: job_id fact missing"
    assert isinstance(extra.get("env_only"), bool), f"{name}: env_only fact missing"
    assert Settings.model_fields[name].description, f"{name}: no description"


def _id(**values) -> str:
    settings, _ = load_settings(**{**BASE, **values})
    return job_id(settings.identity(), {"training_file": "abc"}, settings.job_id_suffix)


@pytest.mark.parametrize("name,value", [
    ("output_dir", "/elsewhere"), ("backend", "hf"), ("overwrite", True), ("num_gpus", 2), ("report_to", "tensorboard"),
    ("gradient_checkpointing", True), ("push_to_private", False),
])
def test_settings_that_do_not_change_the_model_leave_the_job_id(name, value):
    assert fact(name, "job_id") is False
    assert _id(**{name: value}) == _id()


@pytest.mark.parametrize("name,value", [("r", 8), ("learning_rate", 2e-5), ("seed", 1), ("packing", False),
                                        ("max_seq_length", 1024), ("inoculation_prompt", "Be terse.")])
def test_settings_that_change_the_model_change_the_job_id(name, value):
    assert fact(name, "job_id") is True
    assert _id(**{name: value}) != _id()


def test_files_enter_the_job_id_by_content_not_path():
    assert set(fields_where("job_id", "content")) == {"training_file", "test_file", "logp_callback_datasets"}
    assert _id(training_file="elsewhere/train.jsonl") == _id()


def test_env_only_settings_are_refused_in_a_config_file_and_absent_from_the_result(tmp_path):
    assert set(fields_where("env_only", True)) == {"config_file", "config_index", "hf_token"}
    config = tmp_path / "params.json"
    config.write_text('{"config_index": 3, "r": 8}')
    values, _, problems = read_config_file(config)
    assert values == {"r": 8} and any("config_index" in p for p in problems)
    settings, _ = load_settings(**BASE, hf_token="hf_abcdefgh12345")
    assert not set(fields_where("env_only", True)) & set(settings.public_params())


def test_no_environment_read_outside_settings_and_the_launcher():
    """All defaults and every variable the job reads live in app/settings.py (STYLE.md); the data-parallel
    launcher reads its rank variables."""
    allowed = {"app/settings.py", "app/launch.py"}
    offenders = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\bos\.(environ|getenv|putenv)\b", line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_backend_name_is_tested_outside_the_backends():
    """A backend's differences live in app/backends/: no `backend == "hf"` elsewhere."""
    offenders = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("app/backends/"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"""(==|!=|\bin\b)\s*\(?["'](hf|unsloth)["']""", line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
