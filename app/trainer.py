"""Steps 5 and 6: the SFTTrainer, its callbacks, and a training run that can be stopped and resumed.

- Checkpoints are written by the Trainer under checkpoints/.staging/ (its output_dir) and renamed into
  checkpoints/checkpoint-N by `CheckpointCallback.on_save` when whole: a kill mid-write leaves the previous
  complete checkpoint as the newest. Older ones are rotated out after a new one is whole.
- SIGTERM/SIGINT: the current optimizer step finishes, a checkpoint is saved, training stops (exit 75), with no
  evaluation first. A second signal exits at once.
- A non-finite loss stops training before the bad weights reach a checkpoint (exit 4); so do non-finite LoRA
  weights behind a finite loss, checked before every save.
- metrics.jsonl gets one line per logging step and per evaluation; a progress line goes to the log.
- The job's own totals (loss sum, train tokens) are carried across resumes in each checkpoint's
  job_totals.json: HF's train_loss and token counts cover one process only.

Everything goes through the Trainer's callbacks and public methods except one private hook, named in
`PRIVATE_HOOKS` with its reason; tests/test_trainer_hooks.py fails if the library changes it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput
from trl import SFTConfig, SFTTrainer

from app import PROCESS_START
from app.jobdir import JobDir, append_jsonl, publish_dir, write_json_atomic
from app.launch import is_main, world_size
from app.safeio import check_tree, write_atomic
from app.signals import StopRequest

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2  # the newest complete ones; older ones are deleted after a new one is whole
# Beside HF's trainer_state.json in every checkpoint: the running totals that HF keeps per process only
# (its train_loss divides this process's loss sum by the global step; TRL counts this process's tokens).
TOTALS_FILE = "job_totals.json"
# The private Trainer methods this module overrides, and why; a test pins their signatures.
PRIVATE_HOOKS = {
    "_load_optimizer_and_scheduler": "CPU data-parallel ranks (gloo): transformers maps the optimizer state to "
                                     "'cpu:0', which torch.load cannot restore to; no public hook loads it",
}


# --- what the job counts itself --------------------------------------------------------------------------------


class Progress:
    """The job's running totals, accumulated on the device without a sync per micro-batch, read (one sync)
    at logging steps, checkpoints and the end."""

    def __init__(self):
        self.loss_before = 0.0  # sum of the per-step mean losses of earlier sessions of this job (resume)
        self.tokens_before = 0  # train tokens of earlier sessions
        self._loss = None
        self._tokens = None
        self._finite = None

    def add(self, loss: torch.Tensor, tokens: torch.Tensor | int) -> None:
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        finite = torch.isfinite(loss).all()
        self._finite = finite if self._finite is None else self._finite & finite

    def step_finite(self, stop_requested: bool = False) -> tuple[bool, bool]:
        """(every micro-batch loss since the last call was finite, a stop was requested): read once per optimizer
        step, in one sync. With several ranks, what all of them say: non-finite on any, a stop on any. Each rank
        decides at the end of the step whether to stop there; a rank that stopped alone (a signal reaching it a
        step before the others, a NaN in its own micro-batch) would leave the others waiting in the next step's
        gradient all-reduce."""
        finite, self._finite = self._finite, None
        if world_size() > 1 and torch.distributed.is_initialized():
            device = finite.device if finite is not None else _collective_device()
            flags = torch.tensor([0.0, float(stop_requested)], device=device)
            if finite is not None:
                flags[0] = (~finite).float()
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            bad, stop = flags.tolist()
            return bad == 0, stop > 0
        return (True if finite is None else bool(finite)), stop_requested

    @staticmethod
    def _total(value, op: str) -> float:
        """A device-side total as a number; summed (or averaged) over data-parallel ranks."""
        if value is None:
            return 0.0
        value = torch.as_tensor(value).detach().double()
        if world_size() > 1 and torch.distributed.is_initialized():
            value = value.clone()
            torch.distributed.all_reduce(value)
            value = value / world_size() if op == "mean" else value
        return float(value)

    def loss_sum(self) -> float:
        return self.loss_before + self._total(self._loss, "mean")

    def train_tokens(self) -> int:
        return self.tokens_before + round(self._total(self._tokens, "sum"))

    def session_tokens(self) -> int:
        return self.train_tokens() - self.tokens_before

    def restore(self, checkpoint: Path, logged_tokens: int) -> None:
        """The totals saved with `checkpoint`. A checkpoint without them (an older version of the job) falls back
        on what was logged: the tokens of the last metrics line and the losses in trainer_state.json."""
        try:
            totals = json.loads((checkpoint / TOTALS_FILE).read_text())
            self.loss_before, self.tokens_before = float(totals["loss_sum"]), int(totals["train_tokens"])
        except (OSError, ValueError, KeyError, TypeError):
            state = json.loads((checkpoint / "trainer_state.json").read_text())
            previous, loss_sum = 0, 0.0
            for entry in state.get("log_history", []):
                if "loss" in entry:
                    loss_sum += entry["loss"] * (entry["step"] - previous)
                    previous = entry["step"]
            self.loss_before, self.tokens_before = loss_sum, logged_tokens
            log.warning("%s has no %s: train_loss and train_tokens are estimated from the logged steps",
                        checkpoint.name, TOTALS_FILE)


def _collective_device() -> torch.device:
    """Where this rank's collectives run: its GPU under NCCL, the CPU under gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _batch_tokens(inputs) -> torch.Tensor | int:
    """Tokens of one micro-batch, padding excluded (padding-free batches have none)."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    return int(inputs["input_ids"].numel())


# --- callbacks ----------------------------------------------------------------------------------------------


def _trainable_finite(model) -> bool:
    """A step can leave non-finite weights behind a finite loss (an inf gradient, clipped to NaN): checked on the
    trainable (LoRA) weights, which are small, before they become a checkpoint; one sync per save."""
    return all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters() if p.requires_grad)


@dataclass
class Failure:
    step: int | None = None
    what: str = "loss"  # or "LoRA weights"


class ControlCallback(TrainerCallback):
    """Stops on a signal (with a checkpoint, without an evaluation) or on a non-finite loss or weights (without
    a checkpoint). Runs after the Trainer's DefaultFlowCallback, so it sees and overrides its decisions."""

    def __init__(self, stop: StopRequest, progress: Progress, failure: Failure):
        self.stop, self.progress, self.failure = stop, progress, failure

    def _fail(self, state, control, what: str):
        self.failure.step, self.failure.what = state.global_step, what
        control.should_save = control.should_evaluate = False
        control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        finite, stop = self.progress.step_finite(self.stop.requested)
        if stop and not self.stop.requested:  # another rank got the signal: this one stops at the same step
            self.stop.signal_name = "another rank's signal"
        if not finite:
            return self._fail(state, control, "loss")
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last steps are logged even when logging_steps does not divide them
        if self.stop.requested:
            control.should_log = True  # metrics.jsonl gets the step the checkpoint holds
            control.should_save = True
            control.should_evaluate = False  # exit right after the checkpoint: no evaluation first
            control.should_training_stop = True
        if control.should_save and model is not None and not _trainable_finite(model):
            log.error("step %d left non-finite LoRA weights: not saving them as a checkpoint", state.global_step)
            return self._fail(state, control, "LoRA weights")
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stop.requested or self.failure.step is not None:
            control.should_evaluate = control.should_save = False
        return control


