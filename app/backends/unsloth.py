"""The unsloth backend (CUDA): fused kernels, its own gradient checkpointing, 16-bit LoRA and 4-bit QLoRA.

Importing this module imports unsloth, which must happen before transformers, TRL and PEFT are imported
(it patches them); `app.backends.select_backend` does so before the pipeline loads anything else.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Offline-safe defaults, set before the import: no statistics ping to the hub, compiled kernels and the
# Triton cache in a writable place (the image's code folder is read-only to the non-root user).
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", os.path.join(os.environ.get("TMPDIR", "/tmp"), "unsloth_compiled_cache"))
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "triton_cache"))

import unsloth  # noqa: E402,F401  (must precede transformers/peft/trl)
from unsloth import FastLanguageModel  # noqa: E402

from app.errors import SettingsError  # noqa: E402
from app.launch import local_rank, world_size  # noqa: E402

log = logging.getLogger(__name__)


class UnslothBackend:
    name = "unsloth"

    def load_model(self, settings, model_path: Path, hardware):
        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(model_path),
            max_seq_length=settings.max_seq_length,
            dtype=hardware.dtype,
            load_in_4bit=settings.load_in_4bit,
            load_in_16bit=not settings.load_in_4bit,
            token=settings.hf_token.get_secret_value() if settings.hf_token else None,
            use_gradient_checkpointing="unsloth" if hardware.gradient_checkpointing else False,
            random_state=settings.seed,
            use_exact_model_name=True,  # a local path or the id as given: never swap in a pre-quantized repo
            **({"device_map": {"": local_rank()}} if world_size() > 1 else {}),  # one whole copy per rank
        )
        return model

    def add_lora(self, model, settings, hardware):
        try:
            return FastLanguageModel.get_peft_model(
                model,
                r=settings.r,
                target_modules=settings.target_modules,
                lora_alpha=settings.lora_alpha,
                lora_dropout=settings.lora_dropout,
                bias=settings.lora_bias,
                use_gradient_checkpointing="unsloth" if hardware.gradient_checkpointing else False,
                random_state=settings.seed,
                use_rslora=settings.use_rslora,
                max_seq_length=settings.max_seq_length,
            )
        except ValueError as err:
            if "not found" in str(err) or "target_modules" in str(err).lower():
                raise SettingsError([f"FT_TARGET_MODULES={','.join(settings.target_modules)}: {err}"]) from None
            raise

    def save_merged(self, model, tokenizer, settings, model_path: Path, hardware, out_dir: Path,
                    adapter_dir: Path) -> None:
        """merged_16bit: unsloth dequantizes a 4-bit base from the original weights before merging."""
        model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")


BACKEND = UnslothBackend()
