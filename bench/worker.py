"""One benchmark configuration in a process of its own: train W + S optimizer steps, report one JSON result.

    python -m bench.worker --path baseline --model DIR --mode bf16 --data FILE --seq 2048 \
        --micro-batch 2 --accum 4 --warmup 2 --steps 4 --out result.json

Paths:
  baseline   plain transformers + PEFT + TRL SFTTrainer, written here as a careful user would: SDPA attention,
             bitsandbytes NF4 (double quantisation) for 4-bit with prepare_model_for_kbit_training, non-reentrant
             gradient checkpointing, adamw_8bit, LoRA r 16 on the seven projections, rsLoRA, BFD packing.
  baseline with --no-kbit-upcast (4-bit only): the same, but without prepare_model_for_kbit_training's cast of
             every non-quantised weight (embeddings, norms, lm_head) to float32, so the residual stream stays in
             bf16 as in the bf16 runs and in unsloth; a diagnostic for loss parity, not the speed baseline.
  job        the job's default path exactly as users run it: `python -m app train` with FT_* settings
             (FT_PER_DEVICE_TRAIN_BATCH_SIZE=auto keeps the effective batch; --job-micro-batch fixes it).

The result (also printed last on stdout as `BENCH_RESULT {json}`) holds, per optimizer step, the time since this
process (baseline) or the job's process (job) started, the tokens trained so far and the loss; the steady-state
tokens/s over steps W+1..W+S; peak memory; load time and the time to the end of the first step.

On a machine without CUDA the baseline trains in float32 with adamw_torch and without gradient checkpointing
(the job adjusts itself the same way); 4-bit needs CUDA.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the heavy imports: first-step time counts them, as the job's does

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_RESULT "
SEED = 3407
LORA_R = 16
LORA_ALPHA = 16
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01  # the job's default (OpenWeights'); the baseline uses the same so losses are comparable
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


# --- shared ------------------------------------------------------------------------------------------------


def steady_state(steps: list[dict[str, Any]], warmup: int, measured: int) -> dict[str, Any]:
    """tokens/s over steps warmup+1 .. warmup+measured from per-step (step, t, tokens) records:
    (tokens[W+S] - tokens[W]) / (t[W+S] - t[W]); the first W steps (compilation, allocator and autotuning
    warm-up) are outside the window."""
    by_step = {s["step"]: s for s in steps}
    first, last = by_step.get(warmup), by_step.get(warmup + measured)
    if first is None or last is None:
        raise RuntimeError(f"steps {warmup} and {warmup + measured} are needed for the steady-state window; "
                           f"recorded: {sorted(by_step)}")
    window = last["t"] - first["t"]
    tokens = last["tokens"] - first["tokens"]
    if tokens <= 0 or window <= 0:
        raise RuntimeError(f"no progress in the timed window: {tokens} tokens in {window:.3f}s (is the trainer's "
                           "_total_train_tokens counted on this path?)")
    ordered = sorted(by_step.values(), key=lambda s: s["step"])
    durations = [round(b["t"] - a["t"], 3) for a, b in zip(ordered, ordered[1:], strict=False)]
    return {"tokens_per_second": tokens / window, "window_s": round(window, 3), "window_tokens": tokens,
            "tokens_per_step": tokens / measured,
            "step_s": durations}  # steps 2..W+S; a recompilation inside the window shows up here


def losses(steps: list[dict[str, Any]]) -> dict[str, Any]:
    logged = [s for s in steps if s.get("loss") is not None]
    return {"loss_first": logged[0]["loss"] if logged else None, "loss_last": logged[-1]["loss"] if logged else None}


def result_channel():
    """A private copy of stdout for the result line; fd 1 itself then points at stderr (the log), so what
    libraries print (Python or C) lands in the log and stdout carries the result alone."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return channel


def emit(result: dict[str, Any], out: Path | None, channel) -> None:
    text = json.dumps(result, default=str)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    channel.write(RESULT_PREFIX + text + "\n")
    channel.flush()


