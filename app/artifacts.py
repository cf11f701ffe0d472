"""Step 7: the trained model on the volume, whole or absent: adapter/ always, merged/ when asked.

Each is written into a new folder with an unpredictable name in the job's folder and renamed into place when whole
(app/jobdir.py, app/safeio.py). A volume that fails while a checkpoint or the model is written (full, over quota,
its job folder removed) is a training failure with the cause (exit 4), not a traceback, whatever library raised it
(torch's RuntimeError, safetensors' SafetensorError, an OSError); the last complete checkpoint stays, and the
same command resumes.
"""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

from app.errors import JobError, TrainingError
from app.jobdir import JobDir, publish_dir
from app.safeio import is_real_dir, make_temp_dir, remove

# How libraries word a failed write when they drop the errno: safetensors keeps the OS message ("No space left on
# device (os error 28)"); torch's PytorchStreamWriter says only that a write failed ("unexpected pos 576 vs 534",
# "file write failed", its C++ stream's "iostream error"), measured on a full 1 MiB tmpfs with torch 2.13.
_FULL = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122", "enospc", "edquot")
_WRITE_FAILED = ("pytorchstreamwriter", "unexpected pos", "iostream error", "file write failed",
                 "error while serializing", "read-only file system", "input/output error")
LOW_FREE_BYTES = 64 * 2**20  # below this, a failed write is taken as the volume being full


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def volume_failure(err: BaseException, job: JobDir, output_dir: Path) -> tuple[str, str] | None:
    """Why `err` is the output volume's fault and what to do (two sentences), or None when it is not (a bug stays a
    bug)."""
    resume = "rerun the same command to resume"
    if not is_real_dir(job.root):
        return (f"the job folder {job.root} disappeared during the run (removed, or FT_OUTPUT_DIR={output_dir} "
                "unmounted): the job cannot write its checkpoints or model there",
                f"keep the volume mounted and the folder in place, and {resume}")
    errors = list(_chain(err))
    text = " ".join(str(e).lower() for e in errors)
    codes = {getattr(e, "errno", None) for e in errors}
    full = bool(codes & {errno.ENOSPC, errno.EDQUOT}) or any(marker in text for marker in _FULL)
    failing = bool(codes & {errno.EROFS, errno.EIO}) or any(marker in text for marker in _WRITE_FAILED)
    if not full and not failing:
        return None
    try:
        free = shutil.disk_usage(job.root).free
    except OSError:
        free = None
    where = next((e.filename for e in errors if getattr(e, "filename", None)), None) or "a file"
    free_text = f"{free / 2**20:,.0f} MiB free now" if free is not None else "free space unknown"
    if errno.EROFS in codes or "read-only file system" in text:
        return (f"FT_OUTPUT_DIR={output_dir} became read-only while writing {where}",
                f"mount the volume writable and {resume}")
    if full or (free is not None and free < LOW_FREE_BYTES):
        return (f"FT_OUTPUT_DIR={output_dir} is full ({free_text}) while writing {where}",
                f"free space (or mount a larger volume) and {resume}")
    return (f"writing {where} on FT_OUTPUT_DIR={output_dir} failed ({type(err).__name__}: {str(err)[:200]}; "
            f"{free_text}): the volume is failing or full", f"check the volume and {resume}")


@contextmanager
def disk_full_is_a_training_error(job: JobDir, output_dir: Path):
    """The one place where a failing output volume becomes exit 4 (see volume_failure)."""
    try:
        yield
    except JobError:
        raise
    except Exception as err:
        found = volume_failure(err, job, output_dir)
        if found is None:
            raise
        reason, remedy = found
        last = job.latest_checkpoint()
        kept = f"the last complete checkpoint is {last.name}" if last else "no checkpoint was saved"
        raise TrainingError(f"{reason}; {kept}. {remedy[0].upper()}{remedy[1:]}.") from None


def save_model(session, model) -> Path:
    """adapter/ always (small, and nothing is lost if merging fails); merged/ too when asked. Returns the folder
    that result.json names."""
    prepared, job = session.prepared, session.job
    settings, backend = prepared.settings, prepared.backend
    tmp = make_temp_dir(job.root, "adapter")
    try:
        backend.save_adapter(model, prepared.tokenizer, tmp)
        publish_dir(tmp, job.adapter)
    finally:
        remove(tmp)  # gone after publishing; half-written on a failure (a full volume stays full otherwise)
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
    tmp = make_temp_dir(job.root, "merged")
    try:
        backend.save_merged(model, prepared.tokenizer, settings, session.model_path, prepared.hardware, tmp,
                            job.adapter)
        publish_dir(tmp, job.merged)
    finally:
        remove(tmp)
    return job.merged
