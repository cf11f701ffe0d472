"""Measure the job's peak GPU memory at several micro-batch sizes in one process, beside the preflight
estimate, to calibrate the backends' memory profiles (app/backends/*, docs/BENCHMARKS.md, "Memory estimate").

    python scripts/gpu_memory_probe.py --model DIR --mode bf16|4bit --checkpointing on|off --batches 1,2,4 \
        [--packing on|off] [--data FILE] [--backend auto|hf|unsloth]

The job's own `setup` loads the model once (app/pipeline.py); each micro-batch size trains 2 steps with a fresh
trainer (`build_trainer`) on the session's rows, its plan changed only in the micro-batch. Prints one JSON line
per size: the estimate's parts for that batch and torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="data/sample/train.jsonl")
    parser.add_argument("--mode", choices=["bf16", "4bit"], default="bf16")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="off")
    parser.add_argument("--packing", choices=["on", "off"], default="on")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", default="/tmp/probe")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from app.memory import Batch, Workload, estimate_peak
    from app.pipeline import setup
    from app.settings import load_settings
    from app.signals import StopRequest
    from app.trainer import build_trainer

    settings, _ = load_settings(
        model=args.model, training_file=args.data, output_dir=args.out, packing=args.packing == "on",
        max_seq_length=args.seq, load_in_4bit=args.mode == "4bit", max_steps=2, save_steps=1000,
        backend=args.backend, optim="adamw_8bit", warmup_steps=0, per_device_train_batch_size=batches[0],
        gradient_accumulation_steps=1, gradient_checkpointing=args.checkpointing == "on", overwrite=True)
    import torch

    torch.cuda.reset_peak_memory_stats()
    session = setup(settings)
    prepared = session.prepared
    loaded, load_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    for size in batches:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        plan = replace(prepared.plan, micro_batch=size, accumulation=1)
        probe = replace(session, prepared=replace(prepared, plan=plan))
        trainer = build_trainer(probe, StopRequest()).trainer
        trainer.train()
        peak = torch.cuda.max_memory_allocated()
        batch = Batch.worst(prepared.data.lengths, size, flat=plan.padding_free)
        work = Workload(batch=batch, load_in_4bit=settings.load_in_4bit, r=settings.r,
                        target_modules=tuple(settings.target_modules), optimizer_8bit="8bit" in plan.optimizer,
                        checkpointing=plan.checkpointing)
        estimate = estimate_peak(prepared.shape, prepared.backend.memory, work)
        record = {
            "model": Path(args.model).name, "backend": prepared.backend.name, "mode": args.mode,
            "checkpointing": plan.checkpointing, "micro_batch": size, "seq": args.seq, "packed": settings.packing,
            "batch": asdict(batch), "after_load_gb": round(loaded / 2**30, 3), "load_peak_gb": round(load_peak / 2**30, 3),
            "measured_peak_gb": round(peak / 2**30, 3), "estimate_gb": round(estimate.total_gb, 3),
            "estimate": {k: round(v, 3) for k, v in asdict(estimate).items()},
        }
        print("PROBE " + json.dumps(record), flush=True)
        del trainer
        # Optimizer states of the finished trainer must not count toward the next size's peak.
        for param in session.model.parameters():
            param.grad = None
    session.close()


if __name__ == "__main__":
    main()
