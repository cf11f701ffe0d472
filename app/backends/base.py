"""What the PEFT-based backends share: the adapter as PEFT saves it, LoRA taken off again (PEFT's unload), and eval
mode with the KV cache for sampling."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def base_model_reference(name_or_path: str | None) -> str | None:
    """How a saved adapter names its base model so that PEFT loads it from any folder: the hub id of a model
    read from the HF cache (.../models--org--name/snapshots/<revision>: hub ids hold no '--'), the absolute
    path of a local folder (the job is often given a relative one), anything else as it is."""
    if not name_or_path:
        return name_or_path
    path = Path(name_or_path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    if path.is_dir():
        return os.path.abspath(path)
    return name_or_path


class PeftBackend:
    def remove_lora(self, model):
        """PEFT's documented way back to the base: `unload()` swaps every LoRA layer for the layer it wraps (the
        base's own module objects, unchanged) and deletes the base's `peft_config`; nothing is merged."""
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise TypeError(f"remove_lora expects the PeftModel that add_lora returned, got {type(model).__name__}")
        return model.unload()

    def save_adapter(self, model, tokenizer, out_dir: Path) -> None:
        configs = getattr(model, "peft_config", {}).values()
        given = [(config, config.base_model_name_or_path) for config in configs]
        for config, name in given:
            config.base_model_name_or_path = base_model_reference(name)
        try:
            model.save_pretrained(out_dir)
        finally:
            for config, name in given:  # the live model keeps what it was loaded with
                config.base_model_name_or_path = name
        tokenizer.save_pretrained(out_dir)

    @contextmanager
    def inference_mode(self, model):
        """Eval mode, no gradients, for the duration (sampling and log-probability callbacks)."""
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            if was_training:
                model.train()
