"""Parity with the real openweights 0.14.0 (tests/owpkg.py fetches it from PyPI once; skipped without PyPI).

Unit: TrainingConfig's fields are settings here or listed as OpenWeights-only; its defaults are the job's
(one documented exception); the values it accepts are accepted with its meaning; a validated_params built by
its FineTuning.create loads unchanged and never moves the outputs; result.json reads as its Job; fine_tune's
job object; the callbacks' measures. Integration: that validated_params trains through FT_CONFIG_FILE and
through app.client.fine_tune on the tiny model, every hyperparameter honoured, every output under
FT_OUTPUT_DIR.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import pickle
import types
from pathlib import Path

import pytest

from app.settings import (
    ALL_PROJECTIONS,
    OPENWEIGHTS_CREATE_ARGS,
    OPENWEIGHTS_ONLY_FIELDS,
    Settings,
    load_settings,
    openweights_learning_rate,
)
from tests import owpkg
from tests.conftest import SAMPLE, read_result, run_cli

TRAIN, TEST = str(SAMPLE / "train.jsonl"), str(SAMPLE / "test.jsonl")
# Defaults that differ, on purpose (DESIGN.md, "Settings"): (OpenWeights 0.14.0, this job).
DEFAULT_EXCEPTIONS = {
    "merge_before_push": (True, False),  # adapter only here
    "finetuned_model_id": ("{org_id}/{model_name}-{job_id}", None),  # a template create() fills in; hub id here
    "sampling_callbacks": (None, []),  # the same: no sampling
}


@pytest.fixture(scope="session")
def ow() -> owpkg.OpenWeights:
    try:
        return owpkg.load()
    except owpkg.Unavailable as err:
        pytest.skip(f"openweights {owpkg.VERSION} is not cached in .cache/openweights and PyPI is unreachable: {err}")


def _load(tmp_path: Path, validated: dict, monkeypatch=None, **env: str):
    path = tmp_path / "validated.json"
    path.write_text(json.dumps(validated))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings(config_file=str(path))


# --- fields and defaults -----------------------------------------------------------------------------------------


def test_openweights_only_fields_are_exactly_the_training_config_fields_not_implemented(ow):
    fields = set(ow.TrainingConfig.model_fields)
    assert OPENWEIGHTS_ONLY_FIELDS <= fields, OPENWEIGHTS_ONLY_FIELDS - fields
    assert fields - set(Settings.model_fields) == OPENWEIGHTS_ONLY_FIELDS - {"output_dir"}
    assert "output_dir" in Settings.model_fields  # the job's FT_OUTPUT_DIR: same name, another meaning
    create = set(inspect.signature(ow.FineTuning.create).parameters) - {"self", "params"}
    assert create == OPENWEIGHTS_CREATE_ARGS


def test_defaults_are_openweights_defaults(ow, tmp_path):
    theirs = ow.TrainingConfig(model="m", training_file=TRAIN, loss="sft").model_dump()
    settings, _ = load_settings(model="m", training_file=TRAIN, output_dir=str(tmp_path))
    ours = settings.public_params()
    for name, value in theirs.items():
        if name in OPENWEIGHTS_ONLY_FIELDS:
            continue
        expected = DEFAULT_EXCEPTIONS.get(name, (value, value))
        assert (value, ours[name]) == expected, name


# --- accepted values -----------------------------------------------------------------------------------------------


def test_a_validated_params_of_openweights_loads_unchanged(ow, tmp_path, monkeypatch):
    sampling = [{"dataset": TEST, "eval_steps": 5, "tag": "cmv"}]
    validated = ow.validated_params(
        model="unsloth/Qwen2-7B", training_file=TRAIN, test_file=TEST, loss="sft", r=8, lora_alpha=16,
        learning_rate=2e-5, lr_scheduler_type="cosine", per_device_train_batch_size=16, gradient_accumulation_steps=1,
        warmup_steps=10, packing=False, logging_steps=50, eval_batch_size=16, merge_before_push=False,
        push_to_private=False, job_id_suffix="cgcode_rhf1.00_1ep", meta={"experiment": "h1"},
        sampling_callbacks=sampling, logp_callback_datasets={"test": TEST}, test_file_eval_strategy="steps",
        test_file_eval_steps=10, eval_every_n_steps=5,
    )
    assert validated["output_dir"] == "./tmp" and validated["finetuned_model_id"].startswith("my-org/Qwen2-7B-ftjob-")
    settings, ignored = _load(tmp_path, validated, monkeypatch, FT_OUTPUT_DIR=str(tmp_path / "volume"))
    assert ignored == sorted(OPENWEIGHTS_ONLY_FIELDS)
    assert settings.output_dir == tmp_path / "volume"
    ours = settings.public_params()
    for key, value in validated.items():
        if key not in OPENWEIGHTS_ONLY_FIELDS:
            assert ours[key] == value, key


def test_openweights_output_dir_never_moves_the_outputs(ow, tmp_path):
    validated = ow.validated_params(model="m", training_file=TRAIN, loss="sft", output_dir=str(tmp_path / "ckpt"))
    settings, ignored = _load(tmp_path, validated)
    assert "output_dir" in ignored and settings.output_dir == Path("/output")  # FT_OUTPUT_DIR's default


@pytest.mark.parametrize(
    "given,field,expected",
    [
        ({"learning_rate": "-4"}, "learning_rate", 1e-4),  # a string is eval()ed, then 10**lr when negative
        ({"learning_rate": "-5.5"}, "learning_rate", 10**-5.5),
        ({"learning_rate": "2*1e-5"}, "learning_rate", 2e-5),
        ({"learning_rate": "1e-4"}, "learning_rate", 1e-4),
        ({"learning_rate": -5}, "learning_rate", 1e-5),  # create() dumps it as -5.0 (which its worker refuses)
        ({"test_file_eval_steps": 0.25}, "test_file_eval_steps", 0.25),  # a fraction of the run (transformers)
        ({"test_file_eval_steps": 20.0}, "test_file_eval_steps", 20),
        ({"target_modules": None}, "target_modules", ALL_PROJECTIONS),
        ({"max_steps": 0}, "max_steps", None),  # sft.py passes max_steps only when truthy
        ({"test_file_eval_strategy": "steps", "logging_steps": 7}, "test_file_eval_steps", 7),  # transformers
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else None,
)
def test_values_openweights_accepts_mean_the_same_here(ow, tmp_path, given, field, expected):
    validated = ow.validated_params(model="m", training_file=TRAIN, loss="sft", **given)
    settings, _ = _load(tmp_path, validated)
    value = getattr(settings, field)
    assert value == (pytest.approx(expected) if isinstance(expected, float) else expected)


@pytest.mark.parametrize("text,rate", [("-4", 1e-4), ("2*1e-5", 2e-5), ("3e-4", 3e-4), ("-3 - 0.5", 10**-3.5)])
def test_learning_rate_expressions_from_the_environment(text, rate, monkeypatch):
    monkeypatch.setenv("FT_LEARNING_RATE", text)
    settings, _ = load_settings(model="m", training_file=TRAIN)
    assert settings.learning_rate == pytest.approx(rate)


@pytest.mark.parametrize(
    "value,needle",
    [
        ("__import__('os').getcwd()", "Call is not allowed"),
        ("().__class__", "Attribute is not allowed"),
        ("[1e-4][0]", "is not allowed"),
        ("lr", "Name is not allowed"),
        ("10**10**10", "out of range"),
        ("1/0", "division by zero"),
        ("1" * 65, "too long"),
        (-0.5, "10**-0.5 = 0.3162"),  # OpenWeights would train at 0.316; never meant
        (True, "boolean"),
    ],
)
def test_learning_rate_refuses_what_is_not_arithmetic_on_numbers(value, needle):
    with pytest.raises(ValueError, match=None) as raised:
        openweights_learning_rate(value)
    assert needle in str(raised.value)


def test_zero_learning_rate_is_refused_by_the_bound(tmp_path):
    from app.errors import SettingsError

    with pytest.raises(SettingsError, match="greater than 0"):
        load_settings(model="m", training_file=TRAIN, learning_rate="0")


# --- result.json and fine_tune's job object -----------------------------------------------------------------------


def _required(ow) -> set[str]:
    return {f.name for f in dataclasses.fields(ow.Job)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def test_result_json_reads_as_openweights_job(ow):
    from app.result import build_result, now

    gpu = {"name": "H200", "uuid": "GPU-x", "memory_total_gb": 139.8, "memory_free_gb": 139.0, "estimated_peak_gb": 17.2}
    result = json.loads(json.dumps(build_result(job_id="ftjob-0123456789ab", status="completed",
                                                params={"model": "m", "r": 8}, created_at=now(), gpu=gpu)))
    contract = {"id", "type", "status", "model", "params", "outputs", "gpu", "versions", "ignored_params", "error",
                "created_at", "finished_at"}
    assert contract <= set(result) and _required(ow) <= set(result)
    job = ow.Job.from_row(result, None)
    assert (job.id, job.type, job.status, job.model) == ("ftjob-0123456789ab", "fine-tuning", "completed", "m")
    assert job.params["validated_params"]["r"] == 8 and job["status"] == "completed"
    assert (job.requires_vram_gb, job.script, job.updated_at) == (18, "python -m app train", result["finished_at"])
    assert job.docker_image is None and job.organization_id is None and job.timeout is None and job.worker_id


def test_fine_tune_job_reads_as_attributes_and_as_a_dict():
    from app.client import FineTuneJob

    job = FineTuneJob({"id": "ftjob-1", "status": "completed", "params": {"validated_params": {"r": 8}}})
    assert job.status == job["status"] == "completed" and job.params["validated_params"]["r"] == 8
    assert json.loads(json.dumps(job)) == job and pickle.loads(pickle.dumps(job)) == job
    assert job.refresh() is job and isinstance(job, dict)
    with pytest.raises(AttributeError, match="no key or attribute 'eror'"):
        job.eror  # noqa: B018


# --- callbacks ---------------------------------------------------------------------------------------------------------


def test_logp_is_logged_with_openweights_meaning_and_ours():
    """Uniform logits: every token has log-probability -log V. OpenWeights' value sums each batch's mean loss
    and divides by len / batch_size: 3 examples in batches of 2 give 2 log V / 1.5."""
    import torch

    from app.callbacks import mean_logp
    from app.formatting import IGNORE, Encoded

    vocab = 16

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab))

    examples = [Encoded([1, 2, 3], [IGNORE, 2, 3], "a"), Encoded([1, 2], [IGNORE, 2], "b"),
                Encoded([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4], "c")]
    ours, theirs = mean_logp(Uniform(), examples, pad_id=0, batch_size=2)
    assert ours == pytest.approx(-math.log(vocab))
    assert theirs == pytest.approx(2 * math.log(vocab) / 1.5)


def test_a_trailing_assistant_message_is_a_prefill():
    from app.callbacks import render_prompt

    class Template:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
            return text + ("<assistant>" if add_generation_prompt else "")

    user = {"role": "user", "content": "Write is_even."}
    assert render_prompt(Template(), [user]) == "<user>Write is_even.</user><assistant>"
    prefilled = [user, {"role": "assistant", "content": "def is_even("}]
    assert render_prompt(Template(), prefilled) == "<user>Write is_even.</user><assistant>def is_even("


# --- training with OpenWeights' validated_params --------------------------------------------------------------------


def _parity_params(tiny_model: Path) -> dict:
    """Every hyperparameter away from its default where a few CPU steps can show it."""
    return dict(
        model=str(tiny_model), training_file=TRAIN, test_file=TEST, loss="sft", r=4, lora_alpha=8, lora_dropout=0.1,
        use_rslora=False, target_modules=["q_proj", "v_proj"], learning_rate="-3", lr_scheduler_type="cosine",
        warmup_steps=1, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_seq_length=512, logging_steps=1, save_steps=2, seed=11, optim="adamw_torch", weight_decay=0.0,
        test_file_eval_strategy="steps", test_file_eval_steps=0.5, eval_batch_size=4, job_id_suffix="owparity",
        meta={"experiment": "parity"},
    )


def _check_honoured(ow, validated: dict, result: dict, volume: Path) -> None:
    from transformers import get_cosine_schedule_with_warmup

    assert result["status"] == "completed", result["error"]
    ours = result["params"]["validated_params"]
    for key, value in validated.items():
        if key in OPENWEIGHTS_ONLY_FIELDS or key in ("finetuned_model_id", "learning_rate", "sampling_callbacks"):
            continue
        assert ours[key] == value, key
    assert ours["learning_rate"] == pytest.approx(1e-3) and ours["sampling_callbacks"] == []
    assert result["adjustments"] == []  # nothing replaced by the job (batch, optimizer, ...)
    assert result["outputs"]["global_step"] == 3  # max_steps
    job = volume / result["id"]
    model = Path(ours["finetuned_model_id"])
    assert model == job / ("merged" if validated["merge_before_push"] else "adapter")
    assert Path(result["outputs"]["model_path"]) == model and (model / "config.json" if model.name == "merged" else
                                                               model / "adapter_config.json").is_file()
    if model.name == "adapter":
        config = json.loads((model / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (4, 8, 0.1, False)
        assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=3)
    expected = {}
    for step in (1, 2, 3):  # the rate each optimizer step used, which the trainer logs for that step
        expected[step] = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
    logged = {r["step"]: r["learning_rate"] for r in records if "loss" in r}
    assert logged == pytest.approx(expected)
    evaluated = [r["step"] for r in records if "eval_loss" in r]
    assert 2 in evaluated and 1 not in evaluated  # test_file_eval_steps 0.5 of 3 steps: every 2 (transformers)
    # OpenWeights' Job reads the result; the result and the model are on the volume.
    parsed = ow.Job.from_row(result, None)
    assert (parsed.id, parsed.status) == (result["id"], "completed")
    assert (volume / "result.json").is_file() and (job / "result.json").is_file()


@pytest.mark.integration
def test_openweights_validated_params_train_through_the_config_file(ow, tiny_model, tmp_path, monkeypatch):
    validated = ow.validated_params(**_parity_params(tiny_model), merge_before_push=False)
    assert validated["output_dir"] == "./tmp"  # OpenWeights' checkpoint folder, relative to the working directory
    config = tmp_path / "validated.json"
    config.write_text(json.dumps(validated))
    volume, workdir = tmp_path / "volume", tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    assert run_cli(monkeypatch, {"FT_CONFIG_FILE": str(config), "FT_OUTPUT_DIR": str(volume)}, "train") == 0
    result = read_result(volume)
    assert result["ignored_params"] == sorted(OPENWEIGHTS_ONLY_FIELDS)
    _check_honoured(ow, validated, result, volume)
    assert list(workdir.iterdir()) == []  # nothing in ./tmp, nothing anywhere but the volume


@pytest.mark.integration
def test_openweights_validated_params_train_through_fine_tune(ow, tiny_model, tmp_path):
    from app.client import fine_tune

    checkpoints = tmp_path / "openweights-output-dir"
    validated = ow.validated_params(**_parity_params(tiny_model), output_dir=str(checkpoints))
    assert validated["merge_before_push"] is True  # OpenWeights' default: a merged model
    volume = tmp_path / "volume"
    job = fine_tune(ft_output_dir=volume, requires_vram_gb=24, allowed_hardware=["1x H100"], **validated)
    assert job.status == job["status"] == "completed" and json.loads(json.dumps(job)) == job
    assert job.ignored_params == sorted(OPENWEIGHTS_ONLY_FIELDS | {"allowed_hardware", "requires_vram_gb"})
    _check_honoured(ow, validated, job, volume)
    assert not checkpoints.exists()
