"""The job, step by step: the table of contents of DESIGN.md. Each step lives in the module of its concern,
takes explicit inputs and returns one value; only this file records what they return (the Recorder of
app/result.py, from which result.json is written at any ending).

    prepared = prepare(settings, record)        no weights: hardware (app/hardware.py), backend (app/backends/,
                                                unsloth imported first), data and tokens (app/dataset.py), the
                                                job id (app/jobdir.py), the batch plan (app/plan.py); the
                                                banner (app/console.py), the cheap checks (app/checks.py)
    session = setup(settings, record)           + the job folder, locked (a completed job returns its result),
                                                the preflight (exit 3), step 2 the model, step 3 fresh LoRA
    outcome = train(session, stop, record)      step 5 the trainer, step 6 training (it resumes), step 7 the model
    result = finish(session, outcome, record)   step 8 result.json (and the push to the hub)

`python -m app train|check|preview|sweep`, the tests, the GPU probe script and bench/ all call these.
"""

from __future__ import annotations

import time
from typing import Any

from app import console
from app.backends import select_backend
from app.checks import check_before_tokenizing, check_hardware, check_warmup
from app.dataset import read_data, rows_key, tokenize
from app.formatting import pack_like_trainer
from app.hardware import detect_hardware
from app.jobdir import JobDir, open_job, previous_completed
from app.jobdir import job_id as make_job_id
from app.launch import is_main, world_size
from app.memory import build_skeleton, read_config, read_shape
from app.model_source import check_target_modules, fetch_weights, model_fingerprint, prefetch_weights, resolve_model
from app.plan import plan_batch, require_fit
from app.result import Recorder
from app.session import Outcome, Prepared, Session
from app.tokenizer import inference_stop_ids, load_tokenizer


def _mark(record: Recorder, name: str) -> None:
    """Seconds from process start to the end of a startup phase: where time to first step goes."""
    from app import PROCESS_START

    record.outputs.setdefault("startup_s", {})[name] = round(time.monotonic() - PROCESS_START, 2)


def prepare(settings, record: Recorder, base: Any = None, writes: bool = True) -> Prepared:
    """Everything that needs no weight, in fail-fast order (`check` stops here): the banner once the job id is
    known, the checks that need no tokenizer before tokenizing. A sweep's `base` counts as free GPU memory."""
    hardware = detect_hardware(settings.num_gpus)
    record.hardware = hardware = base.count_as_free(hardware) if base is not None else hardware
    check_hardware(settings, hardware)
    backend = select_backend(settings.backend, hardware)
    record.backend = backend.name
    console.starting(settings, hardware, backend)
    files = read_data(settings)
    record.data = console.data_formats(files)
    model_path = resolve_model(settings.model, settings.token())
    inputs = {**files.hashes, "model": model_fingerprint(settings.model, model_path)}  # new weights: another job
    record.job_id = job_id = make_job_id(settings.identity(), inputs, settings.job_id_suffix)
    console.announce(settings, job_id, files)
    if base is None or not base.holds():  # a sweep's held base needs no read: the disk reads the weights while the
        prefetch_weights(model_path)       # libraries import
    config = read_config(model_path)
    check_before_tokenizing(settings, hardware, config, writes)
    backend.activate()  # unsloth before transformers/TRL/PEFT
    _mark(record, "imports")
    skeleton = build_skeleton(config) if config else None
    check_target_modules(settings.model, settings.target_modules, skeleton)
    shape = read_shape(model_path, skeleton)
    tokenizer = load_tokenizer(settings, model_path)
    stop_ids = inference_stop_ids(model_path, tokenizer)
    rows = shape.vocab if shape else None  # the embedding's rows: a token id past them is refused as bad data
    if base is None:
        data = tokenize(settings, tokenizer, files, stop_ids, rows)
    else:  # a sweep line trains the rows of an earlier line when its rows_key is the same: tokenized once
        data = base.rows(rows_key(settings, inputs, stop_ids),
                         lambda: tokenize(settings, tokenizer, files, stop_ids, rows))
    record.data = {split: {**record.data.get(split, {}), **stats} for split, stats in data.stats.items()}
    _mark(record, "data")
    record.plan = plan = plan_batch(settings, shape, hardware, data.lengths, world_size(), backend.memory)
    record.outputs["optimizer_steps"] = steps = console.announce_plan(settings, data, plan)
    check_warmup(settings, steps)
    return Prepared(settings=settings, hardware=hardware, backend=backend, model_path=model_path, shape=shape,
                    tokenizer=tokenizer, data=data, hashes=files.hashes, job_id=job_id, plan=plan)


