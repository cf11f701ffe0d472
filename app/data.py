"""Step 1: read and validate a file of conversations, in the formats other fine-tuning tools accept.

One conversation per JSONL line (or per item of a `.json` file holding one JSON array); every row of a file
in the same format, detected from its keys and converted, losslessly, into OpenWeights' `conversations`:

    messages           {"messages": [{"role": "system"|"user"|"assistant", "content": "<text>"}, ...]}
                       OpenWeights, OpenAI chat fine-tuning and exports: other message keys are ignored when
                       empty (OpenAI's "refusal": null) and counted when not; content given as a list of
                       {"type": "text", "text": ...} parts is joined with "\\n", as vLLM joins them; "developer"
                       is a system message. Tool calls, tool messages and images are refused.
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": "<text>"}, ...]} (+ "system")
    prompt_completion  TRL's {"prompt": ..., "completion": ...}: strings (a user and an assistant message,
                       rendered with the chat template) or lists of messages; the prompt is context (its
                       assistant messages are not trained), the completion is trained.
    alpaca             {"instruction", "input", "output"} (+ "system", "history": [[user, assistant], ...]):
                       the user message is the instruction and the input joined by "\\n" (LLaMA-Factory's
                       rule); the output is trained, the history is context.

Pre-rendered {"text": ...} rows and preference rows ({"prompt", "chosen", "rejected"}) cannot be masked or
are not supervised data: refused once, with the fix. Every other problem names file:line (file[index] in a
JSON array); identical problems are grouped ("lines 1-20: ..."), MAX_REPORTED kinds at most, all counted.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import DataError
from app.safeio import MAX_DATA_FILE_BYTES, open_input

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20  # kinds of problem listed in one error; every bad line is counted
MAX_RANGES = 8  # line ranges listed per kind of problem; the rest are counted
MAX_LINE_BYTES = 64 * 2**20  # a line longer than 64 MiB is refused before json.loads
MAX_ARRAY_BYTES = 1024 * 2**20  # a .json array is parsed whole: past 1 GiB, JSONL (read line by line) is asked for
FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca")
# ShareGPT's speaker names (FastChat, axolotl, LLaMA-Factory) -> roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}
MESSAGE_KEYS = {"role", "content", "weight", "name"}
# Message keys that carry what the model would have to learn to write: refused when not empty, never dropped.
CARRIES_CONTENT = {"tool_calls": "tool calls", "function_call": "a function call", "audio": "audio",
                   "reasoning_content": "reasoning (put it into the content as <think>...</think>)"}
FORMAT_HELP = ('each row must be one conversation: {"messages": [{"role": "user", "content": "..."}, {"role": '
               '"assistant", "content": "..."}]} (OpenAI, OpenWeights); {"conversations": [{"from": "human", '
               '"value": "..."}, {"from": "gpt", "value": "..."}]} (ShareGPT); {"prompt": ..., "completion": ...} '
               '(TRL); or {"instruction": ..., "input": ..., "output": ...} (Alpaca). README.md, "Your data"')
CONVERT_FIX = ("python -c \"from datasets import load_dataset; load_dataset('{kind}', data_files='{path}', "
               "split='train').to_json('{stem}.jsonl')\"")


@dataclass
class Conversation:
    messages: list[dict]  # role, content, and optionally weight (0/1, assistant only) and name
    source: str  # "file:line" (or "file[index]" in a JSON array), for messages that name an example
    extra: dict = field(default_factory=dict)  # other keys of the line, kept for callbacks
    format: str = "messages"  # the row's format in the file (FORMATS), before conversion


class _Bad(Exception):
    """One row's problem (the message says what and how to fix it)."""


@dataclass
class _Notes:
    """What a file's conversion did that its user should hear about once (logged after reading)."""

    ignored: Counter = field(default_factory=Counter)  # message keys dropped, by name: messages holding one
    plain_prompts: int = 0  # prompt/completion strings made into a user and an assistant message


