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

# Settings that do not change what is trained: they do not enter the job id.
NOT_IN_JOB_ID = {
    "output_dir", "config_file", "config_index", "overwrite", "hf_token", "push_to_hub", "push_to_private", "report_to",
    "finetuned_model_id", "num_gpus", "backend", "training_file", "test_file", "logp_callback_datasets",
    "gradient_checkpointing",
}
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def job_id(params: dict[str, Any], file_hashes: dict[str, str], suffix: str | None) -> str:
    """ftjob- + 12 hex of sha256 over the training params and the data files' content hashes."""
    payload = {k: v for k, v in sorted(params.items()) if k not in NOT_IN_JOB_ID}
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
