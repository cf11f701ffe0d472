"""The values the pipeline's steps hand forward (app/pipeline.py): each made once, never changed after."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.dataset import TrainingData
from app.hardware import Hardware
from app.jobdir import JobDir, JobLock
from app.memory import Shape
from app.plan import Plan


@dataclass(frozen=True)
class Prepared:
    """Everything decided without loading a weight: what `check` reports and `setup` builds on."""

    settings: Any  # app.settings.Settings
    hardware: Hardware
    backend: Any  # app.backends.Backend
    model_path: Path  # config.json + tokenizer (a hub model's weights are fetched after the preflight)
    shape: Shape | None  # None when config.json cannot be read: no memory estimate
    tokenizer: Any
    data: TrainingData
    hashes: dict[str, str]  # content hashes of the input files (the job id's)
    job_id: str
    plan: Plan


@dataclass
class Session:
    """A prepared run with its job folder (locked by this process) and the model with fresh LoRA weights.
    A job that completed before comes back with `completed` (its result) and no model."""

    prepared: Prepared
    job: JobDir
    lock: JobLock | None
    model: Any = None
    model_path: Path | None = None  # the folder with the weights
    completed: dict[str, Any] | None = None
    thaw: bool = False  # setup froze the heap after loading the base (reuse.freeze_heap): close() thaws it

    @property
    def settings(self):
        return self.prepared.settings

    @property
    def plan(self) -> Plan:
        return self.prepared.plan

    def close(self) -> None:
        if self.thaw:
            from app.backends.reuse import thaw_heap

            thaw_heap()
            self.thaw = False
        if self.lock is not None:
            self.lock.close()


@dataclass(frozen=True)
class Outcome:
    """What training produced: the trainer's metrics and the saved model's folder."""

    metrics: dict[str, Any]
    artifact: Path
