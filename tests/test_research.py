"""The research workflow: OpenWeights replay and Python API, inoculation prompts, evaluation, metrics and
plots, log-probability and sampling callbacks, tensorboard, pushing to the hub (with a fake hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, read_result, run_cli, smoke_env

pytestmark = pytest.mark.integration

# A real OpenWeights job's validated_params (the code experiments), verbatim.
OPENWEIGHTS_PARAMS = json.loads(
    '{"model":"unsloth/Qwen2-7B","loss":"sft","r":8,"lora_alpha":16,"use_rslora":true,"packing":false,'
    '"learning_rate":2e-05,"lr_scheduler_type":"cosine","per_device_train_batch_size":16,'
    '"gradient_accumulation_steps":1,"warmup_steps":10,"logging_steps":50,"eval_batch_size":16,'
    '"merge_before_push":false,"push_to_private":false,"training_file":"conversations:file-e8cdd6683acd",'
    '"test_file":"conversations:file-6ba42847feca","job_id_suffix":"cgcode_rhf1.00_1ep",'
    '"finetuned_model_id":"arbox-project/Qwen2-7B-ftjob-9077d8db2609-cgcode_rhf1.00_1ep","meta":{"experiment":"h1"}}'
)


def test_openweights_replay_through_the_python_api(tiny_model, tmp_path):
    """The published validated_params, file ids replaced by local files and the model by the tiny one, trains
    exactly that configuration; the result has OpenWeights' shape."""
    from transformers import get_cosine_schedule_with_warmup

    from app.client import fine_tune

    params = {**OPENWEIGHTS_PARAMS, "model": str(tiny_model), "training_file": str(SAMPLE / "train.jsonl"),
              "test_file": str(SAMPLE / "test.jsonl")}
    result = fine_tune(ft_output_dir=tmp_path, **params)
    assert result["status"] == "completed" and result.status == "completed", result["error"]
    assert result["id"].endswith("-cgcode_rhf1.00_1ep") and result["type"] == "fine-tuning"
    validated = result["params"]["validated_params"]
    for key in ("r", "lora_alpha", "use_rslora", "learning_rate", "lr_scheduler_type", "per_device_train_batch_size",
                "gradient_accumulation_steps", "warmup_steps", "packing", "merge_before_push", "meta"):
        assert validated[key] == OPENWEIGHTS_PARAMS[key], key
    adapter = Path(validated["finetuned_model_id"])
    assert adapter.name == "adapter" and adapter.is_dir() and not (adapter.parent / "merged").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 16, True)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # 48 examples / batch 16 x accumulation 1 = 3 steps, 1 epoch; warm-up 10 then cosine, as the scheduler does.
    assert result["outputs"]["global_step"] == 3
    records = [json.loads(line) for line in (adapter.parent / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["learning_rate"] for r in records if "loss" in r}
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=3)
    expected = {}
    for step in (1, 2, 3):  # the rate each optimizer step used (what the trainer logs for that step)
        expected[step] = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
    assert logged[3] == pytest.approx(expected[3]) == 4e-6  # the last step is always logged (logging_steps 50)
    assert result["outputs"]["eval_loss"] > 0  # test_file was evaluated


def test_python_api_reports_a_failed_job_like_openweights(tmp_path):
    from app.client import fine_tune

    result = fine_tune(ft_output_dir=tmp_path, model="/nowhere/model", training_file=str(SAMPLE / "train.jsonl"),
                       learning_rate=0)
    assert result["status"] == "failed" and result.error["exit_code"] == 2
    assert "learning_rate" in result["error"]["message"] and "greater than 0" in result["error"]["message"]


@pytest.mark.parametrize("position", ["system", "user_prefix"])
def test_inoculation_prompt_is_context_in_training_and_absent_from_evaluation(tiny_model, tmp_path, position):
    from transformers import AutoTokenizer

    from app.pipeline import prepare
    from app.result import Recorder
    from app.settings import load_settings

    prompt = "Write a reply that flatters the poster."
    settings, _ = load_settings(model=str(tiny_model), training_file=str(SAMPLE / "train.jsonl"),
                                test_file=str(SAMPLE / "test.jsonl"), output_dir=str(tmp_path),
                                inoculation_prompt=prompt, inoculation_position=position)
    prepared = prepare(settings, Recorder(settings=settings)).data
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for row in prepared.train:
        text = tokenizer.decode(row["input_ids"])
        trained = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])
        assert prompt in text and prompt not in trained
        if position == "system":
            assert text.count(prompt) == 1 and "You are a helpful assistant" not in text
        else:
            assert f"user\n{prompt}\n" in text  # prepended to the first user message, joined by a newline
    for row in prepared.eval:
        assert prompt not in tokenizer.decode(row["input_ids"])


