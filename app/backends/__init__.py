"""Backends: what differs between ways of running the model, and only that.

A backend loads the base model, adds LoRA (and takes it off again, for the next line of a sweep), adds its own
training arguments, says how it spends memory, saves the adapter and the merged model, and switches the model to
inference (sampling callbacks). The data,
the masks, the batch plan, the trainer and the result are shared. Adding a backend is a module here that
defines a class with the `Backend` protocol and one line in `BACKENDS`; nothing else tests a backend's name.

`auto` takes the first backend of `BACKENDS` that can run on this hardware (`unavailable()` returns None).
`activate()` imports the backend's libraries: unsloth patches transformers, TRL and PEFT when imported, so the
pipeline activates the backend before anything imports them.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from app.errors import SettingsError
from app.memory import Profile

# name -> "module:Class", in the order `auto` tries them. Imports stay cheap: the classes import their
# libraries in activate().
BACKENDS = {
    "unsloth": "app.backends.unsloth:UnslothBackend",
    "hf": "app.backends.hf:HfBackend",
}


class Backend(Protocol):
    name: str
    memory: Profile  # how it spends activation memory (app/memory.py), fitted to measured peaks

    def unavailable(self, hardware) -> str | None:
        """None when it can run here, else why not (with the remedy)."""

    def activate(self) -> None:
        """Import its libraries (before transformers/TRL/PEFT are imported anywhere)."""

    def load_model(self, settings, model_path: Path, hardware, plan) -> Any: ...

    def load_key(self, settings, plan) -> tuple:
        """The settings load_model's result depends on (besides the model folder and the hardware): runs with equal
        keys can share one loaded base model (a sweep: app/backends/reuse.py)."""

    def add_lora(self, model, settings, plan) -> Any: ...

    def remove_lora(self, model) -> Any:
        """The base model that add_lora was given, without the LoRA layers (a sweep's next line adds its own).
        What else a run changed on the base (flags, hooks, config, biases) is put back by app/backends/reuse.py."""

    def trainer_args(self, plan) -> dict[str, Any]:
        """Its own arguments of TRL's SFTConfig (e.g. who does gradient checkpointing)."""

    def save_adapter(self, model, tokenizer, out_dir: Path) -> None: ...

    def save_merged(self, model, tokenizer, settings, model_path: Path, hardware, out_dir: Path,
                    adapter_dir: Path) -> None: ...

    def inference_mode(self, model) -> AbstractContextManager: ...


def backend_class(name: str) -> type:
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def select_backend(requested: str, hardware) -> Backend:
    """The backend object for FT_BACKEND on this hardware (auto: the first one that can run here)."""
    if requested == "auto":
        for name in BACKENDS:
            backend = backend_class(name)()
            if backend.unavailable(hardware) is None:
                return backend
        raise SettingsError(["FT_BACKEND=auto: no backend can run here: "
                             + "; ".join(f"{n}: {backend_class(n)().unavailable(hardware)}" for n in BACKENDS)])
    backend = backend_class(requested)()
    reason = backend.unavailable(hardware)
    if reason is not None:
        raise SettingsError([f"FT_BACKEND={requested}: {reason}"])
    return backend
