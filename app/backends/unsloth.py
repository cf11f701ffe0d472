"""The unsloth backend (CUDA): fused kernels, its own gradient checkpointing, 16-bit LoRA and 4-bit QLoRA.

`activate()` imports unsloth, which must happen before transformers, TRL and PEFT are imported (it patches
them); the pipeline activates the backend before it loads anything else.

A sweep reuses the loaded base (app/backends/reuse.py). LoRA comes off with PEFT's `unload()` (remove_lora, shared
with hf), as for any PeftModel: unsloth's get_peft_model wraps the base with PEFT's get_peft_model, and its fused
LoRA kernels take the plain Linear layers that unload leaves (unsloth 2026.10.9, kernels/fast_lora.py). What
get_peft_model and the trainer set on the base besides (fused MLP forwards, attention apply_qkv/apply_o,
max_seq_length and for_training/for_inference on every module, requires_grad and dtypes from its k-bit
preparation, hooks, unsloth_version in the config) is put back from the snapshot taken after from_pretrained;
from_pretrained's own inputs (sequence length, checkpointing) are in load_key. Read from unsloth's source, tested
on the CPU through the hf backend; on a GPU, 20 lines of the code grid trained on one base (H100, 2026-12-08: no
line found the base changed, prompt 0's losses equal to 4 decimals across two days), but no line has been compared
with its standalone run there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

from app.backends.base import PeftBackend
from app.errors import SettingsError
from app.memory import Profile

log = logging.getLogger(__name__)


class UnslothBackend(PeftBackend):
    name = "unsloth"
    # Fused RMSNorm/RoPE/SwiGLU kernels, offloaded checkpoints, fused cross-entropy. Fitted to peaks measured on
    # an H100 (2026-11-25, packed rows of 2048, Qwen2-0.5B at micro-batch 1/2/4, bf16 and 4-bit, checkpointing on
    # and off; docs/BENCHMARKS.md, "Memory estimate"): 35.9 KB per token per layer in bf16, 32.4 KB on a 4-bit
    # base, 0.37 GiB of cross-entropy workspace; no mask term. varlen_attention is set in activate(): with torch
    # 2.11 (the pinned set) unsloth runs flattened rows through one SDPA call per row per layer, which left the
    # step launch-bound (the code run on an H200, 2026-12-01, Qwen2-7B shape, 16 rows of ~370 tokens per step:
    # 1.0 s per step padding-free vs 0.53 s padded); app.attention.enable_unsloth_varlen gives it one varlen
    # kernel call per layer instead.
    memory = Profile(layer_bytes=(16.0, 0.0, 4.43), scale_4bit=0.90, checkpoint_keeps_inputs=False,
                     recompute_fraction=0.48, logits_bytes=4.0, logits_tokens_cap=650, fp32_embeddings_4bit=False,
                     varlen_attention=False)

    def unavailable(self, hardware) -> str | None:
        if not hardware.cuda:
            return "unsloth needs a CUDA GPU and none is visible; use FT_BACKEND=hf (or auto) to train on the CPU."
        if importlib.util.find_spec("unsloth") is None:
            return ("unsloth is not installed in this environment; use the GPU image (requirements/gpu.txt) or "
                    "FT_BACKEND=hf.")
        return None

    def activate(self) -> None:
        from app.settings import set_library_defaults

        # Offline-safe defaults: no statistics ping to the hub; compiled kernels and the Triton cache in a
        # writable place (the image's code folder is read-only to the non-root user), with the autotuners' choices
        # (TRITON_CACHE_AUTOTUNING: Triton's own switch, read when a kernel module is imported) kept beside the
        # compiled kernels, so that a later run on the same card does not benchmark every config again.
        tmp = tempfile.gettempdir()
        set_library_defaults(UNSLOTH_DISABLE_STATISTICS="1", UNSLOTH_COMPILE_LOCATION=f"{tmp}/unsloth_compiled_cache",
                             TRITON_CACHE_DIR=f"{tmp}/triton_cache", TRITON_CACHE_AUTOTUNING="1")
        import unsloth  # noqa: F401  (must precede transformers/peft/trl)

        # Flattened rows (padding-free unpacked rows by default, packed rows) in one varlen kernel call per layer.
        # Measured on an H100 (2026-12-07, `scripts/gpu_session.sh varlen-unsloth sweep7`): the loss of a flattened
        # micro-batch equals the padded one's (7.690863 vs 7.690884), one call per layer; the code run's 45 steps
        # train in 17.8 s instead of 27-30 s at a lower peak (41.8 vs 59.1 GiB).
        from app.attention import enable_unsloth_varlen

        self.memory = dataclasses.replace(self.memory, varlen_attention=enable_unsloth_varlen())

    def load_model(self, settings, model_path: Path, hardware, plan):
        from unsloth import FastLanguageModel

        from app.launch import local_rank, world_size

        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(model_path),
            max_seq_length=settings.max_seq_length,
            dtype=hardware.dtype,
            load_in_4bit=settings.load_in_4bit,
            load_in_16bit=not settings.load_in_4bit,
            token=settings.token(),
            use_gradient_checkpointing="unsloth" if plan.checkpointing else False,
            random_state=settings.seed,
            use_exact_model_name=True,  # a local path or the id as given: never swap in a pre-quantized repo
            **({"device_map": {"": local_rank()}} if world_size() > 1 else {}),  # one whole copy per rank
        )
        return model

    def load_key(self, settings, plan) -> tuple:
        """from_pretrained takes the sequence length (RoPE scaling, its own max_seq_length) and the checkpointing."""
        return settings.load_in_4bit, settings.max_seq_length, plan.checkpointing

    def add_lora(self, model, settings, plan):
        from unsloth import FastLanguageModel

        try:
            return FastLanguageModel.get_peft_model(
                model,
                r=settings.r,
                target_modules=settings.target_modules,
                lora_alpha=settings.lora_alpha,
                lora_dropout=settings.lora_dropout,
                bias=settings.lora_bias,
                use_gradient_checkpointing="unsloth" if plan.checkpointing else False,
                random_state=settings.seed,
                use_rslora=settings.use_rslora,
                max_seq_length=settings.max_seq_length,
            )
        except ValueError as err:
            if "not found" in str(err) or "target_modules" in str(err).lower():
                raise SettingsError([f"FT_TARGET_MODULES={','.join(settings.target_modules)}: {err}"]) from None
            raise

    def trainer_args(self, plan) -> dict:
        """unsloth brings its own gradient checkpointing (set when the LoRA is added): not the trainer's."""
        return {"gradient_checkpointing": False}

    def save_merged(self, model, tokenizer, settings, model_path: Path, hardware, out_dir: Path,
                    adapter_dir: Path) -> None:
        """merged_16bit: unsloth dequantizes a 4-bit base from the original weights before merging."""
        model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")

    @contextmanager
    def inference_mode(self, model):
        """unsloth's fast generation path for the duration, its training path after."""
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
        try:
            with super().inference_mode(model):
                yield model
        finally:
            FastLanguageModel.for_training(model)
