"""The transformers + PEFT backend: every machine, CPU included; bitsandbytes NF4 for 4-bit on CUDA."""

from __future__ import annotations

import logging
from pathlib import Path

from app.errors import SettingsError

log = logging.getLogger(__name__)


class HfBackend:
    name = "hf"

    def load_model(self, settings, model_path: Path, hardware):
        from transformers import AutoModelForCausalLM

        kwargs = dict(dtype=hardware.dtype, attn_implementation="sdpa")
        if settings.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=hardware.dtype,
            )
        if hardware.cuda:
            from app.launch import local_rank

            kwargs["device_map"] = {"": local_rank()}  # each data-parallel rank holds a whole copy on its GPU
        model = AutoModelForCausalLM.from_pretrained(model_path, token=_token(settings), **kwargs)
        model.config.use_cache = False
        return model

    def add_lora(self, model, settings, hardware):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if settings.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=hardware.gradient_checkpointing,
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

    def save_merged(self, model, tokenizer, settings, model_path: Path, hardware, out_dir: Path,
                    adapter_dir: Path) -> None:
        """Merge LoRA into 16-bit base weights. A 4-bit base is reloaded in 16 bits (on the CPU, beside the
        GPU copy the trainer still holds) with the saved adapter: merging into NF4 weights would round the
        update away."""
        if settings.load_in_4bit:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=hardware.save_dtype, token=_token(settings))
            model = PeftModel.from_pretrained(base, adapter_dir)
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


def _token(settings):
    return settings.hf_token.get_secret_value() if settings.hf_token else None


BACKEND = HfBackend()