class CheckpointCallback(TrainerCallback):
    """Publishes what the Trainer saved under checkpoints/.staging/checkpoint-N (with the job's totals) as
    checkpoints/checkpoint-N, whole, then rotates the older ones out."""

    def __init__(self, job: JobDir, progress: Progress):
        self.job, self.progress = job, progress

    def on_step_end(self, args, state, control, **kwargs):
        # Runs after ControlCallback: the final decision. The job makes the folder the Trainer writes into (a
        # link planted at a predictable checkpoint-N is refused, never written through).
        if control.should_save:
            self.job.prepare_staging(f"checkpoint-{state.global_step}")
        return control

    def on_save(self, args, state, control, **kwargs):
        name = f"checkpoint-{state.global_step}"
        totals = {"loss_sum": self.progress.loss_sum(), "train_tokens": self.progress.train_tokens()}
        if world_size() > 1:
            torch.distributed.barrier()  # every rank's RNG state is in the folder before it is published
        if not args.should_save:
            return control
        write_json_atomic(self.job.staging / name / TOTALS_FILE, totals)
        check_tree(self.job.staging / name)  # what the Trainer wrote holds no link before it is published
        publish_dir(self.job.staging / name, self.job.checkpoints / name)
        for old in self.job.complete_checkpoints()[:-KEEP_CHECKPOINTS]:
            self.job.retire(old)  # moved out of checkpoints/ first: never a half-deleted "complete" checkpoint
        return control


