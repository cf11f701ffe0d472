"""Step 8: result.json, the contract with pipelines that called OpenWeights (DESIGN.md, "Outputs").

Written atomically on every ending (completed, failed, interrupted), into the job directory and as a copy
at FT_OUTPUT_DIR/result.json, never through a link and never over a completed result of the same job. No
secret ever enters it: params come from Settings.public_params(), and every string in it is redacted (every
form of every secret's value: a token pasted into another setting is masked too).

It also carries every field that openweights' own `Job` dataclass requires (openweights 0.14.0,
client/jobs.py), so `Job.from_row(result, manager)` reads it as it reads a row of OpenWeights' jobs table. The
fields that describe OpenWeights' cloud scheduling get what is true of a local run:

    requires_vram_gb  the preflight's estimate of the peak GPU memory, rounded up (null without a GPU)
    docker_image      null: the image's name is not knowable from inside the container
    script            "python -m app train", the command that wrote the result
    organization_id   null: no OpenWeights organisation
    updated_at        = finished_at
    worker_id         the host name (the pod's name on Kubernetes)
    timeout           null: the job sets no deadline of its own
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.errors import JobError
from app.jobdir import encode_json
from app.safeio import read_own, write_atomic

log = logging.getLogger(__name__)

def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    found = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "bitsandbytes"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


MIN_SECRET_CHARS = 6  # shorter values of *_KEY-like variables ("1", "true") are not secrets worth a mask


def _forms(value: str) -> set[str]:
    """Every way a secret's value shows up in text: raw, stripped (a Kubernetes secret made from a file ends in a
    newline), as Python writes it in a repr (str or bytes: an HTTP library's header), JSON-escaped, URL-quoted."""
    from urllib.parse import quote, quote_plus

    forms = set()
    for text in {value, value.strip()}:
        forms |= {text, repr(text)[1:-1], json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1],
                  quote(text), quote(text, safe=""), quote_plus(text), repr(text.encode("utf-8", "replace"))[2:-1]}
    return {form for form in forms if len(form.strip()) >= MIN_SECRET_CHARS}


@functools.lru_cache(maxsize=8)
def _replacements(secrets: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    pairs = {(form, f"<{name}>") for name, value in secrets for form in _forms(value)}
    return tuple(sorted(pairs, key=lambda pair: -len(pair[0])))  # longest first: "tok\n" before "tok"


def redact(text: str) -> str:
    """Remove every form (see _forms) of the value of every secret variable (*_TOKEN, *_KEY, *_SECRET,
    *_PASSWORD) from a text: log lines, messages, result.json, metrics, what is printed."""
    from app.settings import secret_values

    for form, mask in _replacements(tuple(sorted(secret_values()))):
        if form in text:
            text = text.replace(form, mask)
    return text


def redact_obj(obj: Any) -> Any:
    """`obj` (JSON-like) with every string, keys included, redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact(str(key)): redact_obj(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(value) for value in obj]
    return obj


def build_result(
    *,
    job_id: str | None,
    status: str,
    params: dict[str, Any] | None,
    created_at: str,
    outputs: dict[str, Any] | None = None,
    gpu: dict[str, Any] | None = None,
    ignored: list[str] | None = None,
    error: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if error is not None:
        error = {**error, "message": redact(error["message"])}
    finished_at = now()
    estimate = (gpu or {}).get("estimated_peak_gb")
    result = {
        "id": job_id,
        "type": "fine-tuning",
        "status": status,
        "model": (params or {}).get("model"),
        "params": {"validated_params": params or {}},
        "outputs": outputs or {},
        "gpu": gpu,
        "versions": versions(),
        "ignored_params": ignored or [],
        "error": error,
        "data": data or {},
        "created_at": created_at,
        "finished_at": finished_at,
        # openweights' Job: the fields it requires beyond the ones above (see the module's docstring)
        "requires_vram_gb": math.ceil(estimate) if estimate else None,
        "docker_image": None,
        "script": "python -m app train",
        "organization_id": None,
        "updated_at": finished_at,
        "worker_id": socket.gethostname(),
        "timeout": None,
    }
    result.update(extra or {})
    return result


def encode_result(result: dict[str, Any]) -> bytes:
    """result.json's bytes: every string redacted, the whole serialised; a result that cannot be serialised (a
    value too deep or of an unknown kind) becomes its id, status and error, so that one is always written."""
    try:
        return encode_json(redact_obj(json.loads(json.dumps(result, default=str))))
    except (ValueError, TypeError, RecursionError, OverflowError) as err:
        log.error("result.json cannot hold every field (%s): writing its id, status and error only", type(err).__name__)
        error = result.get("error") if isinstance(result.get("error"), dict) else None
        minimal = {"id": str(result.get("id")), "type": "fine-tuning", "status": str(result.get("status")),
                   "error": {key: str(error.get(key)) if key != "exit_code" else error.get(key)
                             for key in ("type", "message", "exit_code")} if error else None,
                   "created_at": str(result.get("created_at")), "finished_at": now()}
        return encode_json(redact_obj(minimal))


def _keeps_completed(path: Path, status: str) -> bool:
    """A completed result is never replaced by another ending (a refused or interrupted rerun, a failure after
    the job returned its earlier result); FT_OVERWRITE=true removes it first (JobDir.reset)."""
    if status == "completed":
        return False
    data = read_own(path)
    try:
        previous = json.loads(data) if data is not None else None
    except ValueError:
        return False
    return isinstance(previous, dict) and previous.get("status") == "completed"


def write_result(result: dict[str, Any], output_dir: Path, job_root: Path | None) -> Path | None:
    """Write result.json into the job directory and its copy at the volume's top; return the first path written
    (the job's, when there is a job), or None when neither could be written. Never through a link (a link planted
    at either is replaced), never over a completed result in the job's folder, never a secret in it."""
    data = encode_result(result)
    paths = ([Path(job_root) / "result.json"] if job_root is not None else []) + [Path(output_dir) / "result.json"]
    written = None
    for path in paths:
        try:
            if path.parent == Path(output_dir):  # the volume itself may not exist yet (an early failure)
                path.parent.mkdir(parents=True, exist_ok=True)
            if job_root is not None and path.parent == Path(job_root) and _keeps_completed(path, result.get("status")):
                log.warning("%s holds a completed result: kept (this run's ending is in %s)", path,
                            Path(output_dir) / "result.json")
                continue
            write_atomic(path, data, parent_may_be_link=path.parent == Path(output_dir))
        except OSError as err:  # the volume itself is the problem (read-only, full): say so, don't mask the cause
            log.error("cannot write %s: %s", path, err)
            continue
        except JobError as err:  # a link or special file planted where the job's folder should be
            log.error("cannot write %s: %s", path, err.message)
            continue
        written = written or path
    return written


