"""Step 8: result.json, the contract with pipelines that called OpenWeights (DESIGN.md, "Outputs").

Written atomically on every ending (completed, failed, interrupted), into the job directory and as a copy
at FT_OUTPUT_DIR/result.json. No secret ever enters it: params come from Settings.public_params().

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

import importlib.metadata
import logging
import math
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.jobdir import write_json_atomic

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


def redact(text: str) -> str:
    """Remove the values of *_TOKEN/*_KEY environment variables from a message (errors quote inputs)."""
    from app.settings import secret_values

    for name, value in secret_values():
        if len(value) >= 8:
            text = text.replace(value, f"<{name}>")
    return text


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


def write_result(result: dict[str, Any], output_dir: Path, job_root: Path | None) -> Path | None:
    """Write result.json into the job directory and its copy at the volume's top; return the first path written
    (the job's, when there is a job), or None when neither could be written."""
    paths = ([job_root / "result.json"] if job_root is not None else []) + [Path(output_dir) / "result.json"]
    written = None
    for path in paths:
        try:
            write_json_atomic(path, result)
        except OSError as err:  # the volume itself is the problem (read-only, full): say so, don't mask the cause
            log.error("cannot write %s: %s", path, err)
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