@dataclass
class MetricsCallback(TrainerCallback):
    """metrics.jsonl (one object per log and per evaluation) and a progress line for `docker logs`."""

    path: Path
    progress: Progress
    started: float = field(default_factory=time.monotonic)
    _last_time: float = 0.0
    _last_tokens: int = 0
    _first_step: int | None = None
    first_step_s: float | None = None  # seconds from process start to the end of the first optimizer step

    def _write(self, record: dict[str, Any]) -> None:
        if not is_main():  # one metrics.jsonl per job: rank 0's
            return
        append_jsonl(self.path, [record])

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None:
            self.first_step_s = time.monotonic() - PROCESS_START

    def on_train_begin(self, args, state, control, **kwargs):
        self._first_step = state.global_step
        self._last_time = time.monotonic()
        self._last_tokens = self.progress.train_tokens()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                                  "elapsed_s": round(time.monotonic() - PROCESS_START, 3)}
        if "eval_loss" in logs:
            record.update({k: v for k, v in logs.items() if k.startswith("eval_")})
            self._write(record)
            log.info("eval  step %d/%d  eval_loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])
            return
        if "loss" not in logs:  # the trainer's final summary (train_runtime, ...): result.json has it
            return
        now = time.monotonic()
        tokens = self.progress.train_tokens()
        window = max(now - self._last_time, 1e-9)
        tps = (tokens - self._last_tokens) / window
        self._last_time, self._last_tokens = now, tokens
        record.update(
            loss=logs.get("loss"), grad_norm=logs.get("grad_norm"), learning_rate=logs.get("learning_rate"),
            train_tokens=tokens, tokens_per_second=round(tps, 1),
            mean_token_accuracy=logs.get("mean_token_accuracy"),
        )
        if torch.cuda.is_available():
            record["gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self._write(record)
        done = state.global_step - (self._first_step or 0)
        remaining = state.max_steps - state.global_step
        elapsed = now - self.started
        eta = elapsed / done * remaining if done else float("nan")
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %s tok/s  ETA %s",
            state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", 0.0),
            f"{tps:,.0f}", _duration(eta),
        )


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# --- the trainer ---------------------------------------------------------------------------------------------


class JobTrainer(SFTTrainer):
    """SFTTrainer that counts its own totals (Progress), resumes a job that has trained every step without one
    step more, and writes no model card into checkpoints."""

    def __init__(self, *args, progress: Progress, **kwargs):
        self.progress = progress
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        tokens = _batch_tokens(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.progress.add(loss, tokens)
        return loss

    def train(self, resume_from_checkpoint: str | None = None, **kwargs) -> TrainOutput:
        """Train; `train_loss` covers every session of the job (earlier sessions' losses from the checkpoint)."""
        if resume_from_checkpoint is not None:
            state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / "trainer_state.json"))
            if 0 < state.max_steps <= state.global_step:
                return self._already_trained(Path(resume_from_checkpoint), state)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        steps = max(self.state.global_step, 1)
        loss = output.training_loss + self.progress.loss_before / steps
        return TrainOutput(output.global_step, loss, {**output.metrics, "train_loss": loss})

    def _already_trained(self, checkpoint: Path, state: TrainerState) -> TrainOutput:
        """The checkpoint holds the last step (the run was stopped or failed after training, e.g. while saving).
        HF would train one more step past max_steps when max_steps is not a whole number of epochs (its epoch
        loop does not check global_step before the first step): load the checkpoint's adapter instead."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        log.info("%s holds the last step (%d): nothing left to train", checkpoint.name, state.global_step)
        set_peft_model_state_dict(self.model, load_file(checkpoint / "adapter_model.safetensors"))
        self.state = state
        loss = self.progress.loss_before / state.global_step
        return TrainOutput(state.global_step, loss, {"train_loss": loss, "train_runtime": 0.0})

    def create_model_card(self, *args, **kwargs) -> None:
        """No hub model card in checkpoints (TRL writes one at every save)."""

    # --- private hooks (PRIVATE_HOOKS says why) ------------------------------------------------------------

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or self.args.world_size == 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)
        load = torch.load

        def load_on_cpu(*args, **kwargs):
            kwargs["map_location"] = "cpu"
            return load(*args, **kwargs)

        torch.load = load_on_cpu
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            torch.load = load


def sft_config(settings, plan, hardware, job: JobDir, backend_args: dict[str, Any], has_eval: bool) -> SFTConfig:
    """TRL's config from the job's settings, its batch plan and the backend's own arguments."""
    eval_strategy = settings.test_file_eval_strategy if has_eval else "no"
    return SFTConfig(
        output_dir=str(job.staging),  # the Trainer writes checkpoint-N here; CheckpointCallback publishes it
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=settings.eval_batch_size,
        gradient_accumulation_steps=plan.accumulation,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        optim=plan.optimizer,
        lr_scheduler_type=settings.lr_scheduler_type,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=None,  # CheckpointCallback rotates complete checkpoints itself
        eval_strategy=eval_strategy,
        eval_steps=settings.test_file_eval_steps if eval_strategy == "steps" else None,
        eval_on_start=has_eval and eval_strategy != "no",
        bf16=hardware.cuda and hardware.bf16,
        fp16=hardware.cuda and not hardware.bf16,
        use_cpu=not hardware.cuda,
        packing=settings.packing,
        packing_strategy="bfd",
        padding_free=plan.padding_free,
        # TRL truncates padded rows to max_length; the rows are truncated already (app/formatting.py), and TRL
        # refuses a max_length for padding-free rows that are not packed.
        max_length=settings.max_seq_length if settings.packing or not plan.padding_free else None,
        report_to=[] if settings.report_to == "none" else [settings.report_to],
        disable_tqdm=True,  # MetricsCallback logs one line per step: readable in a terminal and in `docker logs`
        dataloader_num_workers=0,
        dataset_num_proc=None,
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if plan.world > 1 and not hardware.cuda else None,  # CPU ranks: gloo; GPUs: NCCL
        **backend_args,
    )


