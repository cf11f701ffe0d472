"""A Python API for pipelines that call OpenWeights today: same parameters in, same result dict out.

    from app.client import fine_tune

    result = fine_tune(model="unsloth/Qwen2-7B", training_file="data/code_train.jsonl", r=8, lora_alpha=16, ...)
    adapter = result["params"]["validated_params"]["finetuned_model_id"]   # as with OpenWeights
    if result["status"] != "completed": print(result["error"]["message"])

The job runs as `python -m app train` in a child process (its own CUDA context, unsloth imported first, the
GPU memory returned when it ends), with the parameters written to an OpenWeights-style config file: they are
validated exactly as FT_CONFIG_FILE is (unknown keys refused, OpenWeights-only ones listed in ignored_params).
FT_* variables of the calling process are not passed on: the call's parameters are the settings.
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


def fine_tune(output_dir: str | os.PathLike = "output", backend: str = "auto", timeout: float | None = None,
              **params: Any) -> dict[str, Any]:
    """Train with OpenWeights `validated_params` (`training_file` and `test_file` as local paths); return the
    job's result.json as a dict. A failed or interrupted job returns its result (status, error), like
    OpenWeights' job object; it does not raise."""
    output_dir = Path(output_dir).resolve()
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
        proc = subprocess.run([sys.executable, "-m", "app", "train"], env=env, cwd=REPO, timeout=timeout)
    finally:
        os.unlink(env["FT_CONFIG_FILE"])
    if not top.exists() or top.stat().st_mtime_ns == before:
        raise FineTuneError(f"the job exited with code {proc.returncode} without writing {top}; see its log above")
    return json.loads(top.read_text())
