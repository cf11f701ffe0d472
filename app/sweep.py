"""`python -m app sweep FILE.jsonl`: a grid of runs on one host, each base model loaded once per process.

    python -m app sweep grid.jsonl                 # every line; one process per GPU (FT_NUM_GPUS, or all visible)
    python -m app sweep grid.jsonl --workers 2     # that many processes (on a CPU too: tests)
    ENV_FILE=deploy/sweep.env docker compose run --rm train sweep /data/grid.jsonl   # no preset: the lines decide

Each non-blank line of FILE is a settings object exactly as FT_CONFIG_FILE takes it (OpenWeights' validated_params
accepted, its unimplemented fields listed under ignored_params), merged over the FT_* environment, which wins: line
i is what `FT_CONFIG_FILE=FILE FT_CONFIG_INDEX=i python -m app train` trains, with the same job id, job folder,
result.json and adapter (bit-identical on a CPU). The runs differ from standalone ones in one way only: lines that
share a base model (model, 4-bit, max_seq_length, backend, ...) get it loaded once (app/backends/reuse.py), each
with fresh LoRA weights, its own trainer and its own job folder.

    order      lines with the same base next to each other (file order otherwise); invalid lines fail first
    skip       a line whose job completed before (by a sweep or by `train`) returns its result: nothing trained
    resume     an interrupted line resumes from its newest checkpoint (its job folder holds it)
    failure    a line that fails (settings or data: 2, GPU: 3, training: 4, a bug: 1, traceback in the log) is
               recorded with its code and result.json, and the sweep goes on
    SIGTERM    the line in training checkpoints, the sweep stops and exits 75; a second signal exits at once.
               Rerunning the same command skips what completed and resumes the interrupted line. A sweep's
               process killed outright (kill -9, the OOM killer) leaves no worker behind: each checkpoints its
               line and exits (SIGHUP from the kernel, follow_parent).
    exit code  0 every line completed · 75 interrupted · otherwise the first failed line's code (file order)

On GPUs the lines run in worker processes: one per GPU (CUDA_VISIBLE_DEVICES set for each, `python -m app sweep FILE
--worker K`), each asking this process for its next line (preferring lines of the base it holds); not data-parallel:
short runs scale best one per GPU. This process never touches a GPU, so a worker that dies (a segfault, the host's
OOM killer) or whose GPU a CUDA fault made unusable (a device-side assert fails every later CUDA call of that process)
costs its line only: the line is recorded failed and a fresh worker takes the remaining ones. On a CPU, the lines
run in this process (`--workers N`: N worker processes).

The sweep's state is only in the job folders, plus FT_OUTPUT_DIR/sweep.json (every line: job id, status, exit code,
losses, times; rewritten after each line), sweep.md (the same as a table, printed at the end) and sweep.png (every
line's training and eval loss, labelled by the settings that differ between lines).

In a sweep the clocks of result.json's startup_s and time_to_first_step_s and metrics.jsonl's elapsed_s start with
the sweep's process, not with the line; sweep.json has each line's own wall time.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from app.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_UNEXPECTED, Interrupted, JobError, SettingsError

log = logging.getLogger(__name__)

CHANNEL = "@sweep "  # prefix of a worker's messages on its stdout (anything else there is passed on to stderr)
EXIT_DEVICE_LOST = 70  # a worker's exit code (EX_SOFTWARE) after a CUDA fault made its GPU unusable: the sweep's
# process starts a fresh worker for the remaining lines; never the exit code of a sweep or of a line
# Settings that name a line rather than change its training: labels use them only when nothing else differs.
NAMING = ("job_id_suffix", "meta", "finetuned_model_id")
LABEL_CHARS = 40  # a differing value longer than this is shortened in labels and the table


# --- the lines ----------------------------------------------------------------------------------------------------


@dataclass
class Line:
    """One line of the sweep file, validated as FT_CONFIG_FILE + FT_CONFIG_INDEX would be."""

    index: int  # among the non-blank lines, from 0 (FT_CONFIG_INDEX)
    number: int  # in the file, from 1
    raw: dict[str, Any]  # the object as written (an OpenWeights job's validated_params)
    settings: Any = None  # app.settings.Settings, None when invalid
    ignored: list[str] = field(default_factory=list)
    problem: SettingsError | None = None

    @cached_property
    def values(self) -> dict[str, Any]:
        """Its settings as result.json's validated_params has them (as written, when invalid): labels compare these."""
        return self.raw if self.settings is None else self.settings.public_params()

    @property
    def base(self) -> tuple | None:
        """What its base model depends on (app/backends/reuse.py base_key decides; this orders the queue)."""
        s = self.settings
        return None if s is None else (s.model, s.load_in_4bit, s.max_seq_length, s.backend)

    @property
    def twin(self) -> str | None:
        """Lines with equal settings and files are one job: never run at the same time (its folder is locked)."""
        s = self.settings
        if s is None:
            return None
        files = [str(s.training_file), str(s.test_file), sorted(map(str, s.logp_callback_datasets.values()))]
        return json.dumps([s.identity(), files], sort_keys=True, default=str)