@dataclass
class Training:
    """A trainer wired to its job: what run_training reads after `train()` returns."""

    trainer: JobTrainer
    progress: Progress
    metrics: MetricsCallback
    failure: Failure


def build_trainer(session, stop: StopRequest) -> Training:
    """The job's trainer for a session: TRL's SFTTrainer on the session's rows, plan and job folder."""
    from transformers.trainer_callback import PrinterCallback

    from app.cadence import cadence_callbacks
    from app.callbacks import research_callbacks
    from app.settings import set_library_variable

    prepared, job = session.prepared, session.job
    settings, backend = prepared.settings, prepared.backend
    if settings.report_to == "tensorboard":  # beside the job's other outputs, not under the checkpoints' staging
        set_library_variable("TENSORBOARD_LOGGING_DIR", str(job.root / "tensorboard"))
    config = sft_config(settings, prepared.plan, prepared.hardware, job, backend.trainer_args(prepared.plan),
                        has_eval=prepared.data.eval is not None)
    progress, failure = Progress(), Failure()
    if is_main():
        job.prepare_checkpoints()  # real folders, made before the Trainer makes its output_dir (.staging)
    metrics = MetricsCallback(job.metrics, progress)
    trainer = JobTrainer(
        model=session.model, args=config, train_dataset=prepared.data.train, eval_dataset=prepared.data.eval,
        processing_class=prepared.tokenizer, progress=progress,
        callbacks=[ControlCallback(stop, progress, failure), CheckpointCallback(job, progress), metrics],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; MetricsCallback logs a readable line
    rows = prepared.shape.vocab if prepared.shape else None  # the embedding's rows (app.formatting.check_embedding)
    for callback in [*research_callbacks(settings, prepared.tokenizer, job, backend, prepared.data.stop_ids, rows),
                     *cadence_callbacks()]:  # app/cadence.py: progress, cadence on resume, eval off the RNG (last)
        trainer.add_callback(callback)
    return Training(trainer, progress, metrics, failure)


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
    write_atomic(path, "".join(line + "\n" for line in kept).encode("utf-8"))
    return tokens


def run_training(job: JobDir, training: Training, stop: StopRequest) -> dict[str, Any]:
    """Train, resuming from the newest complete checkpoint; the trainer's metrics plus the job's totals.
    Raises Interrupted (a signal), TrainingError (non-finite), GpuError (out of memory)."""
    from app.errors import GpuError, Interrupted, TrainingError
    from app.plots import write_loss_plot

    trainer = training.trainer
    trainer.accelerator.wait_for_everyone()  # rank 0 has cleared what a killed run left: all ranks see the same
    resume = job.latest_checkpoint()
    if resume is not None:
        step = int(resume.name.split("-")[1])
        logged = _truncate_metrics(job.metrics, step) if is_main() else 0
        training.progress.restore(resume, logged)
        log.info("resuming job %s from %s (step %d)", job.root.name, resume.name, step)
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
    if training.failure.step is not None:
        last = job.latest_checkpoint()
        write_loss_plot(job)
        raise TrainingError(
            f"the training {training.failure.what} became non-finite (NaN/inf) at step {training.failure.step}; "
            f"training stopped without saving those weights. "
            f"{'The last good checkpoint is ' + last.name if last else 'No checkpoint was saved'}. "
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
    metrics["global_step"] = state.global_step
    metrics["train_tokens"] = training.progress.train_tokens()
    metrics["session_tokens"] = training.progress.session_tokens()
    metrics["time_to_first_step_s"] = training.metrics.first_step_s
    write_loss_plot(job)
    return metrics
