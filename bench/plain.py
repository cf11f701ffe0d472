"""The published code run with plain transformers + PEFT + TRL, as a careful user writes it: bench/e2e.py's
`plain` path. The same settings (an env preset's FT_* values), the same rows as the job (the job's Formatter:
the same conversations, chat template and assistant-only labels), the libraries' own defaults elsewhere (TRL's
SFTConfig: gradient checkpointing, padded batches).

    python -m bench.plain --model DIR --data FILE --preset env/code.env --out DIR

Prints `BENCH_RESULT {json}` last: time to the first optimizer step (from this process's start), train runtime,
final train loss, tokens/s, peak GPU memory.
"""

from __future__ import annotations

import time

START = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--preset", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from app.data import load_conversations
    from app.formatting import Formatter, encode_all, to_dataset
    from app.tokenizer import inference_stop_ids, tokenizer_of
    from bench.e2e import read_env_file

    preset = read_env_file(args.preset)

    def setting(name: str, default: str) -> str:
        return preset.get(f"FT_{name.upper()}", default)

    cuda = torch.cuda.is_available()
    seed = int(setting("seed", "3407"))
    set_seed(seed)
    tokenizer = tokenizer_of(args.model)
    max_len = int(setting("max_seq_length", "2048"))
    formatter = Formatter(tokenizer, max_len, stop_ids=inference_stop_ids(args.model, tokenizer))
    dataset = to_dataset(encode_all(formatter, load_conversations(args.data)))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa", **({"device_map": {"": 0}} if cuda else {}))
    model = get_peft_model(model, LoraConfig(
        r=int(setting("r", "16")), lora_alpha=int(setting("lora_alpha", "16")), lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_rslora=setting("use_rslora", "true") == "true", task_type="CAUSAL_LM"))

    first_step: list[float] = []

    class FirstStep(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if not first_step:
                first_step.append(time.monotonic() - START)

    config = SFTConfig(
        output_dir=str(args.out / "checkpoints"), per_device_train_batch_size=int(setting("per_device_train_batch_size", "2")),
        gradient_accumulation_steps=int(setting("gradient_accumulation_steps", "8")),
        num_train_epochs=int(setting("epochs", "1")), learning_rate=float(setting("learning_rate", "1e-4")),
        lr_scheduler_type=setting("lr_scheduler_type", "linear"), warmup_steps=int(setting("warmup_steps", "5")),
        weight_decay=0.01, optim="adamw_8bit" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
        logging_steps=int(setting("logging_steps", "1")), save_strategy="no", report_to=[], seed=seed,
        max_length=max_len, dataset_num_proc=None, max_steps=args.max_steps or -1,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[FirstStep()])
    output = trainer.train()
    model.save_pretrained(args.out / "adapter")
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    runtime = output.metrics.get("train_runtime")
    print("BENCH_RESULT " + json.dumps({
        "status": "ok", "first_step_s": round(first_step[0], 2) if first_step else None, "train_s": runtime,
        "loss": output.training_loss, "global_step": output.global_step, "train_tokens": tokens,
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "checkpointing": config.gradient_checkpointing, "micro_batch": config.per_device_train_batch_size,
    }), flush=True)


if __name__ == "__main__":
    main()
