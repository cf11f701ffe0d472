"""End to end on the CPU with the tiny model: the files written, the result, the adapter, reruns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import SAMPLE, read_result, run_cli, smoke_env

pytestmark = pytest.mark.integration


def test_train_writes_result_adapter_metrics_and_plot(tiny_model, tmp_path, monkeypatch):
    env = smoke_env(tiny_model, tmp_path, test_file=SAMPLE / "test.jsonl", meta='{"experiment": "h1"}')
    assert run_cli(monkeypatch, env, "train") == 0
    result = read_result(tmp_path)
    job = tmp_path / result["id"]
    assert result["status"] == "completed" and result["error"] is None
    assert result["id"].startswith("ftjob-") and len(result["id"]) == len("ftjob-") + 12
    params = result["params"]["validated_params"]
    assert params["finetuned_model_id"] == str(job / "adapter") == result["outputs"]["model_path"]
    assert params["meta"] == {"experiment": "h1"} and params["max_steps"] == 4
    outputs = result["outputs"]
    assert outputs["global_step"] == 4 and outputs["train_tokens"] > 0 and outputs["tokens_per_second"] > 0
    assert outputs["train_loss"] > 0 and outputs["eval_loss"] > 0
    assert result["versions"]["trl"] == "1.14.2" and result["backend"] == "hf"
    assert json.loads((job / "result.json").read_text()) == result
    assert {p.name for p in job.iterdir()} >= {"adapter", "checkpoints", "metrics.jsonl", "loss.png", "result.json"}
    assert (job / "adapter" / "adapter_model.safetensors").is_file()
    assert (job / "adapter" / "tokenizer.json").is_file() and (job / "adapter" / "chat_template.jinja").is_file()
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (job / "adapter").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors writes 0600: readable like every other file
    lines = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if "loss" in r]
    assert train_steps == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "eval_loss" in r][0] == 0  # evaluated before training
    assert lines[-1]["step"] == 4 and "eval_loss" in lines[-1]  # and at the end
    assert not list((job / "checkpoints").glob(".staging/*"))


def test_adapter_loads_onto_base_and_generates(tiny_model, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert run_cli(monkeypatch, smoke_env(tiny_model, tmp_path), "train") == 0
    adapter = Path(read_result(tmp_path)["params"]["validated_params"]["finetuned_model_id"])
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write is_even(n)."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        base_logits = base(**prompt).logits
    model = PeftModel.from_pretrained(base, adapter)
    with torch.no_grad():
        tuned_logits = model(**prompt).logits
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8
    assert not torch.allclose(base_logits, tuned_logits)  # the adapter is loaded and changes the model


def test_lora_weights_change_and_base_weights_do_not(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from app.pipeline import setup
    from app.settings import load_settings
    from app.signals import StopRequest
    from app.trainer import build_trainer

    settings, _ = load_settings(model=str(tiny_model), training_file=str(SAMPLE / "train.jsonl"),
                                output_dir=str(tmp_path), max_steps=3, learning_rate=1e-2, warmup_steps=0,
                                per_device_train_batch_size=2, gradient_accumulation_steps=1, optim="adamw_torch",
                                max_seq_length=512)
    session = setup(settings)
    model = session.model
    base_before = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    lora_before = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    assert lora_before and all(v.requires_grad for k, v in model.named_parameters() if "lora_" in k)
    build_trainer(session, StopRequest()).trainer.train()
    session.close()
    after = dict(model.named_parameters())
    changed = [k for k, v in lora_before.items() if not torch.equal(v, after[k].detach())]
    assert len(changed) == len(lora_before), "every LoRA matrix must be updated"
    for name, value in model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(base_before[key], value), f"base weight {key} changed"


def test_rerun_of_a_completed_job_returns_its_result_without_training(tiny_model, tmp_path, monkeypatch):
    env = smoke_env(tiny_model, tmp_path)
    assert run_cli(monkeypatch, env, "train") == 0
    first = read_result(tmp_path)
    adapter = Path(first["outputs"]["model_path"]) / "adapter_model.safetensors"
    stamp = adapter.stat().st_mtime_ns
    assert run_cli(monkeypatch, env, "train") == 0
    assert read_result(tmp_path) == first
    assert adapter.stat().st_mtime_ns == stamp  # nothing retrained or rewritten
    # Different settings: a different job, nothing overwritten.
    assert run_cli(monkeypatch, {**env, "FT_SEED": "7"}, "train") == 0
    second = read_result(tmp_path)
    assert second["id"] != first["id"] and Path(first["outputs"]["model_path"]).is_dir()
    # FT_OVERWRITE=true is the only way to retrain a completed job.
    assert run_cli(monkeypatch, {**env, "FT_OVERWRITE": "true"}, "train") == 0
    assert read_result(tmp_path)["id"] == first["id"] and adapter.stat().st_mtime_ns != stamp


def test_job_id_depends_on_data_content_not_path(tiny_model, tmp_path):
    from app.pipeline import check
    from app.result import Recorder
    from app.settings import load_settings

    same = tmp_path / "same.jsonl"
    same.write_bytes((SAMPLE / "train.jsonl").read_bytes())
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("\n".join((SAMPLE / "train.jsonl").read_text().splitlines()[:-1]) + "\n")
    ids = []
    for path in (SAMPLE / "train.jsonl", same, fewer):
        settings, _ = load_settings(model=str(tiny_model), training_file=str(path), output_dir=str(tmp_path))
        ids.append(check(settings, Recorder(settings=settings))["job_id"])
    assert ids[0] == ids[1] != ids[2]


def test_merged_model_is_saved_whole_and_loads(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    env = smoke_env(tiny_model, tmp_path, merge_before_push="true")
    assert run_cli(monkeypatch, env, "train") == 0
    result = read_result(tmp_path)
    merged = Path(result["params"]["validated_params"]["finetuned_model_id"])
    assert merged.name == "merged" and (merged / "config.json").is_file()
    assert (merged.parent / "adapter").is_dir()  # the adapter is kept too: nothing lost if merging failed
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_preview_json_is_what_the_trainer_trains_on(tiny_model, tmp_path, monkeypatch):
    from app.pipeline import setup
    from app.settings import load_settings
    from app.signals import StopRequest
    from app.trainer import build_trainer

    for packing in ("false", "true"):
        out = tmp_path / f"preview-{packing}.json"
        env = smoke_env(tiny_model, tmp_path, packing=packing)
        assert run_cli(monkeypatch, env, "preview", "-n", "5", "--json", str(out)) == 0
        rows = json.loads(out.read_text())
        settings, _ = load_settings(**{k[3:].lower(): v for k, v in env.items()})
        session = setup(settings)
        trainer = build_trainer(session, StopRequest()).trainer
        session.close()
        trained_rows = trainer.train_dataset.select(range(5))
        assert [r["input_ids"] for r in rows] == [list(r["input_ids"]) for r in trained_rows]
        assert [r["labels"] for r in rows] == [list(r["labels"]) for r in trained_rows]
        assert all(any(label != -100 for label in r["labels"]) for r in rows)
        assert all(label == -100 or label == token for r in rows for token, label in zip(r["input_ids"], r["labels"], strict=True))


def test_the_loaded_base_is_kept_out_of_garbage_collection_until_the_run_ends(tiny_model, tmp_path, monkeypatch):
    """After the base is loaded the heap is frozen (gc.freeze: unsloth's get_peft_model and the trainer collect
    garbage many times, and each collection would walk every object of the libraries and the model again); the
    run thaws it when it ends, so nothing stays frozen in a process that goes on."""
    import gc

    from app.backends.hf import HfBackend

    frozen = []
    real = HfBackend.add_lora
    monkeypatch.setattr(HfBackend, "add_lora", lambda self, *a: frozen.append(gc.get_freeze_count()) or real(self, *a))
    assert gc.get_freeze_count() == 0
    assert run_cli(monkeypatch, smoke_env(tiny_model, tmp_path), "train") == 0
    assert frozen and frozen[0] > 10_000  # the libraries and the model: every object alive after loading
    assert gc.get_freeze_count() == 0
    monkeypatch.setattr(HfBackend, "add_lora", lambda *a: 1 / 0)  # a failed run thaws it too
    assert run_cli(monkeypatch, smoke_env(tiny_model, tmp_path / "failed", seed="1"), "train") != 0
    assert gc.get_freeze_count() == 0
