"""OpenWeights' research callbacks, run locally during training, timed and measured as openweights 0.14.0's
(jobs/unsloth/logp_callback.py, sampling_callback.py, logprobs.py): at step 0 (before the first optimizer
step) and then every N steps; here also at the last step, so the final model is always measured.

- logp_callback_datasets {name: file}, every eval_every_n_steps -> one metrics.jsonl line per file:
  {"step", "epoch", "type": "logprobs", "tag": name, name: <OpenWeights' value>, "logp/<name>": <ours>}
  `<name>` is what OpenWeights logs under the dataset's name: a loss (positive), the mean over batches of
  eval_batch_size conversations of each batch's mean negative log-probability per scored token, summed and
  divided by len(file) / eval_batch_size (so a short last batch weighs as much as a full one). `logp/<name>`
  is the mean log-probability per scored token over the whole file (negative; independent of the batch
  size). Scored tokens: the assistant's when train_on_responses_only (as trained), else every token after the
  first, as OpenWeights does.
- sampling_callbacks [{dataset, eval_steps, batch_size, tag, temperature, max_tokens}], every eval_steps
  steps ("log": at every logging step) -> samples.jsonl, one line per conversation and sampling:
  {"step", "tag", "index", "messages", "completion", "temperature"}. Each conversation of the file is the
  prompt, rendered with the chat template's generation prompt; a trailing assistant message is a prefill
  (its text is appended after the generation prompt, and the completion is what the model writes after it,
  without the prefill), as in OpenWeights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from app.data import load_conversations
from app.formatting import IGNORE, Formatter, check_embedding, encode_all
from app.jobdir import append_jsonl

log = logging.getLogger(__name__)


def _append(path, records: list[dict[str, Any]]) -> None:
    append_jsonl(path, records)  # never through a link, no secret in it (app/jobdir.py)


# Keys of metrics.jsonl lines that a logp dataset's name must not overwrite (its value stays under logp/<name>).
_RESERVED_KEYS = {"step", "epoch", "type", "tag", "loss", "eval_loss", "learning_rate", "grad_norm"}


def mean_logp(model, examples, pad_id: int, batch_size: int) -> tuple[float, float]:
    """(mean log-probability per scored token over all examples, OpenWeights' logged value: the sum over
    batches of each batch's mean negative log-probability per scored token, divided by len(examples) /
    batch_size)."""
    device = next(model.parameters()).device
    total, count, openweights_sum = 0.0, 0, 0.0
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
        batch_total, batch_count = float((logp * valid).sum()), int(valid.sum())
        total += batch_total
        count += batch_count
        if batch_count:
            openweights_sum += -batch_total / batch_count
    return total / max(count, 1), openweights_sum / (len(examples) / batch_size)


class LogpCallback(TrainerCallback):
    def __init__(self, name: str, examples, tokenizer, every: int, batch_size: int, metrics_path, inference_mode):
        self.name, self.examples, self.tokenizer = name, examples, tokenizer
        self.every, self.batch_size, self.metrics_path = every, batch_size, metrics_path
        self.inference_mode = inference_mode  # the backend's: eval mode, no gradients (and its fast path)
        if name in _RESERVED_KEYS:
            log.warning("logp_callback_datasets: %r is a key of metrics.jsonl; its values are logged as logp/%s only",
                        name, name)

    def _measure(self, state, model) -> None:
        with self.inference_mode(model):
            value, openweights = mean_logp(model, self.examples, self.tokenizer.pad_token_id, self.batch_size)
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "type": "logprobs",
                  "tag": self.name}
        if self.name not in _RESERVED_KEYS:
            record[self.name] = openweights
        record[f"logp/{self.name}"] = value
        _append(self.metrics_path, [record])
        log.info("logp %s at step %d: %.4f (mean log-prob per token %.4f)", self.name, state.global_step,
                 openweights, value)

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
                    texts = [render_prompt(tok, messages) for messages in batch]
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

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # not again when resuming
            self.sample(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._due(state):
            self.sample(state, model)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if self.config.eval_steps == "log" and logs and "loss" in logs:
            self.sample(state, model)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model continues: the conversation and the generation prompt; a trailing assistant message
    is a prefill, appended after the generation prompt (OpenWeights' sampling_callback._sample)."""
    if messages[-1]["role"] == "assistant":
        head = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return head + messages[-1]["content"]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompts_of(path, tokenizer, embedding_rows: int | None = None) -> list[list[dict]]:
    """Each conversation of a file (role and content), a trailing assistant message included as the prefill;
    refused (DataError, naming the line) where its rendered prompt has a token past the model's embedding."""
    conversations = load_conversations(path, "FT_SAMPLING_CALLBACKS", require_assistant=False)
    prompts = [[{"role": m["role"], "content": m["content"]} for m in c.messages] for c in conversations]
    if embedding_rows is not None:
        for conversation, messages in zip(conversations, prompts, strict=True):
            ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
            check_embedding(tokenizer, ids, embedding_rows, conversation.source)
    return prompts


def research_callbacks(settings, tokenizer, job, backend, stop_ids: list[int],
                       embedding_rows: int | None = None) -> list[TrainerCallback]:
    """Rank 0 alone measures and samples (on its own copy of the weights): one metrics and samples file."""
    from app.launch import is_main

    callbacks: list[TrainerCallback] = []
    if not is_main():
        return callbacks
    for name, path in settings.logp_callback_datasets.items():
        formatter = Formatter(tokenizer, settings.max_seq_length, settings.train_on_responses_only, stop_ids=stop_ids,
                              embedding_rows=embedding_rows)
        examples = encode_all(formatter, load_conversations(path, f"FT_LOGP_CALLBACK_DATASETS[{name}]"))
        callbacks.append(LogpCallback(name, examples, tokenizer, settings.eval_every_n_steps,
                                      settings.eval_batch_size, job.metrics, backend.inference_mode))
    for config in settings.sampling_callbacks:
        callbacks.append(SamplingCallback(config, prompts_of(config.dataset, tokenizer, embedding_rows), tokenizer,
                                          job.samples, backend.inference_mode))
    return callbacks
    for name, path in settings.logp_callback_datasets.items():
        formatter = Formatter(tokenizer, settings.max_seq_length, settings.train_on_responses_only, stop_ids=stop_ids)
        examples = encode_all(formatter, load_conversations(path, f"FT_LOGP_CALLBACK_DATASETS[{name}]"))
        callbacks.append(LogpCallback(name, examples, tokenizer, settings.eval_every_n_steps,
                                      settings.eval_batch_size, job.metrics, backend.inference_mode))
    for config in settings.sampling_callbacks:
        callbacks.append(SamplingCallback(config, prompts_of(config.dataset), tokenizer, job.samples,
                                          backend.inference_mode))
    return callbacks
