"""How often a run logs, checkpoints and evaluates, kept out of what it trains; and its progress on screen.

The cadence settings (logging_steps, save_steps, eval_batch_size, test_file_eval_strategy/steps,
eval_every_n_steps) are not part of the job id (app/settings.py `facts()`): a rerun that changes only them
resumes the same job. Two things make that true:

- CurrentCadence: transformers restores logging_steps, eval_steps and save_steps from the checkpoint's
  trainer_state.json, so a resumed run would keep the first run's cadence; this callback gives it the
  cadence of its own settings.
- EvaluationOffTrainingRng: an evaluation draws from the global torch RNG (its DataLoader takes a base seed
  from it each time it is iterated), the stream LoRA dropout draws its masks from: evaluating more or less
  often would change the trained weights. The RNG state from just before an evaluation is put back when it
  ends, before the checkpoint saves it, so the weights are the same for every evaluation cadence
  (tests/test_cadence.py trains, interrupts and resumes with another cadence, and compares bit for bit).

ProgressCallback shows training and evaluation as app/console.py renders them (a bar on a terminal,
periodic lines on a log); metrics.jsonl and its log lines are MetricsCallback's (app/trainer.py).
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from app import console
from app.console import Progress

log = logging.getLogger(__name__)


class CurrentCadence(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        before = {kind: getattr(state, f"{kind}_steps") for kind in ("logging", "eval", "save")}
        state.compute_steps(args, state.max_steps)  # what a fresh run sets; a resumed one loaded the old values
        changed = [f"{kind}_steps {getattr(state, f'{kind}_steps')} (was {value})" for kind, value in before.items()
                   if state.global_step and getattr(state, f"{kind}_steps") != value]
        if changed:  # transformers has just warned that the checkpoint's differ; these are the ones used
            log.info("resumed with this run's cadence: %s", ", ".join(changed))
        return control


class EvaluationOffTrainingRng(TrainerCallback):
    """Added last, so that it sees the final decision to evaluate and runs after every other callback's draws."""

    def __init__(self):
        self.saved = None

    def _save(self):
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.saved = (torch.get_rng_state(), cuda)

    def on_train_begin(self, args, state, control, **kwargs):
        if args.eval_on_start:
            self._save()

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            self._save()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            self._save()  # the epoch's evaluation (test_file_eval_strategy=epoch) comes next

    def on_log(self, args, state, control, logs=None, **kwargs):
        if control.should_evaluate and not any(key.startswith("eval_") for key in logs or {}):
            self._save()  # after the other callbacks' on_log (a sampling callback may draw there)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.saved is not None:
            cpu, cuda = self.saved
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            self.saved = None


class ProgressCallback(TrainerCallback):
    """The train display (optimizer steps) and one eval display per evaluation (batches)."""

    def __init__(self, stream=None, every_s: float | None = None, tty: bool | None = None):
        self.options = dict(stream=stream, every_s=console.PROGRESS_EVERY_S if every_s is None else every_s, tty=tty)
        self.train: Progress | None = None
        self.eval: Progress | None = None
        self.loss: float | None = None
        self._redirect = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.train = Progress("train", state.max_steps, done=state.global_step, **self.options)
        if self.train.bar is not None:  # log lines go above the bar instead of through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.train is not None:
            status = {"loss": f"{self.loss:.4f}"} if self.loss is not None else {}
            self.train.update(state.global_step, quiet=control.should_log, **status)  # a metrics line follows

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.train is not None and logs and "loss" in logs:
            self.loss = logs["loss"]
            self.train.logged()  # MetricsCallback has just logged the step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.eval is None:
            total = len(eval_dataloader) if eval_dataloader is not None else 0
            self.eval = Progress("eval", total, unit="batch", **self.options)
        self.eval.update(self.eval.done + 1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval is not None:
            self.eval.close()
            self.eval = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.train is not None:
            self.train.close()
            self.train = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def cadence_callbacks() -> list[TrainerCallback]:
    """The callbacks app/trainer.py build_trainer adds after all others (EvaluationOffTrainingRng must be last)."""
    return [CurrentCadence(), ProgressCallback(), EvaluationOffTrainingRng()]


__all__ = ["CurrentCadence", "EvaluationOffTrainingRng", "ProgressCallback", "cadence_callbacks"]