def _text(content: object, where: str) -> str:
    """A message's content as text: a string, or text parts joined with a newline (vLLM's rule at inference)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text") \
                    and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _Bad(f"{where} has a content part of type {kind!r}; only text parts ({{\"type\": \"text\", "
                           "\"text\": ...}) can be trained here")
        return "\n".join(parts)
    return content  # type: ignore[return-value]  # _check_messages reports it


def _message(message: object, where: str, notes: _Notes) -> dict:
    """One message as role/content (+ weight, name): unknown keys dropped when empty, counted when not."""
    if not isinstance(message, dict):
        raise _Bad(f"{where} is {type(message).__name__}, expected an object with 'role' and 'content'")
    for key, what in CARRIES_CONTENT.items():
        if message.get(key):
            raise _Bad(f"{where} holds {what} ('{key}'), which this job cannot train; remove the message or its "
                       f"'{key}'")
    out = {key: value for key, value in message.items()
           if key in MESSAGE_KEYS and (value is not None or key == "content")}  # "name": null is no name
    if out.get("role") == "developer":  # OpenAI's name for the system message of its reasoning models
        out["role"] = "system"
    if "content" in out:
        out["content"] = _text(out["content"], where)
    for key in set(message) - MESSAGE_KEYS - set(CARRIES_CONTENT):
        if message[key] not in (None, "", [], {}):
            notes.ignored[key] += 1
    return out


def _check_messages(messages: object, require_assistant: bool = True) -> str | None:
    """The first problem of one row's messages (already in role/content form), or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
    for index, message in enumerate(messages):
        where = f"message {index}"
        role = message.get("role")
        if role not in ROLES:
            tool = " (tool messages are not supported)" if role in ("tool", "function", "ipython") else ""
            return f"{where} has role {role!r}; allowed roles are {', '.join(ROLES)}{tool}"
        content = message.get("content")
        if not isinstance(content, str):
            return f"{where} ({role}) has content of type {type(content).__name__}; content must be a string"
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as err:  # a \ud800-\udfff escape: legal JSON, but no tokenizer can encode it
            return (f"{where} ({role}) has an unpaired surrogate {content[err.start]!r} at character {err.start} "
                    "(an escaped \\ud800-\\udfff without its pair); fix the text's encoding")
        if role == "assistant" and not content.strip():
            return f"{where} (assistant) is empty: there is nothing to train on in it"
        if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1)):
            return f"{where} has weight {message['weight']!r}; only assistant messages take a weight, 0 or 1"
    if require_assistant and not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        return "no assistant message to train on (none, or all have weight 0)"
    return None


def detect_format(row: dict) -> str:
    """The format of one row, from its keys (FORMATS, or 'text'/'preference'/'unknown', which are refused)."""
    if "messages" in row:
        listed = row["messages"]
        if isinstance(listed, list) and listed and isinstance(listed[0], dict) and "from" in listed[0]:
            return "sharegpt"  # ShareGPT's speaker/value pairs under LLaMA-Factory's "messages" column
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and ("chosen" in row or "rejected" in row):
        return "preference"
    if "prompt" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return "unknown"


def _refusal(fmt: str, row: dict) -> str:
    """The one message for rows this job cannot train on, with the fix."""
    if fmt == "text":
        return ("pre-rendered {\"text\": ...} rows cannot be trained with the loss on the answers only (the job "
                "must know where each answer starts; OpenWeights refuses them too). Write each row as "
                "{\"prompt\": \"<the prompt>\", \"completion\": \"<the answer>\"} or as {\"messages\": [...]}")
    if fmt == "preference":
        return ("preference rows (prompt/chosen/rejected, for DPO) are not supervised fine-tuning data. To train on "
                "the chosen answers, rename 'chosen' to 'completion' and drop 'rejected', e.g. python -c \"import "
                "json,sys; [print(json.dumps({'prompt': r['prompt'], 'completion': r['chosen']})) for r in "
                "map(json.loads, sys.stdin)]\" < in.jsonl > out.jsonl")
    lists = [key for key, value in row.items() if isinstance(value, list) and value and isinstance(value[0], dict)]
    hint = f"; the rows may be under '{lists[0]}' (a file of rows needs one row per line)" if len(row) == 1 and lists else ""
    return f"no known format (keys: {', '.join(sorted(row)[:6]) or 'none'}){hint}; {FORMAT_HELP}"


