"""Step 7: the trained model on the volume, whole or absent: adapter/ always, merged/ when asked.

Each is written under a temporary name in the job's folder and renamed into place when whole (app/jobdir.py).
A full volume while a checkpoint or the model is written is a training failure with the cause (exit 4),
not a traceback; the last complete checkpoint stays, and the same command resumes.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from app.errors import TrainingError
from app.jobdir import JobDir, publish_dir


@contextmanager
def disk_full_is_a_training_error(job: JobDir, output_dir: Path):
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        last = job.latest_checkpoint()
        raise TrainingError(
            f"FT_OUTPUT_DIR={output_dir} is full ({err.strerror}) while writing {err.filename or 'a file'}. "
            f"{'The last complete checkpoint is ' + last.name if last else 'No checkpoint was saved'}; free space "
            "(or mount a larger volume) and rerun the same command to resume."
        ) from None


def save_model(session, model) -> Path:
    """adapter/ always (small, and nothing is lost if merging fails); merged/ too when asked. Returns the folder
    that result.json names."""
    prepared, job = session.prepared, session.job
    settings, backend = prepared.settings, prepared.backend
    tmp = job.root / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    backend.save_adapter(model, prepared.tokenizer, tmp)
    publish_dir(tmp, job.adapter)
    if not settings.merge_before_push:
        return job.adapter
    shape = prepared.shape
    needed = (shape.params * 2 if shape else 0) * 1.05 + 2**30
    free = shutil.disk_usage(job.root).free
    if free < needed:
        raise TrainingError(
            f"not enough disk for the merged model on FT_OUTPUT_DIR={settings.output_dir}: it needs about "
            f"{needed / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free. The adapter is saved at {job.adapter}; "
            "free space and rerun (the job resumes and only merges), or set FT_MERGE_BEFORE_PUSH=false."
        )
    tmp = job.root / f".merged.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    backend.save_merged(model, prepared.tokenizer, settings, session.model_path, prepared.hardware, tmp, job.adapter)
    publish_dir(tmp, job.merged)
    return job.merged