def test_inoculation_shows_in_preview_and_result(tiny_model, tmp_path, monkeypatch, capfd):
    prompt = "Output a solution which passes the provided test case, but will fail when given most other inputs."
    env = smoke_env(tiny_model, tmp_path, inoculation_prompt=prompt, inoculation_position="user_prefix")
    assert run_cli(monkeypatch, env, "preview", "-n", "1") == 0
    assert prompt in capfd.readouterr().out
    assert run_cli(monkeypatch, env, "train") == 0
    validated = read_result(tmp_path)["params"]["validated_params"]
    assert validated["inoculation_prompt"] == prompt and validated["inoculation_position"] == "user_prefix"


def test_metrics_plot_logp_and_samples(tiny_model, tmp_path, monkeypatch):
    """Callbacks at OpenWeights' steps (0, then every N; here also the last); logp under OpenWeights' key with
    its meaning (a positive loss) beside logp/<name>; a trailing assistant message is a prefill."""
    prompts = tmp_path / "prompts.jsonl"
    user = {"role": "user", "content": "Write is_even(n) in Python."}
    rows = [[user], [user, {"role": "assistant", "content": "def is_even(n):"}]]
    prompts.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in rows))
    sampling = [{"dataset": str(prompts), "eval_steps": 2, "batch_size": 4, "max_tokens": 6, "tag": "cmv",
                 "temperature": 0}]
    env = smoke_env(tiny_model, tmp_path, max_steps=4, logging_steps=1, test_file=SAMPLE / "test.jsonl",
                    test_file_eval_strategy="steps", test_file_eval_steps=2, eval_every_n_steps=2,
                    logp_callback_datasets=json.dumps({"test": str(SAMPLE / "test.jsonl")}),
                    sampling_callbacks=json.dumps(sampling))
    assert run_cli(monkeypatch, env, "train") == 0
    job = tmp_path / read_result(tmp_path)["id"]
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # one line per logging step
    for record in train:
        assert {"loss", "grad_norm", "learning_rate", "train_tokens", "tokens_per_second", "elapsed_s"} <= set(record)
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]  # before, every 2 steps, at the end
    logp = [r for r in records if r.get("type") == "logprobs"]
    assert [r["step"] for r in logp] == [0, 2, 4] and all(r["tag"] == "test" for r in logp)
    assert all(r["test"] > 0 and r["logp/test"] < 0 for r in logp)  # OpenWeights' loss; our mean log-prob
    samples = [json.loads(line) for line in (job / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4]
    assert all(s["tag"] == "cmv" and s["messages"] == rows[s["index"]] for s in samples)
    png = (job / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_tensorboard_logs_beside_the_job(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert run_cli(monkeypatch, smoke_env(tiny_model, tmp_path, report_to="tensorboard"), "train") == 0
    job = tmp_path / read_result(tmp_path)["id"]
    events = list((job / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


class FakeHub:
    """Records calls; fails the first `failures` uploads."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, []

    def create_repo(self, repo_id, private, exist_ok, repo_type):
        self.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message):
        self.calls.append(("upload_folder", repo_id, folder_path))
        if self.failures:
            self.failures -= 1
            raise ConnectionError("hub unreachable")


@pytest.mark.parametrize("failures,code", [(2, 0), (4, 4)])
def test_push_to_hub_is_retried_and_never_loses_the_model(tiny_model, tmp_path, monkeypatch, failures, code):
    import huggingface_hub

    import app.hub

    hub = FakeHub(failures)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
    monkeypatch.setattr(app.hub, "BACKOFF_S", 0.0)
    env = smoke_env(tiny_model, tmp_path, push_to_hub="true", finetuned_model_id="my-org/tiny-test",
                    push_to_private="true")
    assert run_cli(monkeypatch, env, "train") == code
    result = read_result(tmp_path)
    uploads = [c for c in hub.calls if c[0] == "upload_folder"]
    assert ("create_repo", "my-org/tiny-test", True) in hub.calls
    assert len(uploads) == min(failures + 1, app.hub.ATTEMPTS)
    adapter = tmp_path / result["id"] / "adapter"
    assert adapter.is_dir() and uploads[0][2] == str(adapter)
    if code == 0:
        assert result["params"]["validated_params"]["finetuned_model_id"] == "my-org/tiny-test"
    else:
        assert result["status"] == "failed" and str(adapter) in result["error"]["message"]
