"""OpenWeights' research callbacks, run locally during training.

- logp_callback_datasets {name: file}: every eval_every_n_steps steps (and at the first and last step),
  the mean log-probability per assistant token of each file -> metrics.jsonl as `logp/<name>`.
- sampling_callbacks [{dataset, eval_steps, batch_size, tag, temperature, max_tokens}]: the prompts of a
  file (each conversation up to its last assistant message) answered by the model being trained, every
  eval_steps steps ("log": at every logging step) -> samples.jsonl, one line per completion.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from transformers import TrainerCallback

from app.data import load_conversations
from app.formatting import IGNORE, Formatter, encode_all

log = logging.getLogger(__name__)


def _append(path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def mean_logp(model, examples, pad_id: int, batch_size: int) -> float:
    """Mean log-probability per trained (assistant) token over encoded examples."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example.input_ids)
            ids[row, :n] = torch.tensor(example.input_ids)
            labels[row, :n] = torch.tensor(example.labels)
            mask[row, :n] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        valid = target != IGNORE
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total += float((logp * valid).sum())
        count += int(valid.sum())
    return total / max(count, 1)


class LogpCallback(TrainerCallback):
    def __init__(self, name: str, examples, tokenizer, every: int, batch_size: int, metrics_path, inference_mode):
        self.name, self.examples, self.tokenizer = name, examples, tokenizer
        self.every, self.batch_size, self.metrics_path = every, batch_size, metrics_path
        self.inference_mode = inference_mode  # the backend's: eval mode, no gradients (and its fast path)

    def _measure(self, state, model) -> None:
        with self.inference_mode(model):
            value = mean_logp(model, self.examples, self.tokenizer.pad_token_id, self.batch_size)
        _append(self.metrics_path, [{"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                                     f"logp/{self.name}": value}])
        log.info("logp/%s at step %d: %.4f", self.name, state.global_step, value)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._measure(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._measure(state, model)


class SamplingCallback(TrainerCallback):
    def __init__(self, config, prompts: list[list[dict]], tokenizer, samples_path, inference_mode):
        self.config, self.prompts, self.tokenizer, self.path = config, prompts, tokenizer, samples_path
        self.inference_mode = inference_mode  # the backend's: eval mode, no gradients (and its fast path)

    def _due(self, state) -> bool:
        if self.config.eval_steps == "log":
            return False  # handled in on_log
        return state.global_step % self.config.eval_steps == 0 or state.global_step == state.max_steps

    def sample(self, state, model) -> None:
        cfg, tok = self.config, self.tokenizer
        device = next(model.parameters()).device
        records = []
        side = tok.padding_side
        tok.padding_side = "left"  # generation continues from the right end of every prompt
        try:
            with self.inference_mode(model):
                for start in range(0, len(self.prompts), cfg.batch_size):
                    batch = self.prompts[start : start + cfg.batch_size]
                    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
                    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                    kwargs = dict(max_new_tokens=cfg.max_tokens, pad_token_id=tok.pad_token_id, use_cache=True)
                    if cfg.temperature > 0:
                        kwargs.update(do_sample=True, temperature=cfg.temperature)
                    else:
                        kwargs.update(do_sample=False)
                    out = model.generate(**enc, **kwargs)
                    for index, row in enumerate(out[:, enc["input_ids"].shape[1]:]):
                        records.append({
                            "step": state.global_step, "tag": cfg.tag, "index": start + index,
                            "messages": batch[index], "completion": tok.decode(row, skip_special_tokens=True),
                            "temperature": cfg.temperature,
                        })
        finally:
            tok.padding_side = side
        _append(self.path, records)
        log.info("%s: %d samples at step %d -> %s", cfg.tag, len(records), state.global_step, self.path.name)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._due(state):
            self.sample(state, model)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if self.config.eval_steps == "log" and logs and "loss" in logs:
            self.sample(state, model)


def prompts_of(path) -> list[list[dict]]:
    """Each conversation of a file up to (not including) its last assistant message."""
    prompts = []
    for conversation in load_conversations(path, "FT_SAMPLING_CALLBACKS", require_assistant=False):
        messages = conversation.messages
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        prompts.append([{"role": m["role"], "content": m["content"]} for m in messages[:last]])
    return prompts


def research_callbacks(settings, tokenizer, job, backend) -> list[TrainerCallback]:
    """Rank 0 alone measures and samples (on its own copy of the weights): one metrics and samples file."""
    from app.launch import is_main

    callbacks: list[TrainerCallback] = []
    if not is_main():
        return callbacks
    for name, path in settings.logp_callback_datasets.items():
        formatter = Formatter(tokenizer, settings.max_seq_length, train_on_responses_only=True)
        examples = encode_all(formatter, load_conversations(path, f"FT_LOGP_CALLBACK_DATASETS[{name}]"))
        callbacks.append(LogpCallback(name, examples, tokenizer, settings.eval_every_n_steps,
                                      settings.eval_batch_size, job.metrics, backend.inference_mode))
    for config in settings.sampling_callbacks:
        callbacks.append(SamplingCallback(config, prompts_of(config.dataset), tokenizer, job.samples,
                                          backend.inference_mode))
    return callbacks
