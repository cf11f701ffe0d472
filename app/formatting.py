"""Step 4: conversations -> token ids and labels, the loss on exactly what the model writes for each answer.

The rule (DESIGN.md, "Training on responses only"): for every trained assistant message, the trained tokens
are exactly what the model must generate at inference for that turn: its content, the template's own markers
that the model writes (e.g. an empty think block where the template makes the model write one) and the
end-of-turn; nothing of system or user turns. Inference shows the model

    context    = render(messages[:i], add_generation_prompt=True)   # ... "<|im_start|>assistant\n"

and the model writes the `completion` that follows it. The completion is found through the tokenizer's own
chat template (no hard-coded markers) by the first of these that applies (Formatter._completion):

  1. render(messages[:i + 1]) starts with the context: the completion is the rest (ChatML, Llama 3, Gemma,
     Phi-4, Qwen3: its generation prompt leaves the think block to the model, so the empty
     "<think>\n\n</think>\n\n" the template writes into the last answer is written by the model and trained).
  2. The template moves the system prompt (Mistral v0.3/Nemo attach it to the last user turn only while that
     turn is last): the completion is rule 1's on the conversation without the system message; the context
     keeps the system prompt where inference puts it.
  3. The generation prompt holds text the answer's render lacks (Gemma 4's closed empty thought channel,
     DeepSeek-R1's open "<think>\n"): that text is context; the model writes the answer as the template renders
     it after its header, or, when the prompt opens a think block, the reasoning from the message (or an empty
     one) and the close of the block, then the answer.
  Otherwise the conversation is refused (SettingsError, exit 2) naming file:line, the message and why.

The completion ends at the first token the inference engine stops on (`stop_ids`: the model's
generation_config eos ids, plus the tokenizer's eos), so text a template appends after it (Phi-3.5's
"<|endoftext|>" on every render without a generation prompt) is never trained. When the completion holds no
such token (a base model: Qwen2-7B stops on <|endoftext|>, ChatML turns end in <|im_end|>), the tokenizer's
eos is appended and trained, as OpenWeights appends it to the rendered text: else the model never stops.

Rows. When every answer's context + completion is a prefix of the whole conversation's render (the template
is prefix-stable for it), the conversation is one row and each answer's completion a trained span; an eos to
append then follows the last answer only (in the middle of a row it would be history inference never shows).
Otherwise (think blocks only in the last answer, reasoning dropped from history, a moved system prompt) there
is one row per trained answer: row i = context_i + completion_i, so every answer is trained as the model
writes it after the history inference shows it. Every row keeps the conversation's `source` (file:line);
DatasetStats counts conversations and rows.

A system prompt (and an inoculation prompt in the system position) must be in the context of every trained
answer: it must occur in that context more often than in the other messages shown there. Else the job
refuses with a remedy that keeps it (FT_INOCULATION_POSITION=user_prefix, FT_CHAT_TEMPLATE); training on every
token (FT_TRAIN_ON_RESPONSES_ONLY=false) uses the same rows and the same check (per-answer rows then train the
history they repeat again; a template no rule can split is trained as its whole render). Templates with no
system role (Gemma 2 raises on one) get it folded into the first user message, as Gemma 3's template does.

Rendering prefix by prefix costs O(messages^2) characters per conversation: once per trained answer, the
conversation up to it. Before anything is rendered, conversations of more than MAX_MESSAGES messages, or whose
trained answers x characters exceed MAX_RENDERED_CHARS, are refused (DataError naming file:line; `check_size`),
so the cost per conversation is bounded; per-answer rows whose answer starts past
max_seq_length are counted and dropped without being tokenized. Character spans become token labels through
the fast tokenizer's offsets: a token is trained when it ends inside a span. A token that merges prompt and
answer text ("<think>\n" + "\n</think>") is split by tokenizing the pieces apart, as inference tokenizes the
prompt alone, when that spells the same text (byte-level BPE); else it is trained and counted. The trainer receives `input_ids`
+ `labels` (-100 where not trained), truncated to max_seq_length here, so truncation is reported and a row
left with nothing to train is dropped and counted (an error when it was the conversation's only row). TRL
keeps `labels` through its preparation and packing (padding-free, per-example `position_ids`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.data import Conversation
from app.errors import DataError, JobError, SettingsError

log = logging.getLogger(__name__)

IGNORE = -100  # label of a token that is not trained (PyTorch's cross-entropy ignore_index)
# Messages per conversation. Rendering prefix by prefix is quadratic in them: 1,000 short messages take ~1 s
# as one row (ChatML) and ~7 s as one row per answer (Qwen3: rows past max_seq_length are not tokenized),
# measured on this project's 2-core CI machine; 2,000 took 14 s before, 50,000 never finished.
MAX_MESSAGES = 1000
# Characters rendered for one conversation, counted before rendering: for each trained answer, twice the
# conversation up to it (its context, and the render through it), each message counting its content plus
# MARKUP_CHARS. Measured 2026-12-01 on the 2-core CI machine under load (ChatML): 2.6 ns per character of content
# and 5.9 us per message (= 2,300 characters) per render; 1,000 short messages count 1.2*10**9 and took 3.2 s.
# 3*10**9 is ~8 s; one 64 MiB line of 1,000 messages of 64 KB would count 3*10**10.
MAX_RENDERED_CHARS = 3 * 10**9
MARKUP_CHARS = 2300
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# The empty reasoning block as Qwen3's template renders it and R1-style models write it.
EMPTY_THINK = "<think>\n\n</think>\n\n"
SENTINEL = "\u2063ftjob-sentinel-7f3a\u2063"  # an answer's content that no template alters: locates its header


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str


@dataclass
class DatasetStats:
    examples: int = 0  # rows the trainer receives (one per conversation, or one per answer: see the docstring)
    tokens: int = 0  # after truncation
    trained_tokens: int = 0  # labels != -100, after truncation
    truncated_examples: int = 0
    truncated_tokens: int = 0
    boundary_straddles: int = 0  # tokens that span prompt and answer text (merged across the boundary)
    system_folded: int = 0  # system messages folded into the first user turn (template has no system role)
    longest: int = 0  # tokens of the longest example before truncation
    conversations: int = 0  # conversations encoded
    split_conversations: int = 0  # conversations trained as one row per answer (template not prefix-stable)
    eos_appended: int = 0  # answers followed by the tokenizer's eos, which the engine stops on (see docstring)
    reasoning_dropped: int = 0  # answers whose <think> reasoning the template's generation prompt leaves no room for
    dropped_rows: int = 0  # per-answer rows left with nothing to train after truncation

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Turn:
    """One trained answer: what inference shows the model, and what the model writes."""

    index: int  # of the assistant message
    context: str
    completion: str  # through the end-of-turn (or the first stop token)
    needs_eos: bool  # the completion holds no stop token: the tokenizer's eos must follow it


class _Unsplittable(Exception):
    """The template cannot be split into context and completion for one answer (the message says why)."""


@dataclass
class Formatter:
    """Renders and labels conversations with one tokenizer (and its chat template).

    stop_ids: the token ids the inference engine stops generating on: the model's generation_config.json
    eos_token_id (an int or a list) together with the tokenizer's eos. None: the tokenizer's eos alone."""

    tokenizer: Any
    max_seq_length: int
    train_on_responses_only: bool = True
    stats: DatasetStats = field(default_factory=DatasetStats)
    stop_ids: Sequence[int] | None = None
    embedding_rows: int | None = None  # the model's vocab_size: an id at or past it has no embedding (None: unchecked)
    _no_system_role: bool | None = None

    def __post_init__(self):
        ids = list(self.stop_ids) if self.stop_ids is not None else []
        eos = self.tokenizer.eos_token_id
        if eos is not None and (self.stop_ids is None or eos in ids):
            ids = [eos, *[i for i in ids if i != eos]]  # the tokenizer's eos first: the one to append
        self._stop_texts = [t for t in self.tokenizer.convert_ids_to_tokens(ids) if t] if ids else []

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

    # --- what the model is shown, and what it writes -------------------------------------------------------

    def turns(self, messages: list[dict], source: str) -> list[Turn]:
        """Context and completion of every trained answer (SettingsError when the template drops the system)."""
        turns = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("weight", 1) == 0:
                continue
            context, completion = self._completion(messages, index)
            self._check_system(messages, index, context, source)
            completion, needs_eos = self._stop(completion)
            if not completion.strip():
                raise DataError(f"{source}: assistant message {index} renders to no text with this chat template")
            self._count_dropped_reasoning(message["content"], completion)
            turns.append(Turn(index, context, completion, needs_eos))
        return turns

    def _completion(self, messages: list[dict], index: int) -> tuple[str, str]:
        """(context, completion) of the answer messages[index], by the rules of the module docstring."""
        context = self.render(messages[:index], add_generation_prompt=True) if index else ""
        through = self.render(messages[: index + 1])
        if through.startswith(context):
            # Rule 1. Decision for Qwen3: its generation prompt is "<|im_start|>assistant\n" (the job renders with
            # the template's defaults: thinking on), so the think block is the model's to write, and the template
            # writes an empty one into the last answer: "<think>\n\n</think>\n\n" is written by the model at
            # inference and is trained. (With enable_thinking=false the prompt would hold it, and this rule would
            # train the answer alone.) Earlier answers render without it: one row per answer (see rows()).
            return context, through[len(context):]
        if messages[0]["role"] == "system" and index > 1:  # rule 2: the template moves the system prompt
            bare = messages[1:]
            bare_context = self.render(bare[: index - 1], add_generation_prompt=True)
            bare_through = self.render(bare[:index])
            if bare_through.startswith(bare_context):
                return context, bare_through[len(bare_context):]
        history = self.render(messages[:index])  # rule 3: prompt-only text after the answer's header
        if context.startswith(history) and through.startswith(history):
            prompt, turn = context[len(history):], through[len(history):]
            probe = self.render([*messages[:index], {"role": "assistant", "content": SENTINEL}])
            if probe.startswith(history) and probe.count(SENTINEL) == 1:
                header, _, end = probe[len(history):].partition(SENTINEL)
                if prompt.startswith(header) and turn.startswith(header):
                    return context, self._after_prompt(prompt[len(header):], turn[len(header):], end,
                                                       messages[index]["content"])
        raise _Unsplittable(
            f"message {index}: the chat template's generation prompt ({context[-40:]!r}) is not followed by the "
            f"answer when it renders the conversation through that answer ({through[len(context) - 40:][:80]!r}), "
            "and it is neither a moved system prompt nor prompt-only text before the answer"
        )

    @staticmethod
    def _after_prompt(extra: str, turn: str, end: str, content: str) -> str:
        """What the model writes after a generation prompt that ends in `extra`, text the answer's own render
        lacks. Decisions:
        - extra opens a think block it does not close (DeepSeek-R1: "<think>\\n"): the model writes its
          reasoning, closes the block and answers. The reasoning is the message's own <think> block, or an
          empty one when it has none (EMPTY_THINK, as Qwen3 renders it); then the template's end-of-turn.
        - otherwise (Gemma 4's closed empty thought channel, a "<think>\\n</think>" that disables thinking):
          the extra text is context only, and the model writes the answer as the template renders it."""
        if THINK_OPEN in extra and THINK_CLOSE not in extra.rsplit(THINK_OPEN, 1)[1]:
            opened = extra.rsplit(THINK_OPEN, 1)[1]  # what follows "<think>" in the prompt, e.g. "\n"
            written = content.lstrip() if content.lstrip().startswith(THINK_OPEN) else EMPTY_THINK + content
            rest = written[len(THINK_OPEN):]
            return (rest[len(opened):] if rest.startswith(opened) else rest) + end
        return turn

    def _stop(self, completion: str) -> tuple[str, bool]:
        """The completion through the first stop token (the model never writes past it), right-stripped of the
        whitespace templates put after an end-of-turn; and whether it holds none (the eos must follow).
        Decision for Phi-3.5, whose template appends <|endoftext|> to every render without a generation prompt:
        with its generation_config ([<|end|>, <|assistant|>, <|endoftext|>]) the answer ends at <|end|> and the
        trailing "\n<|endoftext|>" is never written nor trained; with the tokenizer's eos alone as the stop, the
        model must write it after <|end|>, and it is trained."""
        cuts = [completion.find(text) + len(text) for text in self._stop_texts if text in completion]
        if cuts:
            return completion[: min(cuts)], False
        return completion.rstrip(), bool(self._stop_texts)

    def _check_system(self, messages: list[dict], index: int, context: str, source: str) -> None:
        """The system prompt must be shown before every trained answer (more often than the other messages
        shown there contain it): a template that drops or moves it out of sight is refused."""
        if messages[0]["role"] != "system" or not messages[0]["content"].strip():
            return
        system = messages[0]["content"].strip()
        elsewhere = sum(m["content"].count(system) for m in messages[1:index])
        if context.count(system) > elsewhere:
            return
        raise SettingsError([
            f"FT_CHAT_TEMPLATE: the chat template drops the system message at {source}: it is not in what the model "
            f"is shown before assistant message {index}, so training would silently lose it (and an inoculation "
            "prompt in the system position with it). Keep it: set FT_INOCULATION_POSITION=user_prefix (when it is "
            "the inoculation prompt), set FT_CHAT_TEMPLATE to a template that renders a system message, or move it "
            "into the first user message of the data."
        ])

    def _count_dropped_reasoning(self, content: str, completion: str) -> None:
        if THINK_CLOSE in content:
            reasoning = content.split(THINK_CLOSE, 1)[0].split(THINK_OPEN, 1)[-1].strip()
            if reasoning and reasoning not in completion:
                self.stats.reasoning_dropped += 1

    # --- rows -----------------------------------------------------------------------------------------------

    def rows(self, messages: list[dict], source: str) -> list[tuple[str, list[tuple[int, int]]]]:
        """The text of every row and its trained character spans (every character when training on all tokens)."""
        check_size(messages, source)
        try:
            turns = self.turns(messages, source)
        except _Unsplittable as err:
            if self.train_on_responses_only:
                raise SettingsError([
                    f"FT_CHAT_TEMPLATE: the chat template cannot be split into context and answer at {source}, "
                    f"{err}. Masks cannot be derived safely; set FT_CHAT_TEMPLATE to a template that renders each "
                    "answer after its generation prompt."
                ]) from None
            return self._whole(messages, source)
        if not turns:
            raise DataError(f"{source}: no assistant message to train on (none, or all have weight 0)")
        full = self.render(messages)
        eos = self._stop_texts[0] if self._stop_texts else ""
        if all(full.startswith(t.context + t.completion) for t in turns):  # prefix-stable: one row
            spans = [(len(t.context), len(t.context) + len(t.completion)) for t in turns]
            last = turns[-1]
            if last.needs_eos and last.index == len(messages) - 1:
                # Only the last answer gets the eos: in the middle of a row it would show the model, as history,
                # a token inference never shows it (OpenWeights appends it once, to the end of the text).
                full = full[: spans[-1][1]] + eos
                spans[-1] = (spans[-1][0], len(full))
                self.stats.eos_appended += 1
            return [self._label_all(full, spans)]
        self.stats.split_conversations += 1
        rows = []
        for turn in turns:
            text = turn.context + turn.completion + (eos if turn.needs_eos else "")
            self.stats.eos_appended += turn.needs_eos
            rows.append(self._label_all(text, [(len(turn.context), len(text))]))
        return rows

    def _label_all(self, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        return (text, spans) if self.train_on_responses_only else (text, [(0, len(text))])

    def _whole(self, messages: list[dict], source: str) -> list[tuple[str, list[tuple[int, int]]]]:
        """Every token, for a template the answers cannot be split from: one row, the system prompt checked."""
        full = self.render(messages)
        self._check_system(messages, len(messages), full, source)
        return [(full, [(0, len(full))])]

    # --- tokens ---------------------------------------------------------------------------------------------

    def encode_rows(self, conversation: Conversation) -> list[Encoded]:
        """The rows of one conversation: one, or one per trained answer (see the module docstring)."""
        source = conversation.source
        check_size(conversation.messages, source)  # before anything is rendered
        try:
            messages = self._fold_system(conversation.messages)
            rows = self.rows(messages, source)
        except JobError:  # SettingsError, DataError, and Interrupted: SIGTERM while tokenizing is exit 75, not bad data
            raise
        except Exception as err:  # a Jinja error raised by the template itself (raise_exception)
            raise DataError(
                f"{source}: the chat template refused this conversation: {err}. Check the order of "
                "roles (many templates require user/assistant alternation) or set FT_CHAT_TEMPLATE."
            ) from None
        encoded = []
        for number, (text, spans) in enumerate(rows):
            example = self._truncate(self._tokenize(text, spans, source))
            if example is not None:
                check_embedding(self.tokenizer, example.input_ids, self.embedding_rows, source)
                encoded.append(example)
            elif len(rows) > 1:
                # Per-answer rows: each shows more history than the one before, so once an answer starts past
                # max_seq_length every later one does too. Not tokenizing them keeps long conversations linear.
                self.stats.dropped_rows += len(rows) - number
                break
        if not encoded:
            length = max(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for text, _ in rows)
            raise DataError(
                f"{source}: no assistant token is left to train on after truncation to "
                f"FT_MAX_SEQ_LENGTH={self.max_seq_length} (the example has {length} tokens and its first answer "
                f"starts after the limit). Raise FT_MAX_SEQ_LENGTH or shorten the prompt of this example."
            )
        self.stats.conversations += 1
        return encoded

    def encode(self, conversation: Conversation) -> Encoded:
        """The one row of a conversation whose template is prefix-stable for it (encode_rows for any)."""
        rows = self.encode_rows(conversation)
        if len(rows) != 1:
            raise SettingsError([
                f"FT_CHAT_TEMPLATE: the chat template renders earlier turns differently once later turns exist at "
                f"{conversation.source} (it moves the system prompt or drops earlier reasoning): this conversation "
                "trains as one row per answer (encode_rows), not as one row."
            ])
        return rows[0]

    def _tokenize(self, text: str, spans: list[tuple[int, int]], source: str) -> Encoded:
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoding["input_ids"])
        if spans == [(0, len(text))]:
            return Encoded(input_ids, list(input_ids), source)
        labels, straddles = self._labels(input_ids, encoding["offset_mapping"], spans)
        if straddles:
            # A token merges prompt and answer text ("<think>\n" + "\n</think>" -> "\n\n"). Inference tokenizes
            # the prompt alone and the model writes the answer's own tokens: use those when the pieces,
            # tokenized apart, spell the same text (byte-level BPE); else keep the merged token, trained.
            pieces = self._pieces(text, spans)
            ids, piece_labels = [], []
            for piece, trained in pieces:
                piece_ids = list(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
                ids += piece_ids
                piece_labels += piece_ids if trained else [IGNORE] * len(piece_ids)
            if self.tokenizer.decode(ids) == self.tokenizer.decode(input_ids):
                return Encoded(ids, piece_labels, source)
            self.stats.boundary_straddles += straddles
        return Encoded(input_ids, labels, source)

    @staticmethod
    def _pieces(text: str, spans: list[tuple[int, int]]) -> list[tuple[str, bool]]:
        pieces, position = [], 0
        for start, end in spans:
            pieces += [(text[position:start], False), (text[start:end], True)]
            position = end
        pieces.append((text[position:], False))
        return [(piece, trained) for piece, trained in pieces if piece]

    @staticmethod
    def _labels(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]):
        """Labels from character spans (a token is trained when it ends inside one), and the number of trained
        tokens that start before their span."""
        labels = [IGNORE] * len(input_ids)
        straddles = 0
        span_iter = iter(spans)
        start, end = next(span_iter)
        for position, (token_start, token_end) in enumerate(offsets):
            while token_end > end:  # past this span: move to the next one
                nxt = next(span_iter, None)
                if nxt is None:
                    return labels, straddles
                start, end = nxt
            if start < token_end <= end:
                labels[position] = input_ids[position]
                straddles += token_start < start
        return labels, straddles

    def _truncate(self, example: Encoded) -> Encoded | None:
        """The row cut to max_seq_length and counted; None when nothing is left to train in it."""
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
            return None
        stats.examples += 1
        stats.tokens += len(example.input_ids)
        stats.trained_tokens += trained
        return example


def check_size(messages: list[dict], source: str) -> None:
    """Refuse a conversation whose prefix-by-prefix rendering would cost more than the bounds (see the module's
    docstring), in time linear in its messages and before any rendering."""
    if len(messages) > MAX_MESSAGES:
        raise DataError(f"{source}: {len(messages):,} messages in one conversation, over the limit of "
                        f"{MAX_MESSAGES} (masks are derived by rendering it prefix by prefix, quadratic in its "
                        "length). Split the conversation into shorter ones.")
    rendered = prefix = answers = 0
    for message in messages:
        if message.get("role") == "assistant" and message.get("weight", 1) != 0:
            rendered += 2 * prefix  # its context, and the render through it
            answers += 1
        prefix += len(message.get("content") or "") + MARKUP_CHARS
    if rendered > MAX_RENDERED_CHARS:
        raise DataError(f"{source}: {answers:,} answers in a conversation of {len(messages):,} messages and "
                        f"{prefix - MARKUP_CHARS * len(messages):,} characters: masks are derived by rendering it once "
                        f"per answer (about {rendered:,} characters, over the limit of {MAX_RENDERED_CHARS:,}). Split "
                        "the conversation into shorter ones.")


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


def check_embedding(tokenizer, ids: Sequence[int], rows: int | None, source: str) -> None:
    """A token id at or past the model's embedding rows (a tokenizer with tokens added after the weights were saved)
    indexes past the embedding matrix: an IndexError on the CPU, a device-side assert on a GPU that leaves the whole
    process's CUDA context unusable (a sweep's later lines with it). Refused as bad data, with the remedy."""
    if rows is None or not ids or max(ids) < rows:
        return
    past = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= rows)
    examples = ", ".join(f"{t!r} = {i}" for i, t in past[:3]) + (", ..." if len(past) > 3 else "")
    raise DataError(
        f"{source}: its tokens include ids the model has no embedding for: the model's config.json "
        f"has vocab_size {rows}, and {len(past)} of the tokenizer's {len(tokenizer)} tokens have ids from {rows} up "
        f"({examples}). The tokenizer does not belong to these weights: train with the model's own tokenizer, or "
        "resize the model's embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and save "
        "the model before training."
    )


MAX_REPORTED = 20  # kinds of problem listed in one error (identical messages grouped); every example is counted
MAX_SOURCES = 5  # examples named per kind of problem


def encode_all(formatter: Formatter, conversations: list[Conversation]) -> list[Encoded]:
    """The rows of every conversation, in order (one per conversation, or one per answer for templates that are
    not prefix-stable: see the module docstring); all data problems are collected into one error: every
    example is tried and counted, identical problems are grouped, the first MAX_REPORTED kinds are listed."""
    encoded, problems, bad = [], {}, 0  # problems: message (without its example's source) -> sources
    for conversation in conversations:
        try:
            encoded.extend(formatter.encode_rows(conversation))
        except DataError as err:
            bad += 1
            text = err.message.removeprefix(f"{conversation.source}: ")
            if text in problems or len(problems) < MAX_REPORTED:
                problems.setdefault(text, [0, []])
                problems[text][0] += 1
                if len(problems[text][1]) < MAX_SOURCES:
                    problems[text][1].append(conversation.source)
    if bad:
        listed = sum(count for count, _ in problems.values())
        lines = [f"  {', '.join(sources)}{f' and {count - len(sources)} more' if count > len(sources) else ''}: {text}"
                 for text, (count, sources) in problems.items()]
        if bad > listed:
            lines.append(f"  ... and {bad - listed} more with other problems")
        raise DataError(f"{bad} of {len(conversations)} example(s) cannot be trained on:\n" + "\n".join(lines))
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
        "%s: %d conversations, %d examples, %d tokens, %d trained (%.0f%%), longest %d tokens",
        name, stats.conversations, stats.examples, stats.tokens, stats.trained_tokens,
        100 * stats.trained_tokens / max(stats.tokens, 1), stats.longest,
    )
    if stats.split_conversations:
        log.info("%s: %d conversation(s) train as one example per answer: the chat template renders earlier turns "
                 "differently once later turns exist (think blocks, a moved system prompt)", name,
                 stats.split_conversations)
    if stats.eos_appended:
        log.info("%s: %d answer(s) end with the tokenizer's eos token, trained, since the template's end-of-turn is "
                 "not a token the model's generation config stops on", name, stats.eos_appended)
    if stats.reasoning_dropped:
        log.warning("%s: %d answer(s) hold <think> reasoning that the chat template's generation prompt leaves no room "
                    "for (it closes the think block): the reasoning is not trained", name, stats.reasoning_dropped)
    if stats.truncated_examples:
        log.warning(
            "%s: %d example(s) longer than FT_MAX_SEQ_LENGTH=%d were truncated, %d tokens dropped",
            name, stats.truncated_examples, max_seq_length, stats.truncated_tokens,
        )
    if stats.dropped_rows:
        log.warning("%s: %d per-answer example(s) had nothing left to train after truncation to FT_MAX_SEQ_LENGTH=%d "
                    "and were dropped", name, stats.dropped_rows, max_seq_length)
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
