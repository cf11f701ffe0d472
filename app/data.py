"""Step 1: read and validate a JSONL file of conversations (OpenWeights' `conversations` format).

Each non-blank line is `{"messages": [{"role": "system"|"user"|"assistant", "content": "<text>"}, ...]}`
with at least one assistant message. Every problem names file:line; up to MAX_REPORTED are reported at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import DataError
from app.safeio import MAX_DATA_FILE_BYTES, open_input

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20  # problems listed in one error; the rest are counted
MAX_LINE_BYTES = 64 * 2**20  # a line longer than 64 MiB is refused before json.loads


@dataclass
class Conversation:
    messages: list[dict]  # role, content, and optionally weight (0/1, assistant only) and name
    source: str  # "file:line", for messages that name an example
    extra: dict = field(default_factory=dict)  # other keys of the line, kept for callbacks


def _check_messages(messages: object, require_assistant: bool = True) -> str | None:
    """The first problem of one line's messages, or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict):
            return f"{where} is {type(message).__name__}, expected an object with 'role' and 'content'"
        role = message.get("role")
        if role not in ROLES:
            return f"{where} has role {role!r}; allowed roles are {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str):
            return (
                f"{where} ({role}) has content of type {type(content).__name__}; content must be a string "
                "(content-block lists are not supported: join their text)"
            )
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as err:  # a \ud800-\udfff escape: legal JSON, but no tokenizer can encode it
            return (f"{where} ({role}) has an unpaired surrogate {content[err.start]!r} at character {err.start} "
                    "(an escaped \\ud800-\\udfff without its pair); fix the text's encoding")
        if role == "assistant" and not content.strip():
            return f"{where} (assistant) is empty: there is nothing to train on in it"
        unknown = set(message) - {"role", "content", "weight", "name"}
        if unknown:
            return f"{where} has unknown key(s) {sorted(unknown)}; expected 'role' and 'content'"
        if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1)):
            return f"{where} has weight {message['weight']!r}; only assistant messages take a weight, 0 or 1"
    if require_assistant and not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        return "no assistant message to train on (none, or all have weight 0)"
    return None


def _open_problem(path: Path, setting: str) -> str | None:
    if not path.exists():
        return f"{setting}={path}: no such file. Mount the data (e.g. -v ./data:/data) and point {setting} at it."
    if path.is_dir():
        return f"{setting}={path}: is a directory, expected a .jsonl file."
    if not os.access(path, os.R_OK):
        return f"{setting}={path}: not readable (permission denied); check the file's mode and owner."
    return None


def load_conversations(path: Path, setting: str = "FT_TRAINING_FILE", require_assistant: bool = True) -> list[Conversation]:
    """All conversations of a JSONL file, or DataError naming every bad line (up to MAX_REPORTED)."""
    path = Path(path)
    problem = _open_problem(path, setting)
    if problem:
        raise DataError(problem)
    rows: list[Conversation] = []
    problems: list[str] = []
    count_bad = 0
    try:  # a regular file of bounded size, read in bounded lines (app/safeio.py): never a FIFO or /dev/zero
        handle = open_input(path, setting, MAX_DATA_FILE_BYTES, max_line=MAX_LINE_BYTES)
    except OSError as err:
        raise DataError(f"{setting}={path}: cannot be opened ({err.strerror}).") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as Windows editors write
            if len(raw) > MAX_LINE_BYTES:
                error = f"line is {len(raw) / 2**20:.0f} MiB, over the {MAX_LINE_BYTES // 2**20} MiB limit"
            else:
                error, row = _parse_line(raw, where, require_assistant)
                if row is not None:
                    rows.append(row)
                    continue
                if error is None:  # a blank line
                    continue
            count_bad += 1
            if len(problems) < MAX_REPORTED:
                problems.append(f"{where}: {error}")
    if problems:
        more = f"\n  ... and {count_bad - len(problems)} more bad lines" if count_bad > len(problems) else ""
        raise DataError(
            f"{setting}={path} has {count_bad} bad line(s); each line must be "
            '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}:\n'
            + "\n".join(f"  {p}" for p in problems)
            + more
        )
    if not rows:
        raise DataError(f"{setting}={path} holds no conversations (the file is empty or blank).")
    return rows


def _parse_line(raw: bytes, where: str, require_assistant: bool = True) -> tuple[str | None, Conversation | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}); save the file as UTF-8", None
    if not text.strip():
        return None, None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return f"invalid JSON: {err.msg} (column {err.colno})", None
    except RecursionError:
        return "invalid JSON: nested too deeply", None
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}", None
    if "messages" not in obj:
        keys = ", ".join(sorted(obj)[:5]) or "none"
        return f"no 'messages' key (keys: {keys}); pre-rendered 'text' rows are not supported", None
    error = _check_messages(obj["messages"], require_assistant)
    if error:
        return error, None
    messages = [dict(m) for m in obj["messages"]]
    extra = {k: v for k, v in obj.items() if k != "messages"}
    return None, Conversation(messages=messages, source=where, extra=extra)


def file_sha256(path: Path) -> str:
    """Content hash of a data file, for the job id (the path itself does not matter)."""
    import hashlib

    digest = hashlib.sha256()
    with open_input(path, str(path), MAX_DATA_FILE_BYTES) as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
