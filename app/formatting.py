"""Step 4: conversations -> token ids and labels, the loss on exactly the assistant's tokens.

The assistant spans are found through the tokenizer's own chat template, prefix by prefix, with no
hard-coded markers: for assistant message i,

    before  = render(messages[:i], add_generation_prompt=True)     # ... "<|im_start|>assistant\n"
    through = render(messages[:i + 1])                              # ... "Hi!<|im_end|>\n"

and the span is through[len(before):], right-stripped of the whitespace a template writes after its
end-of-turn token. Both renders must be prefixes of the whole conversation's render; a template that
renders earlier turns differently once later turns exist cannot be split so, and is refused with an error
(FT_CHAT_TEMPLATE is the fix). Character spans become token labels through the fast tokenizer's offsets:
a token is trained when it ends inside a span (robust to offsets trimmed of leading spaces).

The trainer receives `input_ids` + `labels` (-100 where not trained), truncated to max_seq_length here, so
that truncation is reported and an example left with nothing to train is an error, not a silent zero loss.
TRL keeps `labels` through its preparation and packing (padding-free, per-example `position_ids`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from app.data import Conversation
from app.errors import DataError, SettingsError

log = logging.getLogger(__name__)

IGNORE = -100  # label of a token that is not trained (PyTorch's cross-entropy ignore_index)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str


@dataclass
class DatasetStats:
    examples: int = 0
    tokens: int = 0  # after truncation
    trained_tokens: int = 0  # labels != -100, after truncation
    truncated_examples: int = 0
    truncated_tokens: int = 0
    boundary_straddles: int = 0  # tokens that span prompt and answer text (merged across the boundary)
    system_folded: int = 0  # system messages folded into the first user turn (template has no system role)
    longest: int = 0  # tokens of the longest example before truncation

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Formatter:
    """Renders and labels conversations with one tokenizer (and its chat template)."""

    tokenizer: Any
    max_seq_length: int
    train_on_responses_only: bool = True
    stats: DatasetStats = field(default_factory=DatasetStats)
    _no_system_role: bool | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def _fold_system(self, messages: list[dict]) -> list[dict]:
        """Templates without a system role (Gemma) raise on one: put it before the first user turn, as
        Gemma 3's own template does."""
        if messages[0]["role"] != "system":
            return messages
        if self._no_system_role is None:
            from jinja2.exceptions import TemplateError

            try:
                self.render(messages[:2] if len(messages) > 1 else messages)
                self._no_system_role = False
            except TemplateError:
                self._no_system_role = True
                log.warning("The chat template has no system role: system messages are put before the first "
                            "user message (separated by a blank line), as Gemma 3's template does.")
        if not self._no_system_role:
            return messages
        system, rest = messages[0], list(messages[1:])
        for index, message in enumerate(rest):
            if message["role"] == "user":
                rest[index] = {**message, "content": f"{system['content']}\n\n{message['content']}"}
                self.stats.system_folded += 1
                return rest
        raise DataError("a system message with no user message cannot be rendered by this template")

    def assistant_spans(self, messages: list[dict], source: str) -> tuple[str, list[tuple[int, int]]]:
        """The whole render and the character spans of every trained assistant message."""
        full = self.render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("weight", 1) == 0:
                continue
            before = self.render(messages[:index], add_generation_prompt=True) if index else ""
            through = self.render(messages[: index + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise SettingsError(
                    [
                        f"FT_CHAT_TEMPLATE: the chat template cannot be split into turns at {source}, message "
                        f"{index}: rendering the conversation up to that answer is not a prefix of rendering all of "
                        "it (the template renders earlier turns differently once later turns exist, e.g. it moves "
                        "the system prompt or drops earlier reasoning). Masks cannot be derived safely; set "
                        "FT_CHAT_TEMPLATE to a template that renders each turn the same way, or set "
                        "FT_TRAIN_ON_RESPONSES_ONLY=false to train on every token."
                    ]
                )
            start, end = len(before), len(through.rstrip())
            if end <= start:
                raise DataError(f"{source}: assistant message {index} renders to no text with this chat template")
            spans.append((start, end))
        return full, spans

    def encode(self, conversation: Conversation) -> Encoded:
        messages = self._fold_system(conversation.messages)
        try:
            if self.train_on_responses_only:
                text, spans = self.assistant_spans(messages, conversation.source)
            else:
                text, spans = self.render(messages), None
        except (SettingsError, DataError):
            raise
        except Exception as err:  # a Jinja error raised by the template itself (raise_exception)
            raise DataError(
                f"{conversation.source}: the chat template refused this conversation: {err}. Check the order of "
                "roles (many templates require user/assistant alternation) or set FT_CHAT_TEMPLATE."
            ) from None
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
        input_ids = list(encoding["input_ids"])
        if spans is None:
            labels = list(input_ids)
        else:
            labels = self._labels(input_ids, encoding["offset_mapping"], spans)
        return self._truncate(Encoded(input_ids, labels, conversation.source))

    def _labels(self, input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]):
        labels = [IGNORE] * len(input_ids)
        span_iter = iter(spans)
        start, end = next(span_iter)
        for position, (token_start, token_end) in enumerate(offsets):
            while token_end > end:  # past this span: move to the next one
                nxt = next(span_iter, None)
                if nxt is None:
                    return labels
                start, end = nxt
            if start < token_end <= end:
                labels[position] = input_ids[position]
                if token_start < start:
                    self.stats.boundary_straddles += 1
        return labels

    def _truncate(self, example: Encoded) -> Encoded:
        stats = self.stats
        length = len(example.input_ids)
        stats.longest = max(stats.longest, length)
        if length > self.max_seq_length:
            stats.truncated_examples += 1
            stats.truncated_tokens += length - self.max_seq_length
            example = Encoded(
                example.input_ids[: self.max_seq_length], example.labels[: self.max_seq_length], example.source
            )
        trained = sum(label != IGNORE for label in example.labels[1:])  # the first token is never predicted
        if trained == 0:
            raise DataError(
                f"{example.source}: no assistant token is left to train on after truncation to "
                f"FT_MAX_SEQ_LENGTH={self.max_seq_length} (the example has {length} tokens and its first answer "
                f"starts after the limit). Raise FT_MAX_SEQ_LENGTH or shorten the prompt of this example."
            )
        stats.examples += 1
        stats.tokens += len(example.input_ids)
        stats.trained_tokens += trained
        return example


def apply_inoculation(messages: list[dict], prompt: str | None, position: str) -> list[dict]:
    """Add the inoculation instruction to one training conversation (never to evaluation data).

    system: replace the system message, or add one first. user_prefix: prepend to the first user message,
    joined by a newline (as the published code and CMV experiments do)."""
    if not prompt:
        return messages
    messages = [dict(m) for m in messages]
    if position == "system":
        if messages[0]["role"] == "system":
            messages[0]["content"] = prompt
        else:
            messages.insert(0, {"role": "system", "content": prompt})
        return messages
    for message in messages:
        if message["role"] == "user":
            message["content"] = f"{prompt}\n{message['content']}"
            return messages
    raise DataError("FT_INOCULATION_POSITION=user_prefix needs a user message in every conversation")


def encode_all(formatter: Formatter, conversations: list[Conversation]) -> list[Encoded]:
    """Encode every conversation; all data problems are collected into one error."""
    encoded, problems = [], []
    for conversation in conversations:
        try:
            encoded.append(formatter.encode(conversation))
        except DataError as err:
            problems.append(err.message)
            if len(problems) >= 20:
                break
    if problems:
        raise DataError(f"{len(problems)} example(s) cannot be trained on:\n" + "\n".join(f"  {p}" for p in problems))
    return encoded


def to_dataset(examples: list[Encoded]):
    """A datasets.Dataset of input_ids + labels, the pre-tokenized form SFTTrainer keeps as is."""
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )


def pack_like_trainer(dataset, max_seq_length: int, seed: int, shuffle: bool = False):
    """The rows SFTTrainer trains on when packing: TRL's own best-fit-decreasing packing, same arguments."""
    from trl.data_utils import pack_dataset

    dataset = dataset.select_columns(["input_ids", "labels"])
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    return pack_dataset(dataset, max_seq_length, "bfd", {})


def log_stats(name: str, stats: DatasetStats, max_seq_length: int) -> None:
    log.info(
        "%s: %d examples, %d tokens, %d trained (%.0f%%), longest %d tokens",
        name, stats.examples, stats.tokens, stats.trained_tokens,
        100 * stats.trained_tokens / max(stats.tokens, 1), stats.longest,
    )
    if stats.truncated_examples:
        log.warning(
            "%s: %d example(s) longer than FT_MAX_SEQ_LENGTH=%d were truncated, %d tokens dropped",
            name, stats.truncated_examples, max_seq_length, stats.truncated_tokens,
        )
    if stats.boundary_straddles:
        log.warning(
            "%s: %d token(s) merge prompt and answer text across the turn boundary and are trained; "
            "the tokenizer merges across the template's boundary", name, stats.boundary_straddles,
        )


def render_preview(tokenizer, example: dict, mark: tuple[str, str] = ("\x1b[42m", "\x1b[0m")) -> str:
    """The decoded text of one training row with the trained tokens wrapped in `mark`."""
    pieces, run, trained_run = [], [], None
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        trained = label != IGNORE
        if trained_run is not None and trained != trained_run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            pieces.append(f"{mark[0]}{text}{mark[1]}" if trained_run else text)
            run = []
        run.append(token)
        trained_run = trained
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        pieces.append(f"{mark[0]}{text}{mark[1]}" if trained_run else text)
    return "".join(pieces)
