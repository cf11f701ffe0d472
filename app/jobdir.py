"""The job's directory on the output volume: its id, its state, and writes that are whole or absent.

    FT_OUTPUT_DIR/<job_id>/
        adapter/ | merged/          the model + tokenizer, renamed into place when whole
        checkpoints/checkpoint-N/   complete checkpoints only (written under .staging/, then renamed)
        metrics.jsonl  loss.png  samples.jsonl  result.json
    FT_OUTPUT_DIR/result.json      a copy of the latest run's result (the only one for early failures)

Every path here is created, replaced and deleted through app/safeio.py: never through a link. A job folder that
is a link, or holds a link or a special file, is refused (exit 2) once its lock is held.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.safeio import (
    append,
    check_tree,
    fsync_dir,
    is_real_dir,
    make_dir,
    open_lock,
    read_own,
    remove,
    temp_path,
    write_atomic,
)

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
        """The result.json of an earlier run of this job, read without following a link (None when absent)."""
        data = read_own(self.result)
        try:
            result = json.loads(data) if data is not None else None
        except ValueError:  # half a file from another writer, or not the job's
            return None
        return result if isinstance(result, dict) else None

    def complete_checkpoints(self) -> list[Path]:
        """checkpoint-N folders in step order; anything half-written lives under .staging/ and is ignored, and so
        is anything that is not a real folder (a planted link is never read as a checkpoint)."""
        if not is_real_dir(self.checkpoints):
            return []
        found = []
        for path in self.checkpoints.iterdir():
            match = CHECKPOINT_RE.match(path.name)
            if match and is_real_dir(path) and (path / "trainer_state.json").is_file():
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def clear_staging(self) -> None:
        remove(self.staging)

    def prepare_checkpoints(self) -> None:
        """checkpoints/ and checkpoints/.staging/ (the Trainer's output_dir) as real folders, made by the job before
        the Trainer writes into them (a link there is refused, never followed)."""
        make_dir(self.checkpoints)
        make_dir(self.staging)

    def prepare_staging(self, name: str) -> Path:
        """A real .staging/<name>/ for the Trainer to write a checkpoint into, made before it writes (every rank
        may call this: an existing real folder is kept; a link planted there is refused)."""
        self.prepare_checkpoints()
        return make_dir(self.staging / name)

    def retire(self, path: Path) -> None:
        """Delete a published folder (an old checkpoint): renamed out of sight first, so that a kill while
        deleting never leaves a half-deleted folder under its name."""
        trash = temp_path(self.staging if is_real_dir(self.staging) else path.parent, path.name, "old")
        os.replace(path, trash)
        remove(trash)

    def clear_temporaries(self) -> None:
        """Remove what a killed run left half-written: staged checkpoints and `.<name>.tmp-*` files and folders,
        `.<name>.old-*` folders (the job's lock is held, so no other process is writing them). Links are
        removed as links, never followed."""
        self.clear_staging()
        for pattern in (".*.tmp-*", ".*.old-*"):
            for path in self.root.glob(pattern):
                remove(path)

    def reset(self) -> None:
        """Forget a previous run (FT_OVERWRITE=true): its model, checkpoints and metrics."""
        for path in (self.adapter, self.merged, self.checkpoints, self.metrics, self.plot, self.samples, self.result):
            remove(path)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def fsync_tree(path: Path) -> None:
    """Flush a written folder's files and the folder itself to disk before it is renamed into place (links are
    not followed: the job writes none). Files a library wrote through a private temporary file (safetensors:
    0600) get the mode of any other file the job writes (0666 less the umask), so that whoever may read the
    volume can load the adapter."""
    mode = 0o666 & ~_umask()
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a whole folder into place, replacing an older one: `final` names the old or the new folder, whole,
    at every moment (an atomic exchange where the file system has one). Whatever else is at `final` (a link
    planted there) is removed as itself, never followed."""
    fsync_tree(tmp)
    try:
        mode = os.lstat(final).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISDIR(mode):
        remove(final)  # a link or a file: unlinked, its target untouched
        mode = None
    if mode is None:
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        remove(tmp)  # now the old folder
    else:  # no atomic exchange: for a moment only .<name>.old-* holds the old folder
        old = temp_path(final.parent, final.name, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        remove(old)
    fsync_dir(final.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or file system lacks it."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def encode_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under an unpredictable temporary name in the same folder, fsync, rename: whole or absent, never
    through a link (app/safeio.py write_atomic)."""
    write_atomic(Path(path), encode_json(obj))


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Lines of metrics.jsonl / samples.jsonl: appended to a regular file, never through a link, no secret in them."""
    from app.result import redact

    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    append(Path(path), redact(text).encode("utf-8"))


class JobLock:
    """An exclusive lock on a job's folder for the life of this process (released on close or exit)."""

    def __init__(self, fd: int):
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_writable(output_dir: Path) -> None:
    """FT_OUTPUT_DIR must be a folder this process can create files in (SettingsError otherwise)."""
    from app.errors import SettingsError

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = temp_path(output_dir, "write-test")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        os.unlink(probe)
    except OSError as err:
        why = "it is a file, not a folder" if output_dir.is_file() else err.strerror
        raise SettingsError([f"FT_OUTPUT_DIR={output_dir}: not writable ({why}). Mount a writable volume "
                             "there (e.g. -v ./output:/output) or point FT_OUTPUT_DIR elsewhere."]) from None


def open_job(output_dir: Path, job_id: str, lock: bool = True) -> tuple[JobDir, JobLock | None]:
    """Create (or reopen) FT_OUTPUT_DIR/<job_id>/ and take its lock (`lock=False`: data-parallel ranks other than
    0, whose rank 0 holds it). A job already running in another process is refused (SettingsError), and so is a
    job folder that is a link, or holds one (app/safeio.py: the job never writes through a link)."""
    import fcntl

    from app.errors import SettingsError

    check_writable(output_dir)
    job = JobDir(output_dir / job_id)
    make_dir(job.root)
    if not lock:
        return job, None
    fd = open_lock(job.root / ".lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SettingsError([f"job {job_id} is already running in another process on {job.root} (same settings "
                             "and data). Wait for it, or change FT_JOB_ID_SUFFIX to train a separate copy."]) from None
    try:
        check_tree(job.root)  # under the lock: nothing the job would write through is a link
    except BaseException:
        os.close(fd)
        raise
    return job, JobLock(fd)


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
