"""Steps 2, 3 and 7 for each backend: load the model, add LoRA, save the adapter or merged model.

Only these differ between backends; the data, the masks, the trainer and the result are shared.
`auto` picks unsloth when CUDA is present and unsloth is installed, else hf (transformers + PEFT).
unsloth patches transformers, TRL and PEFT when imported, so `select_backend` imports it before the
pipeline imports any of them.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Protocol

from app.errors import SettingsError

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str

    def load_model(self, settings, model_path, hardware): ...

    def add_lora(self, model, settings, hardware): ...

    def save_merged(self, model, tokenizer, settings, model_path, hardware, out_dir, adapter_dir): ...


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def select_backend(requested: str, cuda: bool) -> Backend:
    """The backend object; imports unsloth first when it is chosen (it must precede transformers/peft/trl)."""
    if requested == "auto":
        requested = "unsloth" if cuda and unsloth_installed() else "hf"
    if requested == "unsloth":
        if not cuda:
            raise SettingsError(["FT_BACKEND=unsloth needs a CUDA GPU and none is visible; use FT_BACKEND=hf "
                                 "(or auto) to train on the CPU."])
        if not unsloth_installed():
            raise SettingsError(["FT_BACKEND=unsloth but unsloth is not installed in this environment; use the "
                                 "GPU image (requirements/gpu.txt) or FT_BACKEND=hf."])
        from app.backends import unsloth as module
    else:
        from app.backends import hf as module
    return module.BACKEND
