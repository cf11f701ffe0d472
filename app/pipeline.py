"""The job, step by step. `train` reads like the table of contents of DESIGN.md:

    hardware, backend   NVML only; unsloth imported first when chosen          app/gpu.py, app/backends/
    prepared = prepare_data(run)          steps 1 + 4: conversations -> tokens + masks (no weights yet)
    job = open_job(run, ...)              the job id; a completed job is returned, not retrained
    plan = plan_memory(run, ...)          preflight: refuse (exit 3) before loading weights
    model = backend.load_model(...)       step 2
    model = backend.add_lora(...)         step 3
    trainer = build_trainer(...)          step 5
    metrics = run_training(...)           step 6: resumes from the newest complete checkpoint
    artifact = save_model(...)            step 7: adapter/ (and merged/), whole or absent
    return finish(...)                    step 8: result.json
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.data import file_sha256, load_conversations
from app.errors import DataError, GpuError, Interrupted, JobError, SettingsError, TrainingError
from app.formatting import (
    Formatter,
    apply_inoculation,
    encode_all,
    log_stats,
    pack_like_trainer,
    to_dataset,
)
from app.gpu import Hardware, Plan, auto_micro_batch, choose_checkpointing, detect_hardware, preflight, read_shape
from app.jobdir import JobDir, job_id, publish_dir
from app.launch import is_main, world_size
from app.result import build_result, now, write_result
from app.settings import Settings

log = logging.getLogger(__name__)

OW_DEFAULT_MICRO_BATCH = 2  # OpenWeights' per_device_train_batch_size: 'auto' keeps 2 x accumulation


@dataclass
class Run:
    """What is known about this run so far: enough to write result.json at any ending."""

    created_at: str = field(default_factory=now)
    settings: Settings | None = None
    ignored: list[str] = field(default_factory=list)
    job: JobDir | None = None
    job_id: str | None = None
    hardware: Hardware | None = None
    backend: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    adjustments: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    finetuned_model_id: str | None = None

    def adjust(self, setting: str, requested: Any, used: Any, why: str) -> None:
        log.warning("%s: using %s instead of %s (%s)", setting, used, requested, why)
        self.adjustments.append({"setting": setting, "requested": requested, "used": used, "why": why})

    def result(self, status: str, error: JobError | dict | None = None) -> dict[str, Any]:
        params = self.settings.public_params() if self.settings else None
        if params is not None:
            params["finetuned_model_id"] = self.finetuned_model_id or params.get("finetuned_model_id")
        if isinstance(error, JobError):
            error = error.as_dict()
        return build_result(
            job_id=self.job_id, status=status, params=params, created_at=self.created_at, outputs=self.outputs,
            gpu=self.hardware.as_dict() if self.hardware else None, ignored=self.ignored, error=error,
            data=self.data, extra={"backend": self.backend, "adjustments": self.adjustments},
        )

    def close(self) -> None:
        """Release the job's lock (the process exiting releases it too)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()
            self._lock = None

    def write(self, result: dict[str, Any]) -> Path | None:
        if not is_main():  # data-parallel ranks: rank 0 alone writes the result
            return None
        output_dir = self.settings.output_dir if self.settings else Path(os.environ.get("FT_OUTPUT_DIR", "/output"))
        return write_result(result, output_dir, self.job.root if self.job else None)


@dataclass
class Prepared:
    model_path: Path
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    file_hashes: dict[str, str]


# --- steps 1 and 4: data, before any weight -----------------------------------------------------------------


