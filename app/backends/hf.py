"""The transformers + PEFT backend: every machine, CPU included; bitsandbytes NF4 for 4-bit on CUDA."""

from __future__ import annotations

import logging
from pathlib import Path

from app.backends.base import PeftBackend
from app.errors import SettingsError
from app.memory import Profile

log = logging.getLogger(__name__)


class HfBackend(PeftBackend):
    name = "hf"
    # SDPA, TRL's chunked cross-entropy. Fitted to 18 peaks measured on an H100 (2026-11-25, packed rows of 2048,
    # Qwen2-0.5B at micro-batch 1/2/4 and Qwen2-7B at 1/2, bf16 and 4-bit, checkpointing on and off; all within
    # -3%/+13%, the 7B ones within 3%; docs/BENCHMARKS.md, "Memory estimate"): 66 KB per token per layer in bf16
    # (0.5B), x1.46 on a 4-bit base (PEFT's k-bit preparation makes the residual stream fp32), 0.57 GiB of
    # cross-entropy workspace, and a term quadratic in the tokens of a micro-batch: padding-free packing hands
    # SDPA a block-diagonal mask over the flattened micro-batch, which every layer keeps for backward.
    memory = Profile(layer_bytes=(24.0, 6.0, 9.0), scale_4bit=1.46, checkpoint_keeps_inputs=True,
                     recompute_fraction=1.0, logits_bytes=12.0, logits_tokens_cap=336, fp32_embeddings_4bit=True,
                     mask_bytes=1.5)

    def unavailable(self, hardware) -> str | None:
        return None  # transformers + PEFT run everywhere

    def activate(self) -> None:
        """Nothing to patch: transformers, TRL and PEFT are imported where they are used."""

    def load_model(self, settings, model_path: Path, hardware, plan):
        from transformers import AutoModelForCausalLM

        kwargs = dict(dtype=hardware.dtype, attn_implementation=self.attention(model_path, settings))
        if settings.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=hardware.dtype,
            )
        if hardware.cuda:
            from app.launch import local_rank

            kwargs["device_map"] = {"": local_rank()}  # each data-parallel rank holds a whole copy on its GPU
        model = AutoModelForCausalLM.from_pretrained(model_path, token=settings.token(), **kwargs)
        model.config.use_cache = False
        return model

    @staticmethod
    def attention(model_path: Path, settings) -> str:
        """app.attention's varlen kernel for flattened rows where FT_PADDING_FREE=true asks for it and the GPU and
        the model allow it, else transformers' SDPA. Not yet the `auto` choice: its GPU tests pass (H100,
        2026-12-08: the kernel equals per-row SDPA forward and backward, the padding-free loss equals the padded
        one), but its speed and peak memory have not been measured (`E2E_PATHS=job-hf-pf scripts/gpu_session.sh
        e2e3`); `auto` (this Profile's varlen_attention, no mask term) follows once they are. Meanwhile the
        estimate keeps the mask term for these rows: an overestimate, never a false fit."""
        from app import attention

        if settings.padding_free is not True or not attention.kernel_available():
            return "sdpa"
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, token=settings.token())
        return attention.register() if attention.supports(config) else "sdpa"

    def load_key(self, settings, plan) -> tuple:
        return (settings.load_in_4bit,)

    def add_lora(self, model, settings, plan):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if settings.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        config = LoraConfig(
            r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
            target_modules=settings.target_modules, bias=settings.lora_bias, use_rslora=settings.use_rslora,
            task_type="CAUSAL_LM",
        )
        try:
            return get_peft_model(model, config)
        except ValueError as err:
            if "not found in the base model" in str(err) or "Target modules" in str(err):
                raise SettingsError([f"FT_TARGET_MODULES={','.join(settings.target_modules)}: {err}"]) from None
            raise

    def trainer_args(self, plan) -> dict:
        """The trainer checkpoints (non-reentrant) the layers of a plain transformers model."""
        return {"gradient_checkpointing": plan.checkpointing, "gradient_checkpointing_kwargs": {"use_reentrant": False}}

    def save_merged(self, model, tokenizer, settings, model_path: Path, hardware, out_dir: Path,
                    adapter_dir: Path) -> None:
        """Merge LoRA into 16-bit base weights. A 4-bit base is reloaded in 16 bits (on the CPU, beside the
        GPU copy the trainer still holds) with the saved adapter: merging into NF4 weights would round the
        update away."""
        if settings.load_in_4bit:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=hardware.save_dtype, token=settings.token())
            model = PeftModel.from_pretrained(base, adapter_dir)
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