@dataclass
class Recorder:
    """What is known about this run so far, enough to write result.json at any ending. The pipeline's table of
    contents (app/pipeline.py) fills it in as the steps return; the steps themselves never see it."""

    created_at: str = field(default_factory=now)
    settings: Any = None
    ignored: list[str] = field(default_factory=list)
    job_id: str | None = None
    job_root: Path | None = None  # bound once the job's lock is held: a refused twin never writes into its folder
    hardware: Any = None
    backend: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    plan: Any = None
    outputs: dict[str, Any] = field(default_factory=dict)
    finetuned_model_id: str | None = None

    def result(self, status: str, error: Any = None) -> dict[str, Any]:
        """The result as known now; when a field cannot be built (the crash handler calls this after anything),
        the id, status and error alone: a result.json is always written."""
        try:
            return self._result(status, error)
        except JobError:  # SIGTERM while a completed result is built: an interruption, not a bare result
            raise
        except Exception as err:  # the crash handler must not crash: keep what matters
            log.error("result.json is written without its details (%s: %s)", type(err).__name__, str(err)[:200])
            error = error.as_dict() if hasattr(error, "as_dict") else error
            return {"id": self.job_id, "type": "fine-tuning", "status": status, "error": error,
                    "created_at": self.created_at, "finished_at": now()}

    def _result(self, status: str, error: Any = None) -> dict[str, Any]:
        params = self.settings.public_params() if self.settings else None
        if params is not None:
            params["finetuned_model_id"] = self.finetuned_model_id or params.get("finetuned_model_id")
        if hasattr(error, "as_dict"):
            error = error.as_dict()
        gpu = self.hardware.as_dict() if self.hardware else None
        outputs = dict(self.outputs)
        if self.plan is not None:
            outputs = {**self.plan.outputs(), **outputs}
            if gpu is not None and self.plan.estimate is not None:
                gpu["estimated_peak_gb"] = round(self.plan.estimate.total_gb, 2)
        return build_result(
            job_id=self.job_id, status=status, params=params, created_at=self.created_at, outputs=outputs,
            gpu=gpu, ignored=self.ignored, error=error, data=self.data,
            extra={"backend": self.backend, "adjustments": list(self.plan.adjustments) if self.plan else []},
        )

    def write(self, result: dict[str, Any]) -> Path | None:
        from app.launch import is_main
        from app.settings import failure_output_dir

        if not is_main():  # data-parallel ranks: rank 0 alone writes the result
            return None
        output_dir = self.settings.output_dir if self.settings else failure_output_dir()
        return write_result(result, output_dir, self.job_root)