def log(message: str) -> None:
    print(f"[bench.worker {time.perf_counter() - PROCESS_START:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- baseline: transformers + PEFT + TRL, as a careful user writes it ---------------------------------------


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from app.data import load_conversations
    from app.formatting import Formatter, encode_all, to_dataset
    from app.tokenizer import inference_stop_ids, tokenizer_of

    cuda = torch.cuda.is_available()
    if args.mode == "4bit" and not cuda:
        raise RuntimeError("4-bit (bitsandbytes NF4) needs a CUDA GPU")
    set_seed(args.seed)
    tokenizer = tokenizer_of(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The same conversations, chat template and assistant-only labels as the job (reused, not copied).
    formatter = Formatter(tokenizer, args.seq, stop_ids=inference_stop_ids(args.model, tokenizer))
    dataset = to_dataset(encode_all(formatter, load_conversations(args.data)))

    started = time.perf_counter()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation="sdpa")
    if cuda:
        kwargs["device_map"] = {"": 0}
    if args.mode == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if args.mode == "4bit" and args.kbit_upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif args.mode == "4bit":  # prepare_model_for_kbit_training less its float32 cast (SFTTrainer enables checkpointing)
        for param in model.parameters():
            param.requires_grad_(False)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=PROJECTIONS,
                      use_rslora=True, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    log(f"model + LoRA loaded in {load_s:.1f}s ({args.mode}, {'cuda' if cuda else 'cpu'})")

    class StepRecorder(TrainerCallback):
        """Time (after a device sync), tokens and loss at the end of every optimizer step."""

        def __init__(self) -> None:
            self.trainer = None
            self.steps: list[dict[str, Any]] = []

        def on_step_end(self, args_, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.steps.append({"step": state.global_step, "t": time.perf_counter() - PROCESS_START,
                               "tokens": int(self.trainer._total_train_tokens), "loss": None})

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "loss" in logs and self.steps and self.steps[-1]["step"] == state.global_step:
                self.steps[-1]["loss"] = float(logs["loss"])

    output_dir = tempfile.mkdtemp(prefix="bench-baseline-")
    config = SFTConfig(
        output_dir=output_dir,
        packing=True, packing_strategy="bfd", max_length=args.seq,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.accum,
        max_steps=args.warmup + args.steps,
        learning_rate=LEARNING_RATE, warmup_steps=0, lr_scheduler_type="constant", weight_decay=WEIGHT_DECAY,
        optim="adamw_8bit" if cuda else "adamw_torch",
        bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=cuda, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, dataloader_num_workers=0,
        disable_tqdm=True,  # stderr is a log file
    )
    recorder = StepRecorder()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[recorder])
    recorder.trainer = trainer
    # No reset of the peak statistics: like the job's figure, the peak covers the whole process, loading included.
    try:
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    steps = recorder.steps
    result: dict[str, Any] = {
        "backend": "transformers+peft+trl", "device": "cuda" if cuda else "cpu",
        "kbit_upcast": bool(args.mode == "4bit" and args.kbit_upcast),
        "dtype": "bfloat16" if cuda else "float32", "optimizer": config.optim,
        "gradient_checkpointing": bool(cuda), "micro_batch": args.micro_batch, "accumulation": args.accum,
        "load_s": round(load_s, 2), "first_step_s": round(steps[0]["t"], 2) if steps else None, "steps": steps,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None,
    }
    return result


# --- job: `python -m app train`, as users run it -------------------------------------------------------------


def job_settings(args: argparse.Namespace, output_dir: Path) -> tuple[dict[str, str], str]:
    """FT_* for the job and a note on the batch layout. The job's 'auto' micro-batch keeps an effective batch
    of 2 x FT_GRADIENT_ACCUMULATION_STEPS (OpenWeights' rule), so B x G / 2 gives the baseline's B x G."""
    effective = args.micro_batch * args.accum
    if args.job_micro_batch:
        if effective % args.job_micro_batch:
            raise ValueError(f"--job-micro-batch {args.job_micro_batch} does not divide the effective batch {effective}")
        micro, accum, note = str(args.job_micro_batch), effective // args.job_micro_batch, "fixed micro-batch"
    elif effective % 2 == 0:
        micro, accum, note = "auto", effective // 2, "auto micro-batch"
    else:  # auto cannot express an odd effective batch
        micro, accum, note = str(args.micro_batch), args.accum, "fixed micro-batch (odd effective batch)"
    env = {
        "FT_MODEL": str(args.model), "FT_TRAINING_FILE": str(args.data), "FT_OUTPUT_DIR": str(output_dir),
        "FT_PACKING": "true", "FT_MAX_SEQ_LENGTH": str(args.seq),
        "FT_PER_DEVICE_TRAIN_BATCH_SIZE": micro, "FT_GRADIENT_ACCUMULATION_STEPS": str(accum),
        "FT_MAX_STEPS": str(args.warmup + args.steps), "FT_LOAD_IN_4BIT": str(args.mode == "4bit").lower(),
        "FT_R": str(LORA_R), "FT_LORA_ALPHA": str(LORA_ALPHA), "FT_USE_RSLORA": "true",
        "FT_LEARNING_RATE": str(LEARNING_RATE), "FT_WARMUP_STEPS": "0", "FT_LR_SCHEDULER_TYPE": "constant",
        "FT_OPTIM": "adamw_8bit", "FT_LOGGING_STEPS": "1", "FT_SAVE_STEPS": "100000", "FT_SEED": str(args.seed),
        "FT_JOB_ID_SUFFIX": "bench",
    }
    if args.job_backend != "auto":
        env["FT_BACKEND"] = args.job_backend
    if args.job_checkpointing != "auto":
        env["FT_GRADIENT_CHECKPOINTING"] = args.job_checkpointing
    return env, note


def run_job(args: argparse.Namespace) -> dict[str, Any]:
    output_dir = Path(tempfile.mkdtemp(prefix="bench-job-"))
    try:
        settings, note = job_settings(args, output_dir)
        # Nothing of the caller's FT_* may leak in (the job refuses unknown FT_* and would obey known ones).
        env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")} | settings
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        log("python -m app train  " + " ".join(f"{k}={v}" for k, v in settings.items() if k != "FT_OUTPUT_DIR"))
        started = time.perf_counter()
        # The job's stdout and stderr both go to the log (this worker's stderr); the result has its own channel.
        code = subprocess.call([sys.executable, "-m", "app", "train"], cwd=REPO, env=env, stdout=2, stderr=2)
        wall_s = time.perf_counter() - started
        result_file = output_dir / "result.json"
        job_result = json.loads(result_file.read_text()) if result_file.exists() else {}
        if code != 0 or job_result.get("status") != "completed":
            error = job_result.get("error") or {}
            raise RuntimeError(f"the job exited {code} ({job_result.get('status', 'no result.json')}): "
                               f"{error.get('type', '')} {error.get('message', '')}".strip())
        job_dir = output_dir / job_result["id"]
        records = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [{"step": r["step"], "t": r["elapsed_s"], "tokens": r["train_tokens"], "loss": r.get("loss")}
                 for r in records if "loss" in r and "train_tokens" in r]
        if args.keep_dir:  # the job's own files, for a look later
            args.keep_dir.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "result.json"):
                if (job_dir / name).exists():
                    shutil.copy(job_dir / name, args.keep_dir / name)
        outputs = job_result.get("outputs", {})
        micro, accum = job_batch(job_result, settings)
        return {
            "backend": job_result.get("backend"), "device": "cuda" if job_result.get("gpu") else "cpu",
            "optimizer": next((a["used"] for a in job_result.get("adjustments", []) if a["setting"] == "optim"),
                              settings["FT_OPTIM"]),
            "micro_batch": micro, "accumulation": accum, "batch_note": note,
            "gradient_checkpointing": outputs.get("gradient_checkpointing"),  # None: not in this job's result.json
            "load_s": outputs.get("load_time_s"), "first_step_s": outputs.get("time_to_first_step_s"),
            "startup_s": outputs.get("startup_s"),
            "steps": steps, "peak_memory_gib": outputs.get("peak_gpu_memory_gb"),
            "estimated_peak_gib": outputs.get("estimated_peak_gpu_memory_gb"), "job_wall_s": round(wall_s, 2),
            "job_tokens_per_second": outputs.get("tokens_per_second"), "job_id": job_result.get("id"),
            "adjustments": job_result.get("adjustments", []), "gpu": job_result.get("gpu"),
            "versions": job_result.get("versions"), "ft_env": {k: v for k, v in settings.items() if k != "FT_OUTPUT_DIR"},
        }
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)  # checkpoint and adapter: not part of the benchmark


