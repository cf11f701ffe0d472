"""The benchmark's training file: the bundled sample conversations, repeated until the run has enough tokens.

    tokenizer = tokenizer_of(model_dir)    # the model folder's, as the job loads it (app/tokenizer.py)
    stats = build(out / "data.jsonl", seq=2048, rows=(warmup + steps) * micro_batch * accumulation, tokenizer)

Each repetition of data/sample/train.jsonl is shuffled with its own fixed seed (seed + repetition), and whole
conversations are appended until the file holds rows x seq tokens plus a margin (packing never fills a row
exactly, and both paths must run out of nothing). Tokens are counted exactly, with the benchmark models'
tokenizer through the job's own Formatter, so the same numbers give the mean attended context of the packed
documents that MFU needs (bench/flops.py).

The tokenizer is loaded from a model folder as the job loads it (app.tokenizer.tokenizer_of): every shape's
folder holds the same one.

    stats = build_count(out / "code_train.jsonl", conversations=717, tokenizer)   # the sweep row (bench/sweep.py)

writes a file of a given number of conversations instead, in the same shuffled repetitions: the bundled sample's
conversations are a few hundred tokens each, as the published code run's 717 MBPP conversations are.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from app.data import load_conversations
from app.devmodel import SAMPLE_DIR
from app.formatting import Formatter

MARGIN = 0.2  # extra tokens beyond what (warmup + steps) optimizer steps consume


@dataclass
class DataStats:
    path: str
    seq: int
    target_tokens: int
    conversations: int
    tokens: int  # after truncation to seq, as the trainer receives them
    trained_tokens: int
    longest: int
    ctx_mean: float  # mean attended length per token, block-diagonal causal: sum n(n+1)/2 / sum n
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def ctx_mean(lengths: list[int]) -> float:
    """Mean attended length per token when each document only attends to itself, causally: token i of a
    document attends i + 1 tokens, so a document of n tokens contributes n(n+1)/2 over n tokens."""
    total = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / total if total else 0.0


def build(out: Path, seq: int, rows: int, tokenizer, seed: int = 3407, margin: float = MARGIN,
          source: Path = SAMPLE_DIR / "train.jsonl") -> DataStats:
    """Write `out` (JSONL of {"messages": [...]}) and `out`.json (its DataStats); deterministic."""
    out = Path(out)
    formatter = Formatter(tokenizer, seq)
    base = load_conversations(source)
    encoded = [formatter.encode(conversation) for conversation in base]
    lengths = [len(e.input_ids) for e in encoded]
    trained = [sum(label != -100 for label in e.labels[1:]) for e in encoded]
    target = math.ceil(rows * seq * (1 + margin))
    chosen: list[int] = []
    total, repetition = 0, 0
    while total < target:
        order = list(range(len(base)))
        random.Random(seed + repetition).shuffle(order)
        for index in order:
            chosen.append(index)
            total += lengths[index]
            if total >= target:
                break
        repetition += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for index in chosen:
            conversation = base[index]
            handle.write(json.dumps({"messages": conversation.messages, **conversation.extra}, ensure_ascii=False) + "\n")
    used = [lengths[i] for i in chosen]
    stats = DataStats(path=str(out), seq=seq, target_tokens=target, conversations=len(chosen), tokens=sum(used),
                      trained_tokens=sum(trained[i] for i in chosen), longest=max(used), ctx_mean=ctx_mean(used),
                      seed=seed)
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(stats.as_dict(), indent=2))
    return stats


def build_count(out: Path, conversations: int, tokenizer, seed: int = 3407,
                source: Path = SAMPLE_DIR / "train.jsonl") -> DataStats:
    """Write `out` with exactly `conversations` conversations of `source`, each repetition shuffled with its own
    fixed seed (seed + repetition); `out`.json gets its DataStats (seq: the longest conversation)."""
    out = Path(out)
    base = load_conversations(source)
    chosen: list[int] = []
    repetition = 0
    while len(chosen) < conversations:
        order = list(range(len(base)))
        random.Random(seed + repetition).shuffle(order)
        chosen += order[: conversations - len(chosen)]
        repetition += 1
    formatter = Formatter(tokenizer, 1_000_000)  # no truncation: the lengths as written
    encoded = [formatter.encode(conversation) for conversation in base]
    lengths = [len(e.input_ids) for e in encoded]
    trained = [sum(label != -100 for label in e.labels[1:]) for e in encoded]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for index in chosen:
            conversation = base[index]
            handle.write(json.dumps({"messages": conversation.messages, **conversation.extra}, ensure_ascii=False) + "\n")
    used = [lengths[i] for i in chosen]
    stats = DataStats(path=str(out), seq=max(used), target_tokens=sum(used), conversations=len(chosen),
                      tokens=sum(used), trained_tokens=sum(trained[i] for i in chosen), longest=max(used),
                      ctx_mean=ctx_mean(used), seed=seed)
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(stats.as_dict(), indent=2))
    return stats
