"""The trainer's contract with transformers/TRL (app/trainer.py): the callbacks' decisions, and the one private
hook it overrides, pinned so that an upgrade that changes it fails here and not in a user's resumed run."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from app.signals import StopRequest
from app.trainer import PRIVATE_HOOKS, ControlCallback, Failure, JobTrainer, Progress


@pytest.mark.parametrize("name", sorted(PRIVATE_HOOKS))
def test_each_private_hook_still_exists_with_the_signature_the_job_overrides(name):
    hook = getattr(Trainer, name, None)
    assert hook is not None, f"transformers removed Trainer.{name}: {PRIVATE_HOOKS[name]}"
    ours = inspect.signature(getattr(JobTrainer, name))
    theirs = inspect.signature(hook)
    assert list(ours.parameters) == list(theirs.parameters), f"Trainer.{name} changed: {theirs}"


def test_no_other_private_trainer_method_is_overridden():
    private = {name for name, value in vars(JobTrainer).items() if name.startswith("_") and not name.startswith("__")
               and callable(value) and hasattr(Trainer, name)}
    assert private == set(PRIVATE_HOOKS)


class _Model(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.lora = torch.nn.Parameter(torch.tensor([value]))


def _step(callback, model=None, *, save=False, evaluate=False, step=3, max_steps=10):
    state = TrainerState()
    state.global_step, state.max_steps = step, max_steps
    control = TrainerControl(should_save=save, should_evaluate=evaluate)
    return callback.on_step_end(TrainingArguments(output_dir="/tmp/unused", report_to=[]), state, control,
                                model=model or _Model(1.0))


def _callback(losses=(1.0,), stop=False):
    progress, failure, request = Progress(), Failure(), StopRequest()
    for loss in losses:
        progress.add(torch.tensor(loss), 10)
    if stop:
        request.signal_name = "SIGTERM"
    return ControlCallback(request, progress, failure), failure


def test_a_signal_saves_a_checkpoint_and_stops_without_evaluating():
    callback, _ = _callback(stop=True)
    control = _step(callback, evaluate=True)
    assert control.should_save and control.should_training_stop and control.should_log
    assert not control.should_evaluate


def test_a_nonfinite_loss_stops_without_saving():
    callback, failure = _callback(losses=(1.0, float("nan")))
    control = _step(callback, save=True)
    assert control.should_training_stop and not control.should_save
    assert (failure.step, failure.what) == (3, "loss")


def test_nonfinite_weights_behind_a_finite_loss_are_never_checkpointed():
    callback, failure = _callback()
    control = _step(callback, _Model(float("inf")), save=True)
    assert control.should_training_stop and not control.should_save
    assert failure.what == "LoRA weights"
    callback, failure = _callback()
    assert _step(callback, _Model(float("inf")), save=False).should_training_stop is False  # checked at saves only


def test_the_end_of_an_epoch_after_a_signal_neither_evaluates_nor_saves_again():
    callback, _ = _callback(stop=True)
    control = TrainerControl(should_evaluate=True, should_save=True)
    control = callback.on_epoch_end(TrainingArguments(output_dir="/tmp/unused", report_to=[]), TrainerState(), control)
    assert not control.should_evaluate and not control.should_save


def test_progress_carries_the_totals_of_earlier_sessions():
    progress = Progress()
    progress.loss_before, progress.tokens_before = 5.0, 100
    progress.add(torch.tensor(0.5), torch.tensor(7))
    progress.add(torch.tensor(0.25), 3)
    assert progress.loss_sum() == pytest.approx(5.75)
    assert progress.train_tokens() == 110 and progress.session_tokens() == 10
    assert progress.step_finite() == progress.step_finite() == (True, False)  # read once per step, reset after
    progress.add(torch.tensor(float("nan")), 1)
    assert progress.step_finite(stop_requested=True) == (False, True) and progress.step_finite() == (True, False)
