"""Steps 1 and 4: the data files, read and validated (no tokenizer), then tokenized into the trainer's rows.

    files = read_data(settings)                  # conversations + content hashes (the job id's)
    data = tokenize(settings, tokenizer, files)  # input_ids + labels, stats, the row lengths the plan needs
    rows_key(settings, inputs, stop_ids)         # equal for two runs whose tokenized rows are equal (a sweep reuses them)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from app.data import Conversation, file_sha256, load_conversations
from app.formatting import Formatter, apply_inoculation, encode_all, log_stats, pack_like_trainer, to_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataFiles:
    train: list[Conversation]
    test: list[Conversation]
    hashes: dict[str, str]  # content hashes of every input file, by role: part of the job id


@dataclass(frozen=True)
class TrainingData:
    train: Any  # datasets.Dataset of input_ids + labels
    eval: Any | None
    stats: dict[str, Any]  # per split: DatasetStats.as_dict(), for result.json's "data"
    lengths: list[int] = field(default_factory=list)  # tokens of each row the trainer trains on (packed rows when packing)
    stop_ids: list[int] = field(default_factory=list)  # the tokens inference stops on: answers are trained through one


def read_data(settings) -> DataFiles:
    """Every data file read and validated, with its content hash; no tokenizer needed."""
    train = load_conversations(settings.training_file, "FT_TRAINING_FILE")
    test = load_conversations(settings.test_file, "FT_TEST_FILE") if settings.test_file else []
    hashes = {"training_file": file_sha256(settings.training_file)}
    if settings.test_file:
        hashes["test_file"] = file_sha256(settings.test_file)
    for name, path in settings.logp_callback_datasets.items():
        load_conversations(path, f"FT_LOGP_CALLBACK_DATASETS[{name}]")
        hashes[f"logp:{name}"] = file_sha256(path)
    return DataFiles(train=train, test=test, hashes=hashes)


def tokenize(settings, tokenizer, files: DataFiles, stop_ids: list[int],
             embedding_rows: int | None = None) -> TrainingData:
    """The training rows (the inoculation instruction added: training data only, never test_file) and the
    evaluation rows, with the loss on the assistant's tokens through a token inference stops on (`stop_ids`:
    app/tokenizer.py inference_stop_ids). A row with a token id at or past `embedding_rows` (the model's
    vocab_size) is bad data (app.formatting.check_embedding)."""
    conversations = [
        Conversation(messages=apply_inoculation(c.messages, settings.inoculation_prompt, settings.inoculation_position),
                     source=c.source, extra=c.extra)
        for c in files.train
    ]
    formatter = Formatter(tokenizer, settings.max_seq_length, settings.train_on_responses_only, stop_ids=stop_ids,
                          embedding_rows=embedding_rows)
    train = to_dataset(encode_all(formatter, conversations))
    log_stats("training data", formatter.stats, settings.max_seq_length)
    stats = {"train": formatter.stats.as_dict()}
    evaluation = None
    if files.test:
        eval_formatter = Formatter(tokenizer, settings.max_seq_length, train_on_responses_only=True, stop_ids=stop_ids,
                                   embedding_rows=embedding_rows)
        evaluation = to_dataset(encode_all(eval_formatter, files.test))
        log_stats("test data", eval_formatter.stats, settings.max_seq_length)
        stats["test"] = eval_formatter.stats.as_dict()
    return TrainingData(train=train, eval=evaluation, stats=stats, lengths=row_lengths(settings, train),
                        stop_ids=list(stop_ids))


def row_lengths(settings, dataset) -> list[int]:
    """Tokens of each row the trainer will build: the examples, or TRL's packed rows when packing."""
    if settings.packing:
        packed = pack_like_trainer(dataset, settings.max_seq_length, settings.seed)
        return [sum(lengths) for lengths in packed["seq_lengths"]]
    return [len(ids) for ids in dataset["input_ids"]]


# Settings of the job id that do not change the tokenized rows (nor their lengths): lines of a sweep that differ only
# in these train on the same rows, tokenized once (app/backends/reuse.py). Anything not named here is in the key, so a
# setting added later keeps lines apart until it is listed. (Packed rows are packed in dataset order, as TRL packs
# them: the seed does not change them; the trainer shuffles them.)
NOT_IN_ROWS = frozenset({
    "seed", "epochs", "max_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim",
    "per_device_train_batch_size", "gradient_accumulation_steps", "r", "lora_alpha", "lora_dropout", "lora_bias",
    "use_rslora", "target_modules", "load_in_4bit", "is_peft", "merge_before_push", "job_id_suffix", "meta",
    "sampling_callbacks",
})


def rows_key(settings, inputs: dict[str, str], stop_ids: list[int]) -> str:
    """What the tokenized rows depend on: the job id's settings less NOT_IN_ROWS, the input files' and the base
    model's fingerprints (`inputs`, the job id's), and the tokens inference stops on."""
    names = {k: v for k, v in settings.identity().items() if k not in NOT_IN_ROWS}
    return json.dumps([names, sorted(inputs.items()), list(stop_ids)], sort_keys=True, default=str)
