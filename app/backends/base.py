"""What the PEFT-based backends share: the adapter as PEFT saves it, and eval mode with the KV cache for sampling."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


class PeftBackend:
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
