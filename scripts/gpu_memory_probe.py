"""Measure the job's peak GPU memory at several micro-batch sizes in one process, beside the preflight
estimate, to calibrate app/gpu.py's Profile coefficients (docs/BENCHMARKS.md, "Memory estimate").

    python scripts/gpu_memory_probe.py --model DIR --mode bf16|4bit --checkpointing on|off --batches 1,2,4

The model is loaded once; each micro-batch size trains 2 packed steps of seq tokens per row with a fresh
trainer. Prints one JSON line per size: estimate parts and torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HF = "--backend" in sys.argv and sys.argv[sys.argv.index("--backend") + 1:][:1] == ["hf"]
if not HF:  # unsloth first, as in the job; never for the hf backend, which the job runs without it
    try:
        import unsloth  # noqa: F401
    except ImportError:
        pass
import torch  # noqa: E402

from app.backends import select_backend  # noqa: E402
from app.gpu import Plan, detect_hardware, estimate_peak, read_shape  # noqa: E402
from app.pipeline import Run, build_trainer, open_job, prepare_data  # noqa: E402
from app.settings import load_settings  # noqa: E402
from app.signals import StopRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="data/sample/train.jsonl")
    parser.add_argument("--mode", choices=["bf16", "4bit"], default="bf16")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="off")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", default="/tmp/probe")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    run = Run()
    run.settings, _ = load_settings(model=args.model, training_file=args.data, output_dir=args.out, packing=True,
                                    max_seq_length=args.seq, load_in_4bit=args.mode == "4bit", max_steps=2,
                                    save_steps=1000, backend=args.backend, optim="adamw_8bit", warmup_steps=0)
    run.hardware = detect_hardware()
    backend = select_backend(args.backend, True)
    run.backend = backend.name
    run.hardware.gradient_checkpointing = args.checkpointing == "on"
    prepared = prepare_data(run)
    open_job(run, prepared.file_hashes)
    shape = read_shape(prepared.model_path)
    torch.cuda.reset_peak_memory_stats()
    model = backend.load_model(run.settings, prepared.model_path, run.hardware)
    loaded, load_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    model = backend.add_lora(model, run.settings, run.hardware)
    with_lora = torch.cuda.memory_allocated()
    base_plan = Plan(micro_batch=1, seq_len=args.seq, load_in_4bit=args.mode == "4bit", r=16,
                     target_modules=tuple(run.settings.target_modules), optimizer_8bit=True,
                     gradient_checkpointing=run.hardware.gradient_checkpointing, backend=run.backend, packed=True)
    for batch in batches:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        trainer = build_trainer(run, model, prepared, batch, 1, "adamw_8bit", StopRequest())
        trainer.args.max_steps = 2
        trainer.train()
        peak = torch.cuda.max_memory_allocated()
        estimate = estimate_peak(shape, replace(base_plan, micro_batch=batch))
        record = {
            "model": Path(args.model).name, "backend": run.backend, "mode": args.mode,
            "checkpointing": args.checkpointing, "micro_batch": batch, "seq": args.seq,
            "after_load_gb": round(loaded / 2**30, 3), "load_peak_gb": round(load_peak / 2**30, 3),
            "after_lora_gb": round(with_lora / 2**30, 3), "measured_peak_gb": round(peak / 2**30, 3),
            "estimate_gb": round(estimate.total_gb, 3), "estimate": {k: round(v, 3) for k, v in asdict(estimate).items()},
        }
        print("PROBE " + json.dumps(record), flush=True)
        del trainer
        # Optimizer states of the finished trainer must not count toward the next size's peak.
        for param in model.parameters():
            param.grad = None
    run.close()


if __name__ == "__main__":
    main()
