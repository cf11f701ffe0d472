"""What the job tells its user while it runs, on the log (stderr: stdout carries only `check`'s JSON and
`preview`'s rows): a banner as soon as the job is known, then the progress of training and evaluation.

    starting(settings, hardware, backend)     first line, before any file is read: the model, device, backend
    announce(settings, job_id, files)         the job id, its folder and state (new, resumes, completed), the
                                              settings that differ from their defaults, the data and its format
    announce_plan(settings, data, plan)       once tokenized: examples, optimizer steps, effective batch, memory
    Progress(...)                             a bar on a terminal; on a log (`docker logs`, `kubectl logs`),
                                              a line every PROGRESS_EVERY_S seconds that nothing else was logged

Free of torch/transformers/datasets imports: `python -m app train` prints its first line within a second on a
CPU (tests/test_console.py), where the libraries take 5-10 s to import.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("app.console")

PROGRESS_EVERY_S = 30.0  # a log reader sees the run move at least this often (a metrics line resets the clock)
LINE_WIDTH = 110  # settings are wrapped at this width in the banner
VALUE_WIDTH = 60  # longer values (an inoculation prompt, a template) are shown cut, with their length


def device(hardware) -> str:
    if not hardware.cuda:
        return "the CPU (no CUDA GPU visible)"
    gpu = hardware.gpu
    count = f"{hardware.num_gpus} x " if hardware.num_gpus > 1 else ""
    return f"{count}{gpu.name} ({gpu.memory_free_gb:.0f} of {gpu.memory_total_gb:.0f} GiB free)"


def starting(settings, hardware, backend) -> None:
    log.info("ft-job: FT_MODEL=%s on %s, backend %s", settings.model, device(hardware), backend.name)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # as in an env file
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, list):
        text = ",".join(_show(item) for item in value)
    elif isinstance(value, dict):
        import json

        text = json.dumps({key: _show(item) if isinstance(item, Path) else item for key, item in value.items()},
                          default=str)
    else:
        text = str(value)
    text = text.replace("\n", "\\n")
    if isinstance(value, Path) or " " not in text or len(text) <= VALUE_WIDTH:  # paths and ids whole
        return text
    return f"{text[:VALUE_WIDTH - 1]}…({len(text)} chars)"


def changed_settings(settings) -> dict[str, str]:
    """FT_NAME -> value shown, for every setting that differs from its default (required ones always); the
    hub token never."""
    from pydantic_core import PydanticUndefined

    from app.settings import ENV_PREFIX

    changed = {}
    for name, field in type(settings).model_fields.items():
        if name == "hf_token":
            continue
        value = getattr(settings, name)
        default = field.get_default(call_default_factory=True)
        if default is PydanticUndefined or value != default:
            changed[ENV_PREFIX + name.upper()] = _show(value)
    return changed


def job_state(job_root: Path) -> str:
    """What running this job will do: start, resume, or return a completed result."""
    from app.jobdir import JobDir

    job = JobDir(job_root)
    try:
        previous = job.previous_result() or {}
        checkpoint = job.latest_checkpoint()
    except OSError:
        return "new"
    if previous.get("status") == "completed":
        return "completed before: its result is returned without training (FT_OVERWRITE=true retrains)"
    if checkpoint is not None:
        return f"resumes from {checkpoint.name}"
    return "new" if not previous else f"{previous.get('status')} before, without a checkpoint: starts again"


def data_formats(files) -> dict[str, dict[str, Any]]:
    """Per split: the rows' format (app/data.py FORMATS), for result.json's data.<split>.format."""
    return {split: {"format": rows[0].format} for split, rows in (("train", files.train), ("test", files.test)) if rows}


def _wrap(prefix: str, items: list[str]) -> list[str]:
    lines, line = [], prefix
    for item in items:
        if len(line) + len(item) + 1 > LINE_WIDTH and line != prefix:
            lines.append(line)
            line = " " * len(prefix)
        line += " " + item
    return lines + [line]


def announce(settings, job_id: str, files) -> None:
    """The banner: everything known once the data is read and hashed, before anything heavy is loaded."""
    root = settings.output_dir / job_id
    log.info("job %s -> %s/ (%s)", job_id, root, job_state(root))
    for line in _wrap("settings (not default):", [f"{k}={v}" for k, v in changed_settings(settings).items()]):
        log.info("%s", line)
    data = [f"FT_TRAINING_FILE {len(files.train)} conversations ({files.train[0].format})"]
    if files.test:
        data.append(f"FT_TEST_FILE {len(files.test)} conversations ({files.test[0].format})")
    log.info("data: %s", ", ".join(data))


def announce_plan(settings, data, plan) -> int:
    """What the run will do, once the rows are tokenized and the batch is planned: its optimizer steps."""
    from app.checks import optimizer_steps

    for change in plan.adjustments:
        log.warning("%s: using %s instead of %s (%s)", change["setting"], change["used"], change["requested"],
                    change["why"])
    rows = len(data.lengths)
    steps = optimizer_steps(settings, rows, plan.micro_batch, plan.accumulation, plan.world)
    train = data.stats.get("train", {})
    epochs = "" if settings.max_steps else f" = {settings.epochs} epoch(s) x {steps // max(settings.epochs, 1)}"
    packed = f", packed into {rows} rows" if settings.packing else ""
    log.info("plan: %d examples (%s tokens, %s trained%s) -> %d optimizer steps%s", train.get("examples", rows),
             f"{train.get('tokens', 0):,}", f"{train.get('trained_tokens', 0):,}", packed, steps, epochs)
    memory = (f"estimated peak GPU memory {plan.estimate.total_gb:.1f} GiB" if plan.estimate is not None
              else "no GPU memory estimate on the CPU" if plan.budget_gb is None else "no GPU memory estimate")
    log.info("plan: effective batch %d = micro-batch %d x accumulation %d x %d rank(s), optimizer %s, %s",
             plan.effective_batch, plan.micro_batch, plan.accumulation, plan.world, plan.optimizer, memory)
    return steps


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One progress display: a bar (tqdm) when `stream` is a terminal; otherwise a log line whenever
    `every_s` seconds passed without one (and at the end), readable where carriage returns are noise."""

    def __init__(self, what: str, total: int, done: int = 0, unit: str = "step", stream=None,
                 every_s: float = PROGRESS_EVERY_S, tty: bool | None = None):
        self.what, self.total, self.unit, self.every_s = what, max(total, 0), unit, every_s
        self.units = unit + ("es" if unit.endswith(("ch", "s")) else "s")
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.start_done, self.done = done, done
        self.started = self.last_line = time.monotonic()
        self.shown = None  # `done` at the last line logged
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=done, desc=what, unit=unit, file=self.stream,
                            dynamic_ncols=True, leave=what == "train")

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        percent = 100 * self.done / self.total if self.total else 100.0
        return (f"{self.what} {self.done}/{self.total} {self.units} ({percent:.0f}%), {duration(elapsed)} elapsed, "
                f"ETA {duration(eta)}")

    def update(self, done: int, quiet: bool = False, **status: Any) -> None:
        """Move to `done`; `quiet`: another line is about to say where the run is (no periodic line now)."""
        self.done = min(done, self.total) if self.total else done
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
            if status:
                self.bar.set_postfix(status, refresh=False)
            return
        if not quiet and time.monotonic() - self.last_line >= self.every_s:
            self._log()

    def _log(self) -> None:
        log.info("%s", self.line())
        self.last_line, self.shown = time.monotonic(), self.done

    def logged(self) -> None:
        """Another line just told the reader where the run is (a metrics line): restart the clock."""
        self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.shown is not None and self.shown != self.done:
            self._log()  # the reader saw it move: show where it ended