def load_tokenizer(settings: Settings, model_path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, token=_token(settings))
    except (OSError, ValueError) as err:
        raise SettingsError([f"FT_MODEL={settings.model}: the tokenizer cannot be loaded from {model_path} ({err})."]) from None
    if settings.chat_template != "default":
        tokenizer.chat_template = settings.chat_template
    if not tokenizer.chat_template:
        raise SettingsError([f"FT_CHAT_TEMPLATE: the tokenizer of FT_MODEL={settings.model} has no chat template. "
                             "Set FT_CHAT_TEMPLATE to a Jinja template (or a .jinja file) for this model."])
    if settings.train_on_responses_only and not tokenizer.is_fast:
        raise SettingsError([f"FT_MODEL={settings.model}: its tokenizer is a slow (Python) tokenizer without "
                             "character offsets, which the assistant-only loss needs. Provide tokenizer.json, or "
                             "set FT_TRAIN_ON_RESPONSES_ONLY=false."])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_data(run: Run) -> Prepared:
    from app.model_source import check_target_modules, resolve_model

    settings = run.settings
    conversations = load_conversations(settings.training_file, "FT_TRAINING_FILE")
    test = load_conversations(settings.test_file, "FT_TEST_FILE") if settings.test_file else []
    hashes = {"training_file": file_sha256(settings.training_file)}
    if settings.test_file:
        hashes["test_file"] = file_sha256(settings.test_file)
    for name, path in settings.logp_callback_datasets.items():
        load_conversations(path, f"FT_LOGP_CALLBACK_DATASETS[{name}]")
        hashes[f"logp:{name}"] = file_sha256(path)

    model_path = resolve_model(settings.model, _token(settings))
    check_target_modules(settings.model, model_path, settings.target_modules)
    tokenizer = load_tokenizer(settings, model_path)
    for conversation in conversations:  # the inoculation instruction: training data only, never test_file
        conversation.messages = apply_inoculation(
            conversation.messages, settings.inoculation_prompt, settings.inoculation_position
        )
    formatter = Formatter(tokenizer, settings.max_seq_length, settings.train_on_responses_only)
    train_dataset = to_dataset(encode_all(formatter, conversations))
    log_stats("training data", formatter.stats, settings.max_seq_length)
    run.data["train"] = formatter.stats.as_dict()
    eval_dataset = None
    if test:
        eval_formatter = Formatter(tokenizer, settings.max_seq_length, train_on_responses_only=True)
        eval_dataset = to_dataset(encode_all(eval_formatter, test))
        log_stats("test data", eval_formatter.stats, settings.max_seq_length)
        run.data["test"] = eval_formatter.stats.as_dict()
    return Prepared(model_path, tokenizer, train_dataset, eval_dataset, hashes)


# --- the job directory ------------------------------------------------------------------------------------------


