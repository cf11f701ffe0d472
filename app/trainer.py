"""Steps 5 and 6: the SFTTrainer, its callbacks, and a training run that can be stopped and resumed.

- Checkpoints are written under checkpoints/.staging/ and renamed into checkpoints/checkpoint-N when whole:
  a kill mid-write leaves the previous complete checkpoint as the newest.
- SIGTERM/SIGINT: the current optimizer step finishes, a checkpoint is saved, training stops (exit 75).
  A second signal exits at once.
- A non-finite loss stops training before the bad weights reach a checkpoint (exit 4).
- metrics.jsonl gets one line per logging step and per evaluation; a progress line goes to the log.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput
from trl import SFTConfig, SFTTrainer

from app import PROCESS_START
from app.jobdir import JobDir, publish_dir, write_json_atomic
from app.launch import is_main, world_size
from app.signals import StopRequest

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2  # the newest complete ones; older ones are deleted after a new one is whole
# Beside HF's trainer_state.json in every checkpoint: the running totals that HF keeps per session only
# (its train_loss divides this session's loss sum by the global step; TRL counts this session's tokens).
TOTALS_FILE = "job_totals.json"


# --- callbacks ----------------------------------------------------------------------------------------------


class ControlCallback(TrainerCallback):
    """Stops on a signal (with a checkpoint) or on a non-finite loss (without one)."""

    def __init__(self, stop: StopRequest, trainer: JobTrainer | None = None):
        self.stop = stop
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is not None and not self.trainer.loss_is_finite():
            self.trainer.nonfinite_step = state.global_step
            self.trainer.nonfinite_what = "loss"
            control.should_save = False
            control.should_evaluate = False
            control.should_training_stop = True
            return control
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last steps are logged even when logging_steps does not divide them
        if self.stop.requested:
            control.should_log = True  # metrics.jsonl gets the step the checkpoint holds
            control.should_save = True
            control.should_training_stop = True
        return control


@dataclass
class MetricsCallback(TrainerCallback):
    """metrics.jsonl (one object per log and per evaluation) and a progress line for `docker logs`."""

    path: Path
    tokens_before: int = 0  # train tokens of earlier sessions of this job (resume)
    trainer: Any = None
    started: float = field(default_factory=time.monotonic)
    _last_time: float = 0.0
    _last_tokens: int = 0
    _first_step: int | None = None
    first_step_s: float | None = None  # seconds from process start to the end of the first optimizer step

    def _write(self, record: dict[str, Any]) -> None:
        if not is_main():  # one metrics.jsonl per job: rank 0's
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def train_tokens(self) -> int:
        return self.tokens_before + (self.trainer._total_train_tokens if self.trainer is not None else 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None:
            self.first_step_s = time.monotonic() - PROCESS_START

    def on_train_begin(self, args, state, control, **kwargs):
        self._first_step = state.global_step
        self._last_time = time.monotonic()
        self._last_tokens = self.train_tokens()

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
        tokens = self.train_tokens()
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


def _batch_tokens(inputs) -> int:
    """Tokens of one micro-batch, padding excluded (padding-free batches have none)."""
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())


class JobTrainer(SFTTrainer):
    """SFTTrainer with whole-or-absent checkpoints and a cheap non-finite-loss check."""

    def __init__(self, *args, job: JobDir, **kwargs):
        self.job = job
        self.nonfinite_step: int | None = None
        self.nonfinite_what = "loss"  # or "LoRA weights": what was found non-finite
        self._finite = None
        self.loss_before = 0.0  # sum of the per-step losses of earlier sessions of this job (resume)
        self.tokens_before = 0  # train tokens of earlier sessions
        super().__init__(*args, **kwargs)

    def restore_totals(self, checkpoint: Path, logged_tokens: int) -> int:
        """Read the loss and token totals saved with `checkpoint`; return the train tokens before it.

        A checkpoint without the file (written by an older version of the job) falls back on what was
        logged: the tokens of the last metrics line and the losses in trainer_state.json's log history.
        """
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
        return self.tokens_before

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        if resume_from_checkpoint is not None:
            state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / "trainer_state.json"))
            if 0 < state.max_steps <= state.global_step:
                return self._already_trained(resume_from_checkpoint, state)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _already_trained(self, checkpoint: str, state: TrainerState) -> TrainOutput:
        """The checkpoint holds the last step (the run was stopped or failed after training, e.g. while saving).
        HF would train one more step past max_steps when max_steps is not a whole number of epochs (its epoch
        loop does not check global_step before the first step): load the checkpoint's adapter instead."""
        log.info("%s holds the last step (%d): nothing left to train", Path(checkpoint).name, state.global_step)
        self._load_from_checkpoint(checkpoint)
        self.state = state
        loss = self.loss_before / state.global_step
        return TrainOutput(state.global_step, loss, {"train_loss": loss, "train_runtime": 0.0})

    def _load_optimizer_and_scheduler(self, checkpoint):
        """transformers maps the optimizer state to `args.device` with several ranks, which on CPU ranks (gloo)
        is "cpu:0", a location torch.load cannot restore to: map it to "cpu" there. GPUs are unaffected."""
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

    def _finalize_training(self, trial, num_train_samples, start_time):
        # HF divides this session's loss sum by the global step, which counts earlier sessions too: add theirs.
        self._total_loss_scalar += self.loss_before
        return super()._finalize_training(trial, num_train_samples, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        counted = self._total_train_tokens
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._total_train_tokens == counted:  # unsloth's compute_loss replaces TRL's, which counts tokens
            self._total_train_tokens += _batch_tokens(inputs) * self.args.world_size  # TRL's count is global
        finite = torch.isfinite(loss.detach()).all()  # stays on the device: no sync per micro-batch
        self._finite = finite if self._finite is None else self._finite & finite
        return loss

    def loss_is_finite(self) -> bool:
        """Read once per optimizer step (one device sync)."""
        if self._finite is None:
            return True
        finite = bool(self._finite)
        self._finite = None
        return finite

    def create_model_card(self, *args, **kwargs) -> None:
        """No hub model card in checkpoints (TRL writes one at every save)."""

    def _get_output_dir(self, trial) -> str:
        return str(self.job.staging)

    def _trainable_weights_finite(self) -> bool:
        """A step can leave non-finite weights behind a finite loss (an inf gradient, clipped to NaN): check the
        trainable (LoRA) weights before they become a checkpoint. They are small; one sync per save."""
        return all(bool(torch.isfinite(p.detach()).all()) for p in self.model.parameters() if p.requires_grad)

    def _save_checkpoint(self, model, trial) -> None:
        name = f"checkpoint-{self.state.global_step}"
        if not self._trainable_weights_finite():
            log.error("step %d left non-finite LoRA weights: not saving them as a checkpoint", self.state.global_step)
            self.nonfinite_step, self.nonfinite_what = self.state.global_step, "LoRA weights"
            self.control.should_training_stop = True
            return
        if self.args.should_save:
            shutil.rmtree(self.job.staging / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # no rank writes into a folder rank 0 is still clearing
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's RNG state is in the folder before it is published
        if not self.args.should_save:
            return
        totals = {"loss_sum": self.loss_before + self._total_loss_scalar + float(self._tr_loss),
                  "train_tokens": self.tokens_before + self._total_train_tokens}
        write_json_atomic(self.job.staging / name / TOTALS_FILE, totals)
        publish_dir(self.job.staging / name, self.job.checkpoints / name)
        for old in self.job.complete_checkpoints()[:-KEEP_CHECKPOINTS]:
            # Moved out of checkpoints/ first: a kill while deleting leaves no half-deleted "complete" checkpoint.
            trash = self.job.staging / f".old-{old.name}"
            shutil.rmtree(trash, ignore_errors=True)
            old.replace(trash)
            shutil.rmtree(trash, ignore_errors=True)


def sft_config(settings, hardware, job: JobDir, backend: str, micro_batch: int, accumulation: int,
               optimizer: str, has_eval: bool) -> SFTConfig:
    """TRL's config from the job's settings. unsloth brings its own gradient checkpointing (set when the
    LoRA is added), so the trainer's is only for the hf backend."""
    eval_strategy = settings.test_file_eval_strategy if has_eval else "no"
    return SFTConfig(
        output_dir=str(job.staging),
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=settings.eval_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        optim=optimizer,
        lr_scheduler_type=settings.lr_scheduler_type,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=None,  # JobTrainer rotates complete checkpoints itself
        eval_strategy=eval_strategy,
        eval_steps=settings.test_file_eval_steps if eval_strategy == "steps" else None,
        eval_on_start=has_eval and eval_strategy != "no",
        bf16=hardware.cuda and hardware.bf16,
        fp16=hardware.cuda and not hardware.bf16,
        use_cpu=not hardware.cuda,
        gradient_checkpointing=hardware.gradient_checkpointing and backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        packing=settings.packing,
        packing_strategy="bfd",
        max_length=settings.max_seq_length,
        report_to=[] if settings.report_to == "none" else [settings.report_to],
        disable_tqdm=True,  # MetricsCallback logs one line per step: readable in a terminal and in `docker logs`
        dataloader_num_workers=0,
        dataset_num_proc=None,
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if world_size() > 1 and not hardware.cuda else None,  # CPU ranks: gloo; GPUs: NCCL
    )
