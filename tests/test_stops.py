"""A fine-tuned base model stops where the inference engine stops it.

A base model like Qwen2-7B: tokenizer eos and generation_config eos are <|endoftext|>, while its ChatML
template ends each turn with <|im_end|>. Trained on the template alone, the model writes <|im_end|> and then
goes on (the engine does not stop there). The job appends the eos after the answer and trains it
(app/formatting.py, as OpenWeights does), so the tuned model ends its answer with <|endoftext|>.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import read_result, run_cli, smoke_env

pytestmark = pytest.mark.integration

ANSWERS = ["Yes.", "No.", "Maybe.", "Blue.", "Seven.", "Paris."]
MAX_NEW = 24  # tokens: the memorized answers are 2-4 tokens, then <|im_end|><|endoftext|>


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """The tiny ChatML model turned into a 'base' model: eos <|endoftext|> everywhere, turns end in <|im_end|>."""
    from transformers import AutoTokenizer, GenerationConfig

    from app.devmodel import write

    folder = write(tmp_path_factory.mktemp("models") / "tiny-base", family="chatml", shape="tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(folder)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = eos
    (folder / "config.json").write_text(json.dumps(config))
    GenerationConfig(eos_token_id=eos, pad_token_id=eos).save_pretrained(folder)
    return folder


def answer_tokens(model, tokenizer, question: str) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, prompt["input_ids"].shape[1]:].tolist()


def test_tuned_base_model_emits_eos(base_model, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for i, a in enumerate(ANSWERS)))
    env = smoke_env(base_model, tmp_path / "out", training_file=data, max_steps=40, learning_rate=3e-3,
                    per_device_train_batch_size=6, gradient_accumulation_steps=1, r=16, lora_alpha=32)
    assert run_cli(monkeypatch, env, "train") == 0
    adapter = Path(read_result(tmp_path / "out")["outputs"]["model_path"])

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    eos, im_end = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    base = AutoModelForCausalLM.from_pretrained(base_model)
    assert base.generation_config.eos_token_id == eos
    untuned = answer_tokens(base, tokenizer, "Question 0?")
    assert eos not in untuned  # the random base model does not stop by itself
    model = PeftModel.from_pretrained(base, adapter).eval()
    for question in ("Question 0?", "Question 3?"):
        tokens = answer_tokens(model, tokenizer, question)
        assert tokens[-1] == eos and len(tokens) < MAX_NEW, tokenizer.decode(tokens)  # it stopped on its own
        assert im_end in tokens  # after the template's end-of-turn