def _from_sharegpt(row: dict, notes: _Notes) -> list[dict]:
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise _Bad("'conversations' must be a non-empty list of {\"from\", \"value\"} objects")
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    for index, turn in enumerate(turns):
        where = f"turn {index}"
        if not isinstance(turn, dict):
            raise _Bad(f"{where} is {type(turn).__name__}, expected an object with 'from' and 'value'")
        if "role" in turn and "from" not in turn:  # some ShareGPT files use OpenAI's keys
            messages.append(_message(turn, where, notes))
            continue
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise _Bad(f"{where} is from {speaker!r}; this job trains on {', '.join(sorted(SHAREGPT_ROLES))} "
                       "(tool calls and observations are not supported)")
        message = {"role": SHAREGPT_ROLES[speaker], "content": _text(turn.get("value"), where)}
        if "weight" in turn:
            message["weight"] = turn["weight"]
        messages.append(message)
    return messages


def _from_prompt_completion(row: dict, notes: _Notes) -> list[dict]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and (isinstance(completion, str) or completion is None):
        notes.plain_prompts += 1
        return [{"role": "user", "content": prompt}] + (
            [{"role": "assistant", "content": completion}] if completion is not None else [])
    if not isinstance(prompt, list) or not (isinstance(completion, list) or completion is None):
        raise _Bad(f"'prompt' is {type(prompt).__name__} and 'completion' {type(completion).__name__}: both must be "
                   "strings, or both lists of {\"role\", \"content\"} messages")
    context = [_message(m, f"prompt message {i}", notes) for i, m in enumerate(prompt)]
    for message in context:
        if message.get("role") == "assistant":
            message["weight"] = 0  # the prompt is context: its earlier answers are shown, not trained
    answers = [_message(m, f"completion message {i}", notes) for i, m in enumerate(completion or [])]
    for index, message in enumerate(answers):
        if message.get("role") != "assistant":
            raise _Bad(f"completion message {index} has role {message.get('role')!r}: a completion holds the "
                       "assistant's answer(s); move other messages into the prompt")
    return context + answers


def _from_alpaca(row: dict) -> list[dict]:
    fields = {key: row.get(key) for key in ("instruction", "input", "output", "system")}
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise _Bad(f"'{key}' is {type(value).__name__}, expected a string")
    messages = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
    for pair in row.get("history") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise _Bad("'history' must be a list of [user, assistant] string pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1], "weight": 0}]
    prompt = "\n".join(text for text in (fields["instruction"], fields["input"]) if text)
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]


def convert(row: dict, fmt: str, notes: _Notes) -> list[dict]:
    """One row of a known format as role/content messages (what the module's docstring says for each)."""
    if fmt == "messages":
        if not isinstance(row["messages"], list):
            return row["messages"]  # _check_messages reports it
        return [_message(m, f"message {i}", notes) for i, m in enumerate(row["messages"])]
    if fmt == "sharegpt":
        return _from_sharegpt(row, notes)
    if fmt == "prompt_completion":
        return _from_prompt_completion(row, notes)
    return _from_alpaca(row)


# Keys a format consumes; the rest of the row is kept in Conversation.extra (callbacks read it).
CONSUMED = {"messages": {"messages"}, "sharegpt": {"conversations", "messages", "system"},
            "prompt_completion": {"prompt", "completion"}, "alpaca": {"instruction", "input", "output", "system", "history"}}