def open_job(run: Run, file_hashes: dict[str, str]) -> JobDir:
    """Create (or reopen) FT_OUTPUT_DIR/<job_id>/ and hold its lock for the life of this process."""
    settings = run.settings
    output_dir = settings.output_dir
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        why = "it is a file, not a folder" if output_dir.is_file() else err.strerror
        raise SettingsError([f"FT_OUTPUT_DIR={output_dir}: not writable ({why}). Mount a writable volume "
                             "there (e.g. -v ./output:/output) or point FT_OUTPUT_DIR elsewhere."]) from None
    run.job_id = job_id(settings.public_params(), file_hashes, settings.job_id_suffix)
    job = JobDir(output_dir / run.job_id)
    job.root.mkdir(parents=True, exist_ok=True)
    run.job = job
    if not is_main():  # rank 0 holds the lock for the whole data-parallel job
        return job
    lock = open(job.root / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SettingsError([f"job {run.job_id} is already running in another process on {job.root} (same settings "
                             "and data). Wait for it, or change FT_JOB_ID_SUFFIX to train a separate copy."]) from None
    run._lock = lock  # released when the process exits
    run.job = job
    return job


def completed_result(run: Run) -> dict[str, Any] | None:
    """The earlier result of this very job, when it completed and its model is still there."""
    job, settings = run.job, run.settings
    previous = job.previous_result()
    if settings.overwrite:
        if previous is not None or job.complete_checkpoints():
            log.warning("FT_OVERWRITE=true: discarding the earlier run of %s", run.job_id)
        if is_main():
            job.reset()
        return None
    if not previous or previous.get("status") != "completed":
        return None
    model_path = previous.get("outputs", {}).get("model_path")
    if not model_path or not Path(model_path).exists():
        log.warning("job %s completed before but its model is gone: training again", run.job_id)
        return None
    log.info("job %s already completed (%s): returning its result without training. FT_OVERWRITE=true retrains.",
             run.job_id, previous.get("finished_at"))
    run.write(previous)  # the volume's result.json names the latest run
    return previous


# --- the preflight ---------------------------------------------------------------------------------------------


def effective_optimizer(run: Run) -> str:
    settings, hardware = run.settings, run.hardware
    optimizer = settings.optimizer
    if "8bit" in optimizer:
        import importlib.util

        if not hardware.cuda or importlib.util.find_spec("bitsandbytes") is None:
            run.adjust("optim", settings.optim, "adamw_torch",
                       "8-bit AdamW needs bitsandbytes on a CUDA GPU" + ("" if hardware.cuda else "; this run is on the CPU"))
            return "adamw_torch"
    return optimizer


def plan_memory(run: Run, model_path: Path, optimizer: str) -> tuple[int, int]:
    """Micro-batch and accumulation; refuses (exit 3) when the estimate does not fit the GPU."""
    settings, hardware = run.settings, run.hardware
    accumulation = settings.gradient_accumulation_steps
    micro_batch = settings.per_device_train_batch_size
    if settings.load_in_4bit and not hardware.cuda:
        raise GpuError("FT_LOAD_IN_4BIT=true needs a CUDA GPU (bitsandbytes NF4) and none is visible. Run on a GPU "
                       "host, or set FT_LOAD_IN_4BIT=false to train in 16/32 bits.")
    shape = read_shape(model_path)
    plan = Plan(micro_batch=OW_DEFAULT_MICRO_BATCH if micro_batch == "auto" else micro_batch,
                seq_len=settings.max_seq_length, load_in_4bit=settings.load_in_4bit, r=settings.r,
                target_modules=tuple(settings.target_modules), optimizer_8bit="8bit" in optimizer,
                gradient_checkpointing=hardware.gradient_checkpointing, backend=run.backend,
                packed=settings.packing)
    measurable = hardware.cuda and shape is not None
    forced = settings.gradient_checkpointing  # "auto", True or False
    checkpointing = hardware.gradient_checkpointing if forced == "auto" else forced
    world = world_size()
    if micro_batch == "auto":
        # OpenWeights' effective batch (2 x accumulation) kept across all ranks: each rank takes 1/world of it.
        effective = max(OW_DEFAULT_MICRO_BATCH * accumulation // world, 1)
        if world > 1 and (OW_DEFAULT_MICRO_BATCH * accumulation) % world:
            run.adjust("gradient_accumulation_steps", accumulation, effective * world // OW_DEFAULT_MICRO_BATCH,
                       f"the effective batch {OW_DEFAULT_MICRO_BATCH * accumulation} does not divide over {world} GPUs")
        if measurable:
            choices = (False, True) if forced == "auto" else (forced,)
            micro_batch, checkpointing = auto_micro_batch(shape, plan, hardware.gpu.memory_free_gb, effective, choices)
        else:
            micro_batch = OW_DEFAULT_MICRO_BATCH
        accumulation = max(effective // micro_batch, 1)
        run.adjust("per_device_train_batch_size", "auto", micro_batch,
                   f"largest divisor of the effective batch {effective} that fits; accumulation {accumulation}")
    elif measurable and forced == "auto":
        checkpointing = choose_checkpointing(shape, plan, hardware.gpu.memory_free_gb)
    hardware.gradient_checkpointing = checkpointing
    plan = replace(plan, micro_batch=micro_batch, gradient_checkpointing=checkpointing)
    run.outputs.update(micro_batch=micro_batch, gradient_accumulation_steps=accumulation,
                       gradient_checkpointing=checkpointing, world_size=world,
                       effective_batch=micro_batch * accumulation * world)
    estimate = preflight(hardware, shape, plan)
    if estimate is not None:
        run.outputs["estimated_peak_gpu_memory_gb"] = round(estimate.total_gb, 2)
    return micro_batch, accumulation


# --- steps 5 to 8 -----------------------------------------------------------------------------------------------


def build_trainer(run: Run, model, prepared: Prepared, micro_batch: int, accumulation: int, optimizer: str, stop):
    from app.callbacks import research_callbacks
    from app.trainer import ControlCallback, JobTrainer, MetricsCallback, sft_config

    settings, job = run.settings, run.job
    if settings.report_to == "tensorboard":  # beside the job's other outputs, not under the checkpoints' staging
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(job.root / "tensorboard")
    config = sft_config(settings, run.hardware, job, run.backend, micro_batch, accumulation, optimizer,
                        has_eval=prepared.eval_dataset is not None)
    metrics = MetricsCallback(job.metrics)
    control = ControlCallback(stop)
    trainer = JobTrainer(
        model=model, args=config, train_dataset=prepared.train_dataset, eval_dataset=prepared.eval_dataset,
        processing_class=prepared.tokenizer, callbacks=[control, metrics], job=job,
    )
    control.trainer = metrics.trainer = trainer
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; MetricsCallback logs a readable line
    for callback in research_callbacks(settings, prepared.tokenizer, job, trainer):
        trainer.add_callback(callback)
    return trainer


def run_training(run: Run, trainer, stop) -> dict[str, Any]:
    """Train, resuming from the newest complete checkpoint; raises Interrupted / TrainingError."""
    import torch

    from app.plots import write_loss_plot

    job = run.job
    trainer.accelerator.wait_for_everyone()  # rank 0 has cleared what a killed run left: all ranks see the same
    resume = job.latest_checkpoint()
    metrics_cb = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "MetricsCallback")
    if resume is not None:
        step = int(resume.name.split("-")[1])
        logged = _truncate_metrics(job.metrics, step) if is_main() else 0
        metrics_cb.tokens_before = trainer.restore_totals(resume, logged)
        log.info("resuming job %s from %s (step %d)", run.job_id, resume.name, step)
    elif is_main():
        job.metrics.unlink(missing_ok=True)
    stop.in_training = True
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trainer.accelerator.wait_for_everyone()  # no rank still reads the staging folder
    except torch.cuda.OutOfMemoryError:
        raise GpuError("CUDA out of memory during training: the preflight estimate was too low for this run. "
                       "Lower FT_PER_DEVICE_TRAIN_BATCH_SIZE (raising FT_GRADIENT_ACCUMULATION_STEPS) or "
                       "FT_MAX_SEQ_LENGTH, or set FT_LOAD_IN_4BIT=true. The last checkpoint is kept.") from None
    finally:
        stop.in_training = False
        if world_size() == 1:
            job.clear_staging()  # half-written checkpoints never stay behind
    if world_size() > 1 and is_main():
        job.clear_staging()  # every rank is past the barrier above (after a failure: the next run's start)
    state = trainer.state
    run.outputs["global_step"] = state.global_step
    if trainer.nonfinite_step is not None:
        last = job.latest_checkpoint()
        write_loss_plot(job)
        raise TrainingError(
            f"the training {trainer.nonfinite_what} became non-finite (NaN/inf) at step {trainer.nonfinite_step}; training stopped "
            f"without saving those weights. {'The last good checkpoint is ' + last.name if last else 'No checkpoint was saved'}. "
            "Lower FT_LEARNING_RATE, check the data for empty or huge examples, or use bf16 hardware."
        )
    if stop.requested:
        last = job.latest_checkpoint()
        write_loss_plot(job)
        raise Interrupted(f"{stop.signal_name} received: stopped at step {state.global_step} after saving "
                          f"{last.name if last else 'no checkpoint'}. Run the same command again to resume.")
    metrics = dict(output.metrics)
    if trainer.eval_dataset is not None:
        logged = [e for e in state.log_history if "eval_loss" in e]
        if not logged or logged[-1].get("step") != state.global_step:
            metrics.update(trainer.evaluate())
        else:
            metrics["eval_loss"] = logged[-1]["eval_loss"]
    metrics["train_tokens"] = metrics_cb.train_tokens()
    metrics["time_to_first_step_s"] = metrics_cb.first_step_s
    metrics["session_tokens"] = trainer._total_train_tokens
    write_loss_plot(job)
    return metrics


def _truncate_metrics(path: Path, step: int) -> int:
    """Drop metrics logged after the checkpoint we resume from; return the train tokens at that step."""
    if not path.exists():
        return 0
    kept, tokens = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if record.get("step", 0) <= step:
            kept.append(line)
            tokens = record.get("train_tokens", tokens)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return tokens


@contextmanager
def disk_full_fails_training(run: Run):
    """A full volume while writing a checkpoint or the model: exit 4 with the cause, not a traceback. What was
    being written is half-written under a temporary name, never loaded; the last complete checkpoint stays."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        last = run.job.latest_checkpoint()
        raise TrainingError(
            f"FT_OUTPUT_DIR={run.settings.output_dir} is full ({err.strerror}) while writing {err.filename or 'a file'}. "
            f"{'The last complete checkpoint is ' + last.name if last else 'No checkpoint was saved'}; free space "
            "(or mount a larger volume) and rerun the same command to resume."
        ) from None


def save_model(run: Run, backend, model, tokenizer, model_path: Path) -> Path:
    """adapter/ always (small, and nothing is lost if merging fails); merged/ too when asked."""
    job, settings = run.job, run.settings
    tmp = job.root / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, job.adapter)
    if not settings.merge_before_push:
        return job.adapter
    shape = read_shape(model_path)
    needed = (shape.params * 2 if shape else 0) * 1.05 + 2**30
    free = shutil.disk_usage(job.root).free
    if free < needed:
        raise TrainingError(
            f"not enough disk for the merged model on FT_OUTPUT_DIR={settings.output_dir}: it needs about "
            f"{needed / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free. The adapter is saved at {job.adapter}; "
            "free space and rerun (the job resumes and only merges), or set FT_MERGE_BEFORE_PUSH=false."
        )
    tmp = job.root / f".merged.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    backend.save_merged(model, tokenizer, settings, model_path, run.hardware, tmp, job.adapter)
    publish_dir(tmp, job.merged)
    return job.merged


def finish(run: Run, metrics: dict[str, Any], artifact: Path) -> dict[str, Any]:
    import torch

    runtime = metrics.get("train_runtime") or 0.0
    run.outputs.update(
        train_loss=metrics.get("train_loss"),
        eval_loss=metrics.get("eval_loss"),
        train_runtime=runtime,
        train_tokens=metrics.get("train_tokens"),
        tokens_per_second=round(metrics.get("session_tokens", 0) / runtime, 1) if runtime else None,
        peak_gpu_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        time_to_first_step_s=round(metrics["time_to_first_step_s"], 2) if metrics.get("time_to_first_step_s") else None,
        model_path=str(artifact),
    )
    run.finetuned_model_id = str(artifact)
    if run.settings.push_to_hub:
        from app.hub import push

        run.finetuned_model_id = push(run.settings, artifact)
    result = run.result("completed")
    if run.write(result) != run.job.result and is_main():  # exit 0 must not leave an older result.json (say, interrupted) behind
        raise TrainingError(f"the model is saved at {artifact}, but {run.job.result} cannot be written (see the log "
                            f"above). Free space on FT_OUTPUT_DIR={run.settings.output_dir} and rerun the same command.")
    return result


# --- the commands ------------------------------------------------------------------------------------------------


def _select(run: Run):
    from app.backends import select_backend

    run.hardware = detect_hardware(run.settings.num_gpus)
    backend = select_backend(run.settings.backend, run.hardware.cuda)
    run.backend = backend.name
    return backend


def _mark(run: Run, name: str) -> None:
    """Seconds from process start to the end of a startup phase: where time to first step goes."""
    from app import PROCESS_START

    run.outputs.setdefault("startup_s", {})[name] = round(time.monotonic() - PROCESS_START, 2)


def train(run: Run, stop) -> dict[str, Any]:
    backend = _select(run)
    _mark(run, "imports")
    prepared = prepare_data(run)
    _mark(run, "data")
    open_job(run, prepared.file_hashes)
    if (done := completed_result(run)) is not None:
        return done
    if is_main():
        run.job.clear_temporaries()  # what a killed run left half-written is never loaded
    optimizer = effective_optimizer(run)
    micro_batch, accumulation = plan_memory(run, prepared.model_path, optimizer)
    from app.model_source import fetch_weights

    model_path = fetch_weights(run.settings.model, prepared.model_path, _token(run.settings))
    started = time.monotonic()
    from transformers import set_seed

    # add_lora draws the LoRA A matrices from the global RNG, before the trainer seeds it: seed here, or
    # FT_SEED does not fix the initial adapter and two runs of the same job train different models.
    set_seed(run.settings.seed)
    model = backend.load_model(run.settings, model_path, run.hardware)
    model = backend.add_lora(model, run.settings, run.hardware)
    run.outputs["load_time_s"] = round(time.monotonic() - started, 2)
    _mark(run, "model")
    trainer = build_trainer(run, model, prepared, micro_batch, accumulation, optimizer, stop)
    _mark(run, "trainer")
    with disk_full_fails_training(run):
        metrics = run_training(run, trainer, stop)
        if not is_main():  # rank 0 alone saves the model and writes the result
            return run.result("completed")
        artifact = save_model(run, backend, trainer.model, prepared.tokenizer, model_path)
    return finish(run, metrics, artifact)


def check(run: Run) -> dict[str, Any]:
    """Settings, data, GPU preflight; loads no weights. Returns a summary."""
    _select(run)
    prepared = prepare_data(run)
    optimizer = effective_optimizer(run)
    micro_batch, accumulation = plan_memory(run, prepared.model_path, optimizer)
    settings = run.settings
    from app.jobdir import job_id as make_id

    run.job_id = make_id(settings.public_params(), prepared.file_hashes, settings.job_id_suffix)
    job = JobDir(settings.output_dir / run.job_id)
    previous = job.previous_result()
    state = previous["status"] if previous else ("resumable" if job.latest_checkpoint() else "new")
    return {
        "job_id": run.job_id, "job_dir": str(job.root), "state": state, "backend": run.backend,
        "micro_batch": micro_batch, "gradient_accumulation_steps": accumulation, "optimizer": optimizer,
        "data": run.data, "gpu": run.hardware.as_dict(), "adjustments": run.adjustments,
        "estimated_peak_gpu_memory_gb": run.outputs.get("estimated_peak_gpu_memory_gb"),
    }


def preview(run: Run, count: int) -> tuple[list[dict[str, Any]], Any]:
    """The first `count` rows exactly as the trainer receives them (packed when FT_PACKING=true), and the
    tokenizer that decodes them."""
    prepared = prepare_data(run)
    dataset = prepared.train_dataset
    if run.settings.packing:
        dataset = pack_like_trainer(dataset, run.settings.max_seq_length, run.settings.seed)
    rows = dataset.select(range(min(count, len(dataset))))
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"]),
             **({"seq_lengths": list(r["seq_lengths"])} if "seq_lengths" in r else {})} for r in rows], prepared.tokenizer


def _token(settings: Settings) -> str | None:
    return settings.hf_token.get_secret_value() if settings.hf_token else None


__all__ = ["Run", "train", "check", "preview", "DataError"]