def setup(settings, record: Recorder | None = None, base: Any = None) -> Session:
    """Settings -> a session ready to train: prepared, its job folder locked, the model loaded (or taken from
    `base`, a sweep's SharedBase) with fresh LoRA weights. A completed job comes back with its result and no
    model (FT_OVERWRITE=true retrains it)."""
    record = record or Recorder(settings=settings)
    prepared = prepare(settings, record, base)
    job, lock = open_job(settings.output_dir, prepared.job_id, lock=is_main())
    record.job_root = job.root
    if base is not None:
        base.opened(prepared.job_id)
    session = Session(prepared, job, lock)
    session.completed = previous_completed(job, settings.overwrite, record.job_id)
    if session.completed is not None:
        return session
    if is_main():
        job.clear_temporaries()  # what a killed run left half-written is never loaded
    require_fit(prepared.plan, settings, prepared.shape, prepared.backend.memory, prepared.hardware,
                prepared.data.lengths)
    session.model_path = fetch_weights(settings.model, prepared.model_path, settings.token())
    started = time.monotonic()
    from transformers import set_seed

    from app.backends.reuse import freeze_heap

    backend, load = prepared.backend, (settings, session.model_path, prepared.hardware, prepared.plan)
    if base is not None:
        model = base.load(backend, *load)
    else:
        model = backend.load_model(*load)
        freeze_heap()  # until session.close(): what is loaded now is never garbage-collected again in this run
        session.thaw = True
    # add_lora draws the LoRA A matrices from the global RNG, before the trainer seeds it: seed here, or
    # FT_SEED does not fix the initial adapter and two runs of the same job train different models.
    set_seed(settings.seed)
    try:
        session.model = backend.add_lora(model, settings, prepared.plan)
    except BaseException:
        session.close()
        raise
    record.outputs["load_time_s"] = round(time.monotonic() - started, 2)
    _mark(record, "model")
    return session


def train(session: Session, stop, record: Recorder) -> Outcome:
    """Steps 5-7: train (resuming from the newest complete checkpoint), then save the model whole."""
    from app.artifacts import disk_full_is_a_training_error, save_model
    from app.trainer import build_trainer, run_training

    training = build_trainer(session, stop)
    _mark(record, "trainer")
    with disk_full_is_a_training_error(session.job, session.settings.output_dir):
        try:
            metrics = run_training(session.job, training, stop)
        finally:
            record.outputs["global_step"] = training.trainer.state.global_step
        if not is_main():  # rank 0 alone saves the model and writes the result
            return Outcome(metrics, session.job.adapter)
        return Outcome(metrics, save_model(session, training.trainer.model))


def finish(session: Session, outcome: Outcome, record: Recorder) -> dict[str, Any]:
    """Step 8: result.json (completed), after the push to the hub when asked."""
    import torch

    from app.errors import TrainingError

    metrics, runtime = outcome.metrics, outcome.metrics.get("train_runtime") or 0.0
    first_step = metrics.get("time_to_first_step_s")
    record.outputs.update(
        train_loss=metrics.get("train_loss"), eval_loss=metrics.get("eval_loss"), train_runtime=runtime,
        train_tokens=metrics.get("train_tokens"),
        tokens_per_second=round(metrics.get("session_tokens", 0) / runtime, 1) if runtime else None,
        peak_gpu_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        time_to_first_step_s=round(first_step, 2) if first_step else None, model_path=str(outcome.artifact),
    )
    record.finetuned_model_id = str(outcome.artifact)
    if not is_main():
        return record.result("completed")
    if session.settings.push_to_hub:
        from app.hub import push

        record.finetuned_model_id = push(session.settings, outcome.artifact)
    result = record.result("completed")
    if record.write(result) != session.job.result:  # exit 0 must not leave an older result.json behind
        raise TrainingError(f"the model is saved at {outcome.artifact}, but {session.job.result} cannot be written "
                            f"(see the log above). Free space on FT_OUTPUT_DIR={session.settings.output_dir} and "
                            "rerun the same command.")
    return result


def run(settings, record: Recorder, stop, base: Any = None) -> dict[str, Any]:
    """One whole job (`python -m app train`, or a sweep line: `base` gets the model back without LoRA): result.json"""
    session = setup(settings, record, base)
    try:
        if session.completed is not None:
            record.write(session.completed)  # the volume's result.json names the latest run
            return session.completed
        return finish(session, train(session, stop, record), record)
    finally:
        if base is not None:
            base.release(session.model)
        session.close()


def check(settings, record: Recorder) -> dict[str, Any]:
    """Settings, data, GPU preflight; loads no weights. A summary of what `train` would do."""
    prepared = prepare(settings, record)
    require_fit(prepared.plan, settings, prepared.shape, prepared.backend.memory, prepared.hardware,
                prepared.data.lengths)
    job, plan = JobDir(settings.output_dir / prepared.job_id), prepared.plan
    previous = job.previous_result()
    return {
        "job_id": prepared.job_id, "job_dir": str(job.root),
        "state": previous["status"] if previous else ("resumable" if job.latest_checkpoint() else "new"),
        "backend": prepared.backend.name, "micro_batch": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation, "effective_batch": plan.effective_batch,
        "optimizer_steps": record.outputs.get("optimizer_steps"), "optimizer": plan.optimizer, "data": record.data,
        "gpu": prepared.hardware.as_dict(), "adjustments": list(plan.adjustments),
        "estimated_peak_gpu_memory_gb": plan.outputs().get("estimated_peak_gpu_memory_gb"),
    }


def preview(settings, record: Recorder, count: int) -> tuple[list[dict[str, Any]], Any]:
    """The first `count` rows exactly as the trainer receives them (packed when FT_PACKING=true); the tokenizer."""
    prepared = prepare(settings, record, writes=False)
    dataset = prepared.data.train
    if settings.packing:
        dataset = pack_like_trainer(dataset, settings.max_seq_length, settings.seed)
    rows = dataset.select(range(min(count, len(dataset))))
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"]),
             **({"seq_lengths": list(r["seq_lengths"])} if "seq_lengths" in r else {})} for r in rows], prepared.tokenizer