def read_lines(path: Path) -> list[Line]:
    """Every line of the sweep file with its settings (or the problem that makes it invalid)."""
    from app.settings import load_settings

    if path.suffix != ".jsonl":
        raise SettingsError([f"sweep file {path}: expected a .jsonl file (one settings object per line); rename it"])
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError([f"sweep file {path}: cannot be read ({err})"]) from None
    numbered = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not numbered:
        raise SettingsError([f"sweep file {path}: no lines; write one settings object per line"])
    lines = []
    for index, (number, text) in enumerate(numbered):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            raw = {}
        if isinstance(raw, dict) and isinstance(raw.get("validated_params"), dict):
            raw = raw["validated_params"]
        raw = raw if isinstance(raw, dict) else {}
        try:
            settings, ignored = load_settings(config_file=path, config_index=index)
            lines.append(Line(index, number, raw, settings, ignored))
        except SettingsError as err:
            lines.append(Line(index, number, raw, problem=err))
    return lines


def overridden(lines: list[Line]) -> list[str]:
    """FT_* variables set in this environment that replace values the lines write (the environment wins, as over
    FT_CONFIG_FILE; a compose ENV_FILE preset is such an environment): worth a warning, never an error. The
    environment is read as the settings read it (pydantic-settings' own source)."""
    from pydantic_settings import EnvSettingsSource

    from app.settings import ENV_PREFIX, Settings

    try:
        from_environment = EnvSettingsSource(Settings)()
    except Exception:  # a value the settings cannot parse: every line reports it as its problem
        return []
    written: dict[str, int] = {}
    for line in lines:
        for key in set(line.raw) - set(line.ignored):  # an ignored OpenWeights field (output_dir) replaces nothing
            written[key] = written.get(key, 0) + 1
    return [f"{ENV_PREFIX}{key.upper()} (written in {count} line(s))" for key, count in sorted(written.items())
            if key in from_environment]


def run_order(lines: list[Line]) -> list[int]:
    """Invalid lines first (they fail at once), then the lines of each base model together, in file order."""
    groups: dict[Any, list[int]] = {}
    for line in lines:
        groups.setdefault(line.base, []).append(line.index)
    invalid = groups.pop(None, [])
    return invalid + [index for members in groups.values() for index in members]


def differing(lines: list[Line]) -> list[str]:
    """The settings whose values differ between the valid lines (all lines when fewer than two are valid); the
    naming ones only when nothing else differs."""
    from app.settings import field_names, fields_where

    public = set(field_names()) - set(fields_where("env_only", True))  # never a token, even one a line wrote
    among = [line for line in lines if line.settings is not None]
    among = among if len(among) > 1 else lines
    keys = sorted({key for line in among for key in line.values if key in public})
    seen = {k: {json.dumps(line.values.get(k), sort_keys=True, default=str) for line in among} for k in keys}
    differ = [k for k in keys if len(seen[k]) > 1]
    return [k for k in differ if k not in NAMING] or differ