class _Problems:
    """Bad rows grouped by their problem, with the rows' ranges, in bounded memory: MAX_REPORTED kinds of
    problem with MAX_RANGES ranges each are kept; every bad row is counted."""

    def __init__(self):
        self.count = 0
        self.kinds: dict[str, tuple[list[list[int]], list[int]]] = {}  # message -> (ranges, [rows not listed])
        self.unlisted = 0  # bad rows whose kind of problem is past MAX_REPORTED

    def add(self, number: int, message: str) -> None:
        self.count += 1
        if message not in self.kinds:
            if len(self.kinds) >= MAX_REPORTED:
                self.unlisted += 1
                return
            self.kinds[message] = ([], [0])
        ranges, more = self.kinds[message]
        if ranges and ranges[-1][1] == number - 1:
            ranges[-1][1] = number
        elif len(ranges) < MAX_RANGES:
            ranges.append([number, number])
        else:
            more[0] += 1

    def lines(self, path: Path, array: bool) -> list[str]:
        out = []
        for message, (ranges, more) in self.kinds.items():
            spans = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in ranges)
            tail = f" and {more[0]} more" if more[0] else ""
            if array:
                out.append(f"{path}[{spans}]{tail}: {message}")
            elif len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
                out.append(f"{path}:{spans}: {message}")
            else:
                out.append(f"{path} lines {spans}{tail}: {message}")
        if self.unlisted:
            out.append(f"... and {self.unlisted} more bad rows with other problems")
        return out


def _open_problem(path: Path, setting: str) -> str | None:
    if not path.exists():
        return f"{setting}={path}: no such file. Mount the data (e.g. -v ./data:/data) and point {setting} at it."
    if path.is_dir():
        return f"{setting}={path}: is a directory, expected a .jsonl file."
    if not os.access(path, os.R_OK):
        return f"{setting}={path}: not readable (permission denied); check the file's mode and owner."
    return None


def _not_a_path_problem(path: Path, setting: str) -> str | None:
    """Values that are no local file at all: an OpenWeights file id, a table format."""
    text = str(path)
    if ":file-" in text or text.startswith("file-"):
        return (f"{setting}={text} is an OpenWeights file id; this job reads local files. Give the path of the file "
                f"you uploaded, or download it first: open('train.jsonl', 'wb').write(ow.files.content('{text}')).")
    kind = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix.lower())
    if kind:
        fix = CONVERT_FIX.format(kind=kind, path=text, stem=path.with_suffix(""))
        return (f"{setting}={text} is a {kind} file; this job reads JSONL (or a JSON array), one conversation per "
                f"row. Convert it with: {fix}. Its columns must make one of the formats: {FORMAT_HELP}.")
    return None


def load_conversations(path: Path, setting: str = "FT_TRAINING_FILE", require_assistant: bool = True) -> list[Conversation]:
    """All conversations of a file (format detected, converted), or DataError naming every bad row, grouped."""
    path = Path(path)
    problem = _not_a_path_problem(path, setting) or _open_problem(path, setting)
    if problem:
        raise DataError(problem)
    try:  # a regular file of bounded size, read in bounded lines (app/safeio.py): never a FIFO or /dev/zero
        handle = open_input(path, setting, MAX_DATA_FILE_BYTES, max_line=MAX_LINE_BYTES)
    except OSError as err:
        raise DataError(f"{setting}={path}: cannot be opened ({err.strerror}).") from None
    with handle:
        return _parse_rows(handle, path, setting, require_assistant)


def _head(handle) -> bytes:
    """The file's first bytes, without consuming them."""
    try:
        head = handle.peek(4096)[:4096]
    except AttributeError:
        head = handle.read(4096)
        handle.seek(0)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip()


def _whole_json(handle, path: Path):
    """A file that is one JSON value (a `.json` array of rows, or one object), parsed whole; None when it is not
    (JSON lines, reported line by line). A string: the file is too large to parse whole."""
    data = handle.read(MAX_ARRAY_BYTES + 1)
    if len(data) > MAX_ARRAY_BYTES:
        return f"{path} is a JSON array over {MAX_ARRAY_BYTES // 2**20} MiB: write it as JSONL (one row per line)"
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        handle.seek(0)
        return None


