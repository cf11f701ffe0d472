"""What the PEFT-based backends share: the adapter as PEFT saves it, LoRA taken off again (PEFT's unload), and eval
mode with the KV cache for sampling."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


class PeftBackend:
    def remove_lora(self, model):
        """PEFT's documented way back to the base: `unload()` swaps every LoRA layer for the layer it wraps (the
        base's own module objects, unchanged) and deletes the base's `peft_config`; nothing is merged."""
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise TypeError(f"remove_lora expects the PeftModel that add_lora returned, got {type(model).__name__}")
        return model.unload()

    def save_adapter(self, model, tokenizer, out_dir: Path) -> None:
        model.save_pretrained(out_dir)
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
