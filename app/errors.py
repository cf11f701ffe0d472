"""The job's failures, each with its exit code (DESIGN.md, "Exit codes").

A JobError is a user-facing failure: the CLI prints its message as one paragraph, without a traceback,
writes result.json with `status: failed` (or `interrupted`) and exits with its code. Anything else is a
bug: traceback, exit 1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_INVALID = 2  # invalid settings or data: retrying won't help
EXIT_NO_GPU = 3  # preflight refused: not enough GPU
EXIT_TRAINING = 4  # training failed: non-finite loss, nothing to train on
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: SIGTERM/SIGINT after a checkpoint; run again to resume

# Kubernetes keeps 4,096 bytes of the termination message ("failed (exit 2): " + the message): a message is cut to
# this many bytes, and a value it quotes to VALUE_CHARS characters, so that the reason always fits.
MAX_MESSAGE_BYTES = 4000
VALUE_CHARS = 200


def clip(text: object, limit: int = VALUE_CHARS) -> str:
    """A value as a message quotes it: whole when short, else its start and how long it is."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def shown(value: object, limit: int = VALUE_CHARS) -> str:
    """repr(value) for a message, clipped (see clip)."""
    return clip(repr(value), limit)


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """The message cut to `limit` bytes of UTF-8 (on a character boundary), saying so."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    note = f" ... [{len(data) - limit:,} more bytes cut]"
    return data[: limit - len(note)].decode("utf-8", "ignore") + note


class JobError(Exception):
    exit_code = EXIT_UNEXPECTED
    kind = "error"

    def __init__(self, message: str):
        message = bounded(str(message))
        super().__init__(message)
        self.message = message

    def as_dict(self) -> dict:
        return {"type": self.kind, "message": self.message, "exit_code": self.exit_code}


class SettingsError(JobError):
    """One or more settings are invalid; every problem is listed."""

    exit_code = EXIT_INVALID
    kind = "invalid_settings"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(problems) == 1:
            text = f"Invalid setting: {problems[0]}"
        else:
            text = f"{len(problems)} invalid settings:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text)


class DataError(JobError):
    """A data file is missing, unreadable or malformed; the message names file:line."""

    exit_code = EXIT_INVALID
    kind = "invalid_data"


class GpuError(JobError):
    """The preflight refused: no suitable GPU, or the estimate does not fit."""

    exit_code = EXIT_NO_GPU
    kind = "insufficient_gpu"


class TrainingError(JobError):
    """Training itself failed (non-finite loss, nothing to train on, disk full while saving)."""

    exit_code = EXIT_TRAINING
    kind = "training_failed"


class Interrupted(JobError):
    """SIGTERM/SIGINT: a checkpoint was saved; rerunning resumes from it."""

    exit_code = EXIT_INTERRUPTED
    kind = "interrupted"