def _raw_rows(handle, path: Path):
    """(number, where, row) for every row: a JSONL line's bytes, or an item of a JSON array (a file whose first
    character is '['), or of a `.json` file holding one object; a string where the row cannot be read."""
    head = _head(handle)
    if head.startswith(b"[") or (head.startswith(b"{") and path.suffix.lower() == ".json"):
        whole = _whole_json(handle, path)
        if isinstance(whole, str):
            yield 0, str(path), whole
            return
        if isinstance(whole, (list, dict)):
            for index, item in enumerate(whole if isinstance(whole, list) else [whole]):
                yield index, f"{path}[{index}]", item if isinstance(item, dict) else (
                    f"expected a JSON object, got {type(item).__name__ if item is not None else 'null'}")
            return
    for number, raw in enumerate(handle, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark, as Windows editors write
        if len(raw) > MAX_LINE_BYTES:
            yield number, f"{path}:{number}", f"line is {len(raw) / 2**20:.0f} MiB, over the {MAX_LINE_BYTES // 2**20} MiB limit"
        else:
            yield number, f"{path}:{number}", raw


def _parse_rows(handle, path: Path, setting: str, require_assistant: bool) -> list[Conversation]:
    rows: list[Conversation] = []
    problems, notes, first, array = _Problems(), _Notes(), None, False  # first: (format, where) of the first row
    for number, where, raw in _raw_rows(handle, path):
        array = array or where.endswith("]")
        if isinstance(raw, str):
            problems.add(number, raw)
            continue
        error, row = _parse_row(raw, where, require_assistant, notes)
        if row is not None and first is not None and row.format != first[0]:
            error, row = f"a {row.format} row in a file whose first row ({first[1]}) is {first[0]}: one format per file", None
        if row is not None:
            first = first or (row.format, where)
            rows.append(row)
        elif error is not None:
            problems.add(number, error)
    unit = "item" if array else "line"
    if problems.count:
        raise DataError(f"{setting}={path} has {problems.count} bad {unit}(s); {FORMAT_HELP}:\n"
                        + "\n".join(f"  {line}" for line in problems.lines(path, array)))
    if not rows:
        raise DataError(f"{setting}={path} holds no conversations (the file is empty or blank).")
    _log_conversion(setting, path, rows, notes, array)
    return rows


def _log_conversion(setting: str, path: Path, rows: list[Conversation], notes: _Notes, array: bool) -> None:
    fmt = rows[0].format
    if fmt != "messages" or array:
        log.info("%s=%s: %d %s rows%s, converted to messages", setting, path, len(rows), fmt,
                 " of a JSON array" if array else "")
    if notes.plain_prompts:
        log.info("%s: %d prompt/completion strings became a user and an assistant message, rendered with the chat "
                 "template (TRL would train plain strings without one)", setting, notes.plain_prompts)
    if notes.ignored:
        log.info("%s: message keys ignored (not training content): %s", setting,
                 ", ".join(f"{key} ({count} messages)" for key, count in notes.ignored.most_common()))


def _parse_row(raw: bytes | dict, where: str, require_assistant: bool,
               notes: _Notes) -> tuple[str | None, Conversation | None]:
    """(problem, None), (None, conversation), or (None, None) for a blank line."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return f"not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}); save the file as UTF-8", None
        if not text.strip():
            return None, None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            return f"invalid JSON: {err.msg} (column {err.colno})", None
        except RecursionError:
            return "invalid JSON: nested too deeply", None
    if not isinstance(raw, dict):
        return f"expected a JSON object, got {type(raw).__name__}", None
    fmt = detect_format(raw)
    if fmt not in FORMATS:
        return _refusal(fmt, raw), None
    try:
        messages = convert(raw, fmt, notes)
    except _Bad as err:
        return str(err), None
    error = _check_messages(messages, require_assistant)
    if error:
        return error, None
    extra = {k: v for k, v in raw.items() if k not in CONSUMED[fmt]}
    return None, Conversation(messages=[dict(m) for m in messages], source=where, extra=extra, format=fmt)


def file_sha256(path: Path) -> str:
    """Content hash of a data file, for the job id (the path itself does not matter)."""
    import hashlib

    digest = hashlib.sha256()
    with open_input(path, str(path), MAX_DATA_FILE_BYTES) as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
