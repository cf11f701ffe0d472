"""The real openweights 0.14.0, the reference of the parity tests, loaded offline.

The wheel is downloaded once from PyPI (`pip download --no-deps`) into the repo's ignored `.cache/openweights/`
and unpacked there; tests that need it are skipped with the reason when PyPI cannot be reached. Its
`openweights/__init__.py` would import the whole client (supabase, openai, runpod, ...), so it is not run:
the three files that matter are loaded as they are, with the network-facing imports they make stubbed:

- `jobs/unsloth/validate.py`: `TrainingConfig`, `SamplingCallbackModel` (needs pydantic only);
- `client/jobs.py`: `Job` (the dataclass `ow.jobs.retrieve()` returns) and `Jobs` (stubs: postgrest's
  APIError, the supabase retry decorator, runpod's hardware-name normaliser);
- `jobs/unsloth/__init__.py`: `FineTuning.create`, run against an in-memory stand-in for the OpenWeights
  database and file store, so `create()` builds validated_params exactly as it does in the cloud.

    ow = load()                                      # or None when the wheel cannot be fetched
    job = ow.create(model=..., training_file=..., loss="sft", r=8)
    job.params["validated_params"]                   # what the worker (and this job) receives
"""

from __future__ import annotations

import hashlib
import importlib
import subprocess
import sys
import types
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

VERSION = "0.14.0"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "openweights"


class Unavailable(RuntimeError):
    """The wheel is not cached and PyPI could not provide it."""


def wheel() -> Path:
    cached = sorted(CACHE.glob(f"openweights-{VERSION}-*.whl"))
    if cached:
        return cached[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--timeout", "30",
               "--retries", "1", f"openweights=={VERSION}", "-d", str(CACHE)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"pip download openweights=={VERSION} failed: {err}") from None
    cached = sorted(CACHE.glob(f"openweights-{VERSION}-*.whl"))
    if proc.returncode != 0 or not cached:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"pip download openweights=={VERSION} failed (PyPI unreachable?): {last}")
    return cached[0]


def source() -> Path:
    """The unpacked package: <cache>/<version>/openweights/."""
    target = CACHE / VERSION
    done = target / ".unpacked"
    if not done.exists():
        with zipfile.ZipFile(wheel()) as archive:
            archive.extractall(target)
        done.touch()
    return target / "openweights"


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


class APIError(Exception):
    """postgrest.exceptions.APIError, as far as Jobs.get_or_create_or_reset uses it."""


@contextmanager
def _stubbed(package: Path):
    """The network-facing modules replaced, the real files importable; sys.modules as it was afterwards."""
    before = dict(sys.modules)
    stubs = {
        "postgrest": _module("postgrest"),
        "postgrest.exceptions": _module("postgrest.exceptions", APIError=APIError),
        "openweights": _module("openweights", __path__=[str(package)], register=lambda name: (lambda cls: cls)),
        "openweights.client": _module("openweights.client", __path__=[str(package / "client")]),
        "openweights.client.decorators": _module(
            "openweights.client.decorators", supabase_retry=lambda *a, **k: (lambda fn: fn)
        ),
        "openweights.cluster": _module("openweights.cluster", __path__=[]),
        "openweights.cluster.start_runpod": _module(
            "openweights.cluster.start_runpod", normalize_hardware_type=lambda hardware: hardware
        ),
        "openweights.jobs": _module("openweights.jobs", __path__=[str(package / "jobs")]),
    }
    sys.modules.update(stubs)
    try:
        yield stubs
    finally:
        for name in set(sys.modules) - set(before):
            del sys.modules[name]
        sys.modules.update(before)


class _Table:
    """The `jobs` table of OpenWeights' database, for one create(): no row yet, then the inserted row with the
    columns the database fills in (created_at, updated_at, outputs, worker_id, timeout)."""

    def __init__(self, rows: dict[str, dict]):
        self.rows, self._insert = rows, None

    def select(self, *_):
        return self

    def eq(self, column, value):
        self._id = value
        return self

    def single(self):
        return self

    def insert(self, data):
        now = datetime.now(UTC).isoformat()
        self._insert = {"outputs": None, "worker_id": None, "timeout": None, "created_at": now, "updated_at": now,
                        **data}
        return self

    def execute(self):
        if self._insert is not None:
            self.rows[self._insert["id"]] = self._insert
            return types.SimpleNamespace(data=[self._insert])
        if self._id not in self.rows:
            raise APIError("JSON object requested, multiple (or no) rows returned: The result contains 0 rows")
        return types.SimpleNamespace(data=self.rows[self._id])


class _OpenWeights:
    """What FineTuning.create reads of the client: the org, the HF org, file uploads, the jobs table."""

    hf_org = "my-org"
    organization_id = "org-parity-tests"

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.files = types.SimpleNamespace(create=self._upload)
        self._supabase = types.SimpleNamespace(table=lambda name: _Table(self.rows))

    @staticmethod
    def _upload(handle, purpose):
        return {"id": f"{purpose}:file-{hashlib.sha256(handle.read()).hexdigest()[:12]}"}


@dataclass
class OpenWeights:
    TrainingConfig: type
    SamplingCallbackModel: type
    Job: type
    FineTuning: type
    source: Path

    def create(self, **params: Any):
        """FineTuning.create(**params) as the cloud runs it: returns OpenWeights' Job."""
        return self.FineTuning(_OpenWeights()).create(**params)

    def validated_params(self, **params: Any) -> dict[str, Any]:
        return self.create(**params).params["validated_params"]


_LOADED: OpenWeights | None = None


def load() -> OpenWeights:
    """openweights 0.14.0's models and FineTuning (raises Unavailable when the wheel cannot be fetched)."""
    global _LOADED
    if _LOADED is None:
        package = source()
        with _stubbed(package) as stubs:
            jobs = importlib.import_module("openweights.client.jobs")
            stubs["openweights"].Jobs = jobs.Jobs
            unsloth = importlib.import_module("openweights.jobs.unsloth")
            validate = importlib.import_module("openweights.jobs.unsloth.validate")
        _LOADED = OpenWeights(validate.TrainingConfig, validate.SamplingCallbackModel, jobs.Job, unsloth.FineTuning,
                              package)
    return _LOADED
