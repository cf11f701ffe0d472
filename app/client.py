"""A Python API for pipelines that call OpenWeights today: the same parameters in, a job object out.

    # pip install -e /path/to/ft-job   (once; or PYTHONPATH=/path/to/ft-job)
    from app.client import fine_tune

    job = fine_tune(model="unsloth/Qwen2-7B", training_file="data/code_train.jsonl", r=8, lora_alpha=16, ...)
    adapter = job.params["validated_params"]["finetuned_model_id"]   # as with OpenWeights
    if job.status != "completed": print(job.error["message"])       # job["status"] works too

`fine_tune(**params)` takes what `ow.fine_tuning.create(**params)` takes: TrainingConfig's fields (an
OpenWeights `validated_params` passes unchanged, `training_file` and `test_file` as local paths) and create()'s
own `requires_vram_gb`, `allowed_hardware`, `docker_image` (cloud scheduling: listed in ignored_params). The
job runs as `python -m app train` in a child process (its own CUDA context, unsloth imported first, the GPU
memory returned when it ends), with the parameters written to an OpenWeights-style config file: they are
validated exactly as FT_CONFIG_FILE is (unknown keys refused, OpenWeights-only ones listed in ignored_params).
OpenWeights' `output_dir` is one of those: the outputs go to `ft_output_dir` (the child's FT_OUTPUT_DIR), never
to the checkpoint folder a validated_params names. FT_* variables of the calling process are not passed on:
the call's parameters are the settings. Relative paths (model, files, ft_output_dir) are read from the caller's
working directory, as in the caller's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class FineTuneError(RuntimeError):
    """The job ended without writing a result (it could not start, or was killed)."""


class FineTuneJob(dict):
    """result.json as OpenWeights' users read a job: `job.status` and `job["status"]` alike.

    A plain dict underneath (json.dumps, ==, copy and pickle as usual); keys read as attributes. The job has
    ended when fine_tune() returns, so refresh() has nothing to fetch and returns the job itself."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no key or attribute {name!r}") from None

    def refresh(self) -> FineTuneJob:
        return self


def fine_tune(ft_output_dir: str | os.PathLike = "output", backend: str = "auto", timeout: float | None = None,
              **params: Any) -> FineTuneJob:
    """Train with OpenWeights parameters; return the job's result.json as a FineTuneJob. A failed or
    interrupted job returns its result (status, error), like OpenWeights' job object; it does not raise.

    ft_output_dir: the volume the job writes <job_id>/ and result.json to (FT_OUTPUT_DIR of the child).
    backend: FT_BACKEND. timeout: seconds before the child is killed (subprocess.TimeoutExpired)."""
    output_dir = Path(ft_output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    from app.settings import child_environment

    env = child_environment(FT_OUTPUT_DIR=str(output_dir), FT_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="ft-params-", delete=False) as handle:
        json.dump(params, handle, default=str)
        env["FT_CONFIG_FILE"] = handle.name
    top = output_dir / "result.json"
    before = top.stat().st_mtime_ns if top.exists() else None
    try:
        # In the caller's folder (its relative paths), without it on sys.path (-P): a package of the caller's
        # named `app` must not stand in for this one.
        proc = subprocess.run([sys.executable, "-P", "-m", "app", "train"], env=env, timeout=timeout)
    finally:
        os.unlink(env["FT_CONFIG_FILE"])
    if not top.exists() or top.stat().st_mtime_ns == before:
        raise FineTuneError(f"the job exited with code {proc.returncode} without writing {top}; see its log above")
    return FineTuneJob(json.loads(top.read_text()))