def _redacted(value: Any) -> Any:
    """A line's value as the summary shows it: no secret's value (a line may hold one where it does not belong)."""
    from app.result import redact

    return redact(value) if isinstance(value, str) else json.loads(redact(json.dumps(value, default=str)))


def _short(value: Any) -> str:
    value = _redacted(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def label(line: Line, keys: list[str]) -> str:
    return ", ".join(f"{k}={_short(line.values.get(k))}" for k in keys) or f"line {line.number}"


# --- one line --------------------------------------------------------------------------------------------------


def _entry(line: Line, result: dict[str, Any] | None, code: int, **extra) -> dict[str, Any]:
    from app.result import redact

    outputs = (result or {}).get("outputs") or {}
    error = (result or {}).get("error") or (line.problem.as_dict() if line.problem else None)
    if error:  # errors quote inputs: no secret's value in sweep.json
        error = {**error, "message": redact(error["message"])}
    return {
        "index": line.index, "line": line.number, "job_id": (result or {}).get("id"),
        "status": (result or {}).get("status") or "failed", "exit_code": code, "skipped": False,
        "train_loss": outputs.get("train_loss"), "eval_loss": outputs.get("eval_loss"),
        "global_step": outputs.get("global_step"), "train_runtime": outputs.get("train_runtime"),
        "result_json": None, "error": (error or {}).get("message"), **extra,
    }


def record_invalid(line: Line) -> dict[str, Any]:
    """A line whose settings are invalid: result.json as `train` writes it for invalid settings (exit 2)."""
    from app.result import Recorder, redact

    log.error("line %d (file line %d): %s", line.index, line.number, redact(line.problem.message))
    record = Recorder(ignored=line.ignored)
    record.write(record.result("failed", line.problem))
    return _entry(line, None, line.problem.exit_code)


def run_line(line: Line, shared, stop, worker: int | None = None) -> dict[str, Any]:
    """Train one line as `python -m app train` would (pipeline.run), on the shared base; its sweep.json entry.
    Errors end the line, not the sweep: its result.json records them as the CLI does."""
    from app import pipeline
    from app.result import Recorder, now, redact

    record = Recorder(settings=line.settings, ignored=line.ignored)
    stop.on_second_signal = lambda name: record.write(
        record.result("interrupted", Interrupted(f"{name} twice: exited without a checkpoint")))
    loads, started, clock = shared.loads, now(), time.monotonic()
    log.info("line %d (file line %d): starting", line.index, line.number)
    try:
        result, code = pipeline.run(line.settings, record, stop, base=shared), EXIT_OK
    except JobError as err:
        log.error("line %d: %s", line.index, redact(err.message))
        result = record.result("interrupted" if isinstance(err, Interrupted) else "failed", err)
        record.write(result)
        code = err.exit_code
        shared.device_lost = shared.device_lost or lost_device(err)
    except Exception as err:  # a bug: the traceback in the log, exit 1 for this line, the sweep goes on
        log.exception("line %d: unexpected error", line.index)
        error = {"type": type(err).__name__, "message": str(err), "exit_code": EXIT_UNEXPECTED}
        result = record.result("failed", error)
        record.write(result)
        code = EXIT_UNEXPECTED
        shared.device_lost = shared.device_lost or lost_device(err)
    finally:
        stop.on_second_signal = None
    entry = _entry(line, result, code, started_at=started, finished_at=now(),
                   wall_s=round(time.monotonic() - clock, 2), worker=worker,
                   # a completed job's earlier result comes back without training: no step was counted now
                   skipped=code == EXIT_OK and "global_step" not in record.outputs,
                   base_loaded=shared.loads > loads,
                   result_json=str(record.job_root / "result.json") if record.job_root else None)
    log.info("line %d: %s (exit %d) in %.1f s%s", line.index, entry["status"], code, entry["wall_s"],
             " (completed before: skipped)" if entry["skipped"] else "")
    return entry


def serve(lines: list[Line], next_index, report, stop, worker: int | None = None, opened=None) -> None:
    """Train lines one after another in this process, on one shared base, until `next_index()` returns None
    or a line is interrupted. Used in the sweep's own process (one worker) and in each worker process.
    `opened(index, job_id)`: called once a line's job folder is locked."""
    from app.backends.reuse import SharedBase

    shared = SharedBase()
    try:
        while (index := next_index()) is not None:
            shared.on_job = (lambda job_id, i=index: opened(i, job_id)) if opened else None
            entry = run_line(lines[index], shared, stop, worker)
            report(entry)
            if shared.device_lost:
                raise DeviceLost(f"line {index} left this process's GPU unusable (a CUDA error; see the log above)")
            if entry["exit_code"] == EXIT_INTERRUPTED or stop.requested:
                return
    finally:
        shared.drop()


class DeviceLost(Exception):
    """A CUDA fault (a device-side assert, an illegal memory access) made this process's GPU unusable: every later
    CUDA call fails the same way, so no further line may run in this process."""


TRITON_CUDA_ERROR = "Triton Error [CUDA]: "  # how Triton's launcher (unsloth's kernels) raises a CUDA error


def lost_device(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is a CUDA error other than out of memory (which frees its memory
    and leaves the process usable): torch's AcceleratorError, or Triton's RuntimeError("Triton Error [CUDA]: ...").
    The sticky ones (an illegal address, a device-side assert) fail every later CUDA call of the process; for the
    others a fresh process costs a restart, never a wrong result."""
    torch = sys.modules.get("torch")
    kind = getattr(torch, "AcceleratorError", None)
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        text = str(err)
        if kind is not None and isinstance(err, kind):
            return True
        if isinstance(err, RuntimeError) and text.startswith(TRITON_CUDA_ERROR) and "out of memory" not in text:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


# --- the summary ------------------------------------------------------------------------------------------------


class Summary:
    """sweep.json, rewritten whole after every line; sweep.md, sweep.png and the printed table at the end."""

    def __init__(self, path: Path, lines: list[Line], output_dir: Path, workers: int):
        from app.result import now

        self.path, self.lines, self.output_dir = path, lines, output_dir
        self.keys = differing(lines)
        self.started, self.clock, self.workers = now(), time.monotonic(), workers
        self.entries: dict[int, dict[str, Any]] = {}

    def add(self, entry: dict[str, Any]) -> None:
        self.entries[entry["index"]] = entry
        self.write()

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for line in self.lines:
            entry = self.entries.get(line.index) or _entry(line, {"status": "pending"}, None) | {"error": None}
            rows.append({**entry, "label": label(line, self.keys),
                         "differs": {k: _redacted(line.values.get(k)) for k in self.keys}})
        return rows

    def exit_code(self) -> int:
        """0 every line completed; 75 interrupted (a line, or the sweep before every line ran); else the first
        failed line's code, in file order."""
        rows = self.rows()
        if any(r["status"] in ("interrupted", "pending") for r in rows):
            return EXIT_INTERRUPTED
        failed = [r["exit_code"] for r in rows if r["exit_code"] != EXIT_OK]
        return failed[0] if failed else EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        from app.result import now

        rows = self.rows()
        counts: dict[str, int] = {}
        for row in rows:
            status = "skipped" if row["skipped"] else row["status"]
            counts[status] = counts.get(status, 0) + 1
        return {"sweep_file": str(self.path), "output_dir": str(self.output_dir), "started_at": self.started,
                "updated_at": now(), "wall_s": round(time.monotonic() - self.clock, 2), "workers": self.workers,
                "base_loads": sum(bool(r.get("base_loaded")) for r in rows), "counts": counts,
                "exit_code": self.exit_code(), "differs": self.keys, "lines": rows}

    def write(self) -> None:
        from app.jobdir import encode_json
        from app.safeio import write_atomic

        try:  # in FT_OUTPUT_DIR itself (a link the user made is theirs), never through a link planted in it
            write_atomic(self.output_dir / "sweep.json", encode_json(self.as_dict()), parent_may_be_link=True)
        except OSError as err:  # the lines' own results are what matters: say so, go on
            log.error("cannot write %s: %s", self.output_dir / "sweep.json", err)

    def table(self) -> str:
        summary = self.as_dict()
        head = (f"Sweep {self.path.name}: {len(self.lines)} lines, {summary['counts']}, exit {summary['exit_code']}, "
                f"{summary['wall_s']:.0f} s, {self.workers} worker(s), base loaded {summary['base_loads']} time(s)\n\n")
        out = ["| # | job id | " + (", ".join(self.keys) or "line") + " | status | exit | train loss | eval loss "
               "| steps | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in summary["lines"]:
            values = ", ".join(_short(r["differs"].get(k)) for k in self.keys) or str(r["line"])
            status = "completed (skipped)" if r["skipped"] else r["status"]
            out.append(f"| {r['index']} | {r['job_id'] or '-'} | {values} | {status} | {_cell(r['exit_code'])} | "
                       f"{_cell(r['train_loss'], 4)} | {_cell(r['eval_loss'], 4)} | {_cell(r['global_step'])} | "
                       f"{_cell(r.get('wall_s'), 1)} |")
        return head + "\n".join(out) + "\n"

    def finish(self) -> str:
        """sweep.json, sweep.md and sweep.png; the table."""
        from app.plots import write_sweep_plot
        from app.safeio import write_atomic

        self.write()
        table = self.table()
        try:
            write_atomic(self.output_dir / "sweep.md", table.encode(), parent_may_be_link=True)
            write_sweep_plot(self.output_dir, [(r["label"], r["job_id"]) for r in self.rows()],
                             self.output_dir / "sweep.png", title=f"{self.path.name}, {len(self.lines)} lines")
        except OSError as err:
            log.error("cannot write the sweep's table or plot in %s: %s", self.output_dir, err)
        return table


def _cell(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if digits is not None and isinstance(value, (int, float)) else str(value)


# --- the sweep's process: one worker here, or one process per GPU ---------------------------------------------------


def worker_plan(lines: list[Line], requested: int | None) -> tuple[int, list[str | None], int]:
    """(worker processes, the device of each (None on a CPU), GPUs to use): --workers, else one per GPU
    (FT_NUM_GPUS, or every visible GPU; the environment's value, which every valid line carries), else 1."""
    from app.hardware import detect_hardware, visible_devices

    settings = next((line.settings for line in lines if line.settings is not None), None)
    hardware = detect_hardware(settings.num_gpus if settings else None)
    gpus = hardware.num_gpus if hardware.cuda else 0
    visible = visible_devices()
    devices = (visible[:gpus] if visible is not None else [str(i) for i in range(gpus)]) or [None]
    workers = requested or max(gpus, 1)
    return workers, [devices[k % len(devices)] for k in range(workers)], gpus


def pin_worker(device: str | None) -> None:
    """A worker process trains on its one GPU (set before CUDA starts). FT_NUM_GPUS said how many workers the
    sweep runs; in a worker it is unset (empty), or its lines would ask for that many GPUs each."""
    from app.settings import ENV_PREFIX, set_library_variable

    if device is not None:
        set_library_variable("CUDA_VISIBLE_DEVICES", device)
    set_library_variable(f"{ENV_PREFIX}NUM_GPUS", "")


def main(path: Path, stop, stdout, workers: int | None = None, worker: int | None = None,
         device: str | None = None) -> int:
    """The `sweep` command: run every line (or, with `worker`, serve the lines the sweep's process hands out)."""
    path = Path(path).absolute()
    if worker is not None:
        follow_parent(stop)
        pin_worker(device)
        return _worker(read_lines(path), stop, worker, private_channel(stdout))
    lines = read_lines(path)
    from app.settings import failure_output_dir

    valid = [line for line in lines if line.settings is not None]
    output_dir = valid[0].settings.output_dir if valid else failure_output_dir()
    count, devices, gpus = worker_plan(lines, workers)
    count = max(1, min(count, len(valid)))
    summary = Summary(path, lines, output_dir, count)
    log.info("sweep %s: %d lines (%d invalid), %d worker(s)%s; differing: %s", path, len(lines),
             len(lines) - len(valid), count, f" on devices {devices[:count]}" if devices[0] is not None else "",
             ", ".join(summary.keys) or "nothing")
    if names := overridden(lines):
        log.warning("the environment overrides what lines of %s set (FT_* wins over every line): %s", path.name,
                    "; ".join(names))
    order = run_order(lines)
    try:
        for index in [i for i in order if lines[i].settings is None]:
            summary.add(record_invalid(lines[index]))
        pending = [i for i in order if lines[i].settings is not None]
        if count == 1 and not gpus:  # one worker on a CPU: this process
            serve(lines, lambda: pending.pop(0) if pending and not stop.requested else None, summary.add, stop)
        else:  # worker processes, one pinned to each GPU: a crash or a CUDA fault ends one worker, not the sweep
            Dispatcher(path, lines, pending, devices[:count], summary).run()
    except Interrupted as err:  # a signal between lines (or before the first)
        log.warning("%s", err.message)
    except DeviceLost as err:  # only with an accelerator in this process, which a sweep on GPUs never uses
        log.error("%s: the remaining lines are not run; run the same command again", err)
        for index in pending:
            summary.add(_entry(lines[index], {"status": "failed"}, EXIT_UNEXPECTED, error=str(err)))
    table = summary.finish()
    print(table, file=stdout, flush=True)
    code = summary.exit_code()
    log.info("sweep.json: %s (exit %d)", output_dir / "sweep.json", code)
    return code


# --- several workers -------------------------------------------------------------------------------------------------


class Dispatcher:
    """Hands the lines out to one worker process per device as each asks for its next one, and collects their
    entries. Signals are forwarded to the workers (each checkpoints its line); workers run in sessions of their
    own, so a Ctrl-C in the terminal reaches them once, through here."""

    def __init__(self, path: Path, lines: list[Line], pending: list[int], devices: list[str | None],
                 summary: Summary):
        self.path, self.lines, self.pending, self.devices, self.summary = path, lines, list(pending), devices, summary
        self.events: queue.Queue = queue.Queue()
        self.procs: dict[int, subprocess.Popen] = {}
        self.current: dict[int, int | None] = {}  # worker -> the line it trains
        self.last_base: dict[int, Any] = {}  # worker -> the base of its last line
        self.waiting: set[int] = set()  # workers that asked while only twins of running lines were left
        self.job_ids: dict[int, str] = {}  # line -> its job id, once its worker has locked the job folder
        self.signals = 0

    def run(self) -> None:
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for k in range(len(self.devices)):
                self._start(k)
            while self.procs:
                try:
                    k, message = self.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._handle(k, message)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        for index in self.pending if not self.signals else []:  # every worker ended before the queue did
            self.summary.add(_entry(self.lines[index], {"status": "failed"}, EXIT_UNEXPECTED,
                                    error="no worker process was left to train this line (see the log)"))
        if self.signals:
            raise Interrupted(f"{'SIGTERM/SIGINT' if self.signals == 1 else 'a second signal'}: the sweep stopped; "
                              "run the same command again to resume")

    def _start(self, k: int) -> None:
        cmd = [sys.executable, "-m", "app", "sweep", str(self.path), "--worker", str(k)]
        cmd += ["--device", self.devices[k]] if self.devices[k] is not None else []
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                start_new_session=True)
        self.procs[k], self.current[k] = proc, None
        where = f", CUDA_VISIBLE_DEVICES={self.devices[k]}" if self.devices[k] else ""
        log.info("worker %d: pid %d%s", k, proc.pid, where)
        threading.Thread(target=self._read, args=(k, proc), daemon=True).start()

    def _read(self, k: int, proc: subprocess.Popen) -> None:
        for text in proc.stdout:
            before, found, message = text.partition(CHANNEL)  # a message after text printed without a newline too
            if not found:
                sys.stderr.write(text)
                continue
            if before.strip():
                sys.stderr.write(before + "\n")
            self.events.put((k, json.loads(message)))
        self.events.put((k, None))

    def _forward(self, signum, _frame) -> None:
        self.signals += 1
        log.warning("%s: %s", signal.Signals(signum).name, "the workers checkpoint their lines and stop" if
                    self.signals == 1 else "the workers exit at once")
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def _send(self, k: int, message: dict[str, Any]) -> None:
        try:
            self.procs[k].stdin.write(json.dumps(message) + "\n")
            self.procs[k].stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it is exiting: its end-of-output event follows

    def _handle(self, k: int, message: dict[str, Any] | None) -> None:
        if message is None:
            return self._ended(k)
        if "job" in message:
            self.job_ids[message["job"]] = message["job_id"]
        if "done" in message:
            self.summary.add(message["entry"])
            self.current[k] = None
            for other in list(self.waiting):  # a twin may be free to run now
                self.waiting.discard(other)
                self._assign(other)
        if message.get("ready"):
            self._assign(k)

    def _assign(self, k: int) -> None:
        index = self._pick(k)
        if index is None and self.pending and not self.signals:
            self.waiting.add(k)  # only twins of running lines are left: ask again when one ends
            return
        if index is not None:
            self.pending.remove(index)
            self.current[k], self.last_base[k] = index, self.lines[index].base
        self._send(k, {"line": index} if index is not None else {"stop": True})

    def _pick(self, k: int) -> int | None:
        """The next line for worker k: one of the base it holds, else of a base no other worker is on, else any;
        never a twin of a line running elsewhere."""
        if self.signals:
            return None
        running = {self.lines[i].twin for i in self.current.values() if i is not None}
        free = [i for i in self.pending if self.lines[i].twin not in running]
        busy = {self.lines[i].base for w, i in self.current.items() if i is not None and w != k}
        for choice in ([i for i in free if self.lines[i].base == self.last_base.get(k)],
                       [i for i in free if self.lines[i].base not in busy], free):
            if choice:
                return choice[0]
        return None

    def _lost_line(self, index: int, status: str, code: int, k: int, how: str) -> dict[str, Any]:
        """The entry of a line whose worker died with it, and, after a crash, its job's result.json (which the worker
        could not write; after a second signal the worker wrote it); a rerun resumes the line from its newest
        checkpoint."""
        from app.errors import JobError
        from app.result import Recorder

        line, job_id = self.lines[index], self.job_ids.get(index)
        error = JobError(f"the sweep's worker process {how} while training this line (a crash, the host's OOM "
                         "killer, or a second signal; see the log). Run the sweep again: this line resumes from its "
                         "newest checkpoint.")
        error.exit_code = code
        result = {"status": status, "id": job_id}
        if job_id is not None and code != EXIT_INTERRUPTED:
            record = Recorder(settings=line.settings, ignored=line.ignored, job_id=job_id,
                              job_root=line.settings.output_dir / job_id)
            result = record.result(status, error)
            record.write(result)
        entry = _entry(line, result, code, worker=k, error=error.message)
        if job_id is not None:
            entry["result_json"] = str(line.settings.output_dir / job_id / "result.json")
        return entry

    def _ended(self, k: int) -> None:
        proc = self.procs.pop(k)
        code = proc.wait()
        self.waiting.discard(k)
        index = self.current.pop(k, None)
        if index is not None:  # it died with a line in hand (a crash, or a second signal)
            how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited {code}"
            code = code if code > 0 else EXIT_UNEXPECTED
            status = "interrupted" if code == EXIT_INTERRUPTED else "failed"
            log.error("worker %d %s while training line %d", k, how, index)
            self.summary.add(self._lost_line(index, status, code, k, how))
        elif code == EXIT_DEVICE_LOST:
            log.error("worker %d: a CUDA fault made its GPU unusable (see its log above)", k)
        elif code not in (EXIT_OK, EXIT_INTERRUPTED):
            log.error("worker %d exited %d", k, code)
        # A fresh process after a line that ended its worker: at most one per line, so never a loop.
        if self.pending and not self.signals and (index is not None or code == EXIT_DEVICE_LOST):
            log.info("worker %d: starting a new process for the remaining lines", k)
            self._start(k)
        for other in list(self.waiting):  # nothing more may come from k: let the others take its lines
            self.waiting.discard(other)
            self._assign(other)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def follow_parent(stop) -> None:
    """A worker ends with the sweep's process: when that process dies without forwarding a signal (kill -9, the OOM
    killer), Linux sends the worker SIGHUP (prctl PR_SET_PDEATHSIG; a worker has no terminal to hang up), which asks
    its line to checkpoint, as a first SIGTERM does; it then exits 75 instead of training on, alone and unseen, on a
    GPU the next run needs."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    signal.signal(signal.SIGHUP, stop.parent_gone)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGHUP)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError) as err:
        log.warning("a worker that outlives the sweep's process will not be stopped (%s)", err)


def private_channel(stream):
    """A worker's channel to the sweep's process (its stdout pipe) on a descriptor of its own; descriptor 1, where C
    code, compilers and the processes libraries start print, then goes to stderr: nothing but the channel's messages
    (whole lines) reaches the pipe. Python's own prints already go to stderr (app.cli.main)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream  # not a descriptor (a test's StringIO)
    stream.flush()
    channel = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.__stderr__.fileno(), fd)
    return channel


def _worker(lines: list[Line], stop, k: int, channel) -> int:
    """A worker process: ask the sweep's process for a line, train it, report its entry, until told to stop."""
    from app.cli import RedactingFormatter

    for handler in logging.getLogger().handlers:
        handler.setFormatter(RedactingFormatter(f"%(asctime)s %(levelname)-7s [worker {k}] %(message)s", "%H:%M:%S"))

    def say(message: dict[str, Any]) -> None:
        from app.result import redact

        try:
            channel.write(CHANNEL + redact(json.dumps(message, default=str)) + "\n")
            channel.flush()
        except OSError:  # a broken pipe: the sweep's process is gone, and the next read ends this worker
            log.warning("the sweep's process is gone: the job folders (result.json) have every outcome")

    def next_index() -> int | None:
        say({"ready": True})
        reply = sys.stdin.readline()
        return json.loads(reply).get("line") if reply else None  # end of input: the sweep's process is gone

    def report(entry: dict[str, Any]) -> None:
        say({"done": entry["index"], "entry": entry})

    try:
        serve(lines, next_index, report, stop, worker=k, opened=lambda i, job_id: say({"job": i, "job_id": job_id}))
    except Interrupted as err:
        log.warning("%s", err.message)
        return EXIT_INTERRUPTED
    except DeviceLost as err:
        log.error("%s: this worker stops; a fresh process takes the remaining lines", err)
        return EXIT_DEVICE_LOST
    return EXIT_INTERRUPTED if stop.requested else EXIT_OK
