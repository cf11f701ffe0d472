"""The job's directory on the output volume: its id, its state, and writes that are whole or absent.

    FT_OUTPUT_DIR/<job_id>/
        adapter/ | merged/          the model + tokenizer, renamed into place when whole
        checkpoints/checkpoint-N/   complete checkpoints only (written under .staging/, then renamed)
        metrics.jsonl  loss.png  samples.jsonl  result.json
    FT_OUTPUT_DIR/result.json      a copy of the latest run's result (the only one for early failures)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def job_id(identity: dict[str, Any], file_hashes: dict[str, str], suffix: str | None) -> str:
    """ftjob- + 12 hex of sha256 over the settings that enter the job id (Settings.identity(): each setting's
    `job_id` fact) and the content hashes of the input files."""
    payload = dict(sorted(identity.items()))
    payload["files"] = dict(sorted(file_hashes.items()))
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return f"ftjob-{digest[:12]}" + (f"-{suffix}" if suffix else "")


@dataclass(frozen=True)
class JobDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def staging(self) -> Path:
        return self.checkpoints / ".staging"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def plot(self) -> Path:
        return self.root / "loss.png"

    def previous_result(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.result.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def complete_checkpoints(self) -> list[Path]:
        """checkpoint-N folders in step order; anything half-written lives under .staging/ and is ignored."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for path in self.checkpoints.iterdir():
            match = CHECKPOINT_RE.match(path.name)
            if match and path.is_dir() and (path / "trainer_state.json").is_file():
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def clear_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def clear_temporaries(self) -> None:
        """Remove what a killed run left half-written: staged checkpoints and `.<name>.tmp-<pid>` files and
        folders (the job's lock is held, so no other process is writing them)."""
        self.clear_staging()
        for path in self.root.glob(".*.tmp-*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for path in self.root.glob(".*.old-*"):  # publish_dir's replaced folder, when killed before deleting it
            shutil.rmtree(path, ignore_errors=True)

    def reset(self) -> None:
        """Forget a previous run (FT_OVERWRITE=true): its model, checkpoints and metrics."""
        for path in (self.adapter, self.merged, self.checkpoints):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.metrics, self.plot, self.samples, self.result):
            path.unlink(missing_ok=True)


def fsync_tree(path: Path) -> None:
    """Flush a written folder's files and the folder itself to disk before it is renamed into place."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a whole folder into place, replacing an older one: `final` names the old or the new folder, whole,
    at every moment (an atomic exchange where the file system has one)."""
    fsync_tree(tmp)
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
    else:  # no atomic exchange: for a moment only .<name>.old-<pid> holds the old folder
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or file system lacks it."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a temporary name in the same folder, fsync, rename: whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # the old file stays as it was; no temporary is left behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class JobLock:
    """An exclusive lock on a job's folder for the life of this process (released on close or exit)."""

    def __init__(self, handle):
        self._handle = handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def check_writable(output_dir: Path) -> None:
    """FT_OUTPUT_DIR must be a folder this process can create files in (SettingsError otherwise)."""
    from app.errors import SettingsError

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        why = "it is a file, not a folder" if output_dir.is_file() else err.strerror
        raise SettingsError([f"FT_OUTPUT_DIR={output_dir}: not writable ({why}). Mount a writable volume "
                             "there (e.g. -v ./output:/output) or point FT_OUTPUT_DIR elsewhere."]) from None


def open_job(output_dir: Path, job_id: str, lock: bool = True) -> tuple[JobDir, JobLock | None]:
    """Create (or reopen) FT_OUTPUT_DIR/<job_id>/ and take its lock (`lock=False`: data-parallel ranks other than
    0, whose rank 0 holds it). A job already running in another process is refused (SettingsError)."""
    import fcntl

    from app.errors import SettingsError

    check_writable(output_dir)
    job = JobDir(output_dir / job_id)
    job.root.mkdir(parents=True, exist_ok=True)
    if not lock:
        return job, None
    handle = open(job.root / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SettingsError([f"job {job_id} is already running in another process on {job.root} (same settings "
                             "and data). Wait for it, or change FT_JOB_ID_SUFFIX to train a separate copy."]) from None
    return job, JobLock(handle)


def previous_completed(job: JobDir, overwrite: bool, job_id: str) -> dict[str, Any] | None:
    """The earlier result of this very job, when it completed and its model is still there; with `overwrite`,
    the earlier run is discarded instead (its model, checkpoints and metrics)."""
    import logging

    log = logging.getLogger(__name__)
    previous = job.previous_result()
    if overwrite:
        if previous is not None or job.complete_checkpoints():
            log.warning("FT_OVERWRITE=true: discarding the earlier run of %s", job_id)
        from app.launch import is_main

        if is_main():
            job.reset()
        return None
    if not previous or previous.get("status") != "completed":
        return None
    model_path = previous.get("outputs", {}).get("model_path")
    if not model_path or not Path(model_path).exists():
        log.warning("job %s completed before but its model is gone: training again", job_id)
        return None
    log.info("job %s already completed (%s): returning its result without training. To train it again, set "
             "FT_OVERWRITE=true (fine_tune(..., overwrite=True) from Python).", job_id, previous.get("finished_at"))
    return previous