def job_batch(job_result: dict[str, Any], settings: dict[str, str]) -> tuple[int, int]:
    """(micro-batch, accumulation) the job trained with: outputs.micro_batch and gradient_accumulation_steps
    where result.json has them; else the micro-batch 'auto' picked (adjustments) and the job's rule for the
    accumulation, max(effective // micro, 1)."""
    outputs = job_result.get("outputs", {})
    if outputs.get("micro_batch") and outputs.get("gradient_accumulation_steps"):
        return int(outputs["micro_batch"]), int(outputs["gradient_accumulation_steps"])
    accum = int(settings["FT_GRADIENT_ACCUMULATION_STEPS"])
    requested = settings["FT_PER_DEVICE_TRAIN_BATCH_SIZE"]
    picked = next((a["used"] for a in job_result.get("adjustments", [])
                   if a["setting"] == "per_device_train_batch_size"), None)
    if requested == "auto" and picked is not None:
        micro = int(picked)
        return micro, max(2 * accum // micro, 1)
    return int(requested if requested != "auto" else 2), accum


# --- entry point -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, choices=["job", "baseline"])
    parser.add_argument("--model", required=True, type=Path, help="model folder (app.devmodel)")
    parser.add_argument("--mode", required=True, choices=["bf16", "4bit"])
    parser.add_argument("--data", required=True, type=Path, help="JSONL of conversations (bench.data)")
    parser.add_argument("--seq", type=int, default=2048, help="packed row length, tokens")
    parser.add_argument("--micro-batch", type=int, default=2, help="the baseline's rows per micro-batch (B)")
    parser.add_argument("--accum", type=int, default=4, help="the baseline's gradient accumulation (G)")
    parser.add_argument("--job-micro-batch", type=int, default=None,
                        help="job: fixed micro-batch instead of auto (effective batch stays B x G)")
    parser.add_argument("--job-backend", default="auto", choices=["auto", "unsloth", "hf"], help="job: FT_BACKEND")
    parser.add_argument("--job-checkpointing", default="auto", choices=["auto", "true", "false"],
                        help="job: FT_GRADIENT_CHECKPOINTING")
    parser.add_argument("--kbit-upcast", action=argparse.BooleanOptionalAction, default=True,
                        help="baseline, 4-bit: prepare_model_for_kbit_training's float32 cast of non-quantised weights")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of both paths (LoRA init, data order)")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before the timed window (>= 1)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps in the timed window")
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here too")
    parser.add_argument("--keep-dir", type=Path, default=None, help="job: copy metrics.jsonl and result.json here")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the window starts at the end of step W)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    channel = result_channel()
    result: dict[str, Any] = {"path": args.path, "mode": args.mode, "model": str(args.model), "seq": args.seq,
                              "warmup": args.warmup, "measured_steps": args.steps}
    try:
        measured = run_baseline(args) if args.path == "baseline" else run_job(args)
        result.update(measured)
        result.update(steady_state(result["steps"], args.warmup, args.steps))
        result.update(losses(result["steps"]))
        result["effective_batch"] = result["micro_batch"] * result["accumulation"]
        result["status"] = "ok"
    except Exception as err:  # one failed configuration is a row of the table, not the end of it
        traceback.print_exc(file=sys.stderr)
        oom = "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError"
        result.update(status="failed", error=f"{'OOM: ' if oom else ''}{type(err).__name__}: {err}"[-2000:])
    result["worker_wall_s"] = round(time.perf_counter() - PROCESS_START, 2)
    emit(result, args.out, channel)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
