"""The checks that need neither a tokenizer nor a weight, run before any expensive step (settings are
validated before this, app/settings.py): each failure names the setting and the fix.

    check_hardware(settings, hardware)                       before anything is read: what the device cannot run
    check_before_tokenizing(settings, hardware, config, ...)  with config.json: output folder, sequence length,
                                                             a model too large for the CPU (all at once)
    check_warmup(settings, steps)                            once the run's optimizer steps are known
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from app.errors import GpuError, SettingsError

log = logging.getLogger(__name__)

# Parameters above which training on the CPU is refused unless FT_ALLOW_CPU=true. A training step costs about
# 6 x parameters FLOPs per token; a CPU sustains some 10^10-10^11 FLOP/s in fp32 (2-16 cores), so a 300M model
# trains at roughly 5-50 tokens/s: a 1M-token file takes days, a 7B model weeks. Above this size the CPU is
# almost always a missing GPU (`docker run` without `--gpus`), not a choice.
CPU_MAX_PARAMS = 300_000_000


def check_hardware(settings, hardware) -> None:
    """Settings the device cannot run."""
    if settings.load_in_4bit and not hardware.cuda:
        raise GpuError("FT_LOAD_IN_4BIT=true needs a CUDA GPU (bitsandbytes NF4) and none is visible. Run on a GPU "
                       "host, or set FT_LOAD_IN_4BIT=false to train in 16/32 bits.")


def check_before_tokenizing(settings, hardware, config: dict[str, Any] | None, writes: bool = True) -> None:
    """Every problem that config.json and the settings show, before the (slow) tokenization: the settings' ones
    together (exit 2), then a model too large for the CPU (exit 3). `writes`: the command writes outputs."""
    problems = [p for p in (output_dir_problem(settings.output_dir) if writes else None,
                            sequence_problem(settings.max_seq_length, config)) if p]
    if problems:
        raise SettingsError(problems)
    params = parameter_count(config)
    if not hardware.cuda and not settings.allow_cpu and params and params > CPU_MAX_PARAMS:
        raise GpuError(
            f"No CUDA GPU is visible, and FT_MODEL={settings.model} has {params / 1e9:.2f}B parameters: on the CPU "
            f"it would train for days (refused above {CPU_MAX_PARAMS / 1e6:.0f}M). Give the job a GPU (docker run "
            "--gpus all ..., docker compose's GPU reservation, a GPU node), or set FT_ALLOW_CPU=true to train on the "
            "CPU anyway.")


def output_dir_problem(output_dir: Path) -> str | None:
    """FT_OUTPUT_DIR must be a folder this process can create files in; judged without creating anything (the
    job folder is created, and a file written there, once the job starts: app/jobdir.py check_writable)."""
    existing = Path(output_dir)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return None
    if not existing.is_dir():
        why = "it is a file, not a folder" if existing == output_dir else f"{existing} is a file, not a folder"
    else:
        why = "permission denied" if existing == output_dir else f"{existing} is not writable"
    return (f"FT_OUTPUT_DIR={output_dir}: not writable ({why}). Mount a writable volume there (e.g. -v "
            "./output:/output) or point FT_OUTPUT_DIR elsewhere.")


def context_length(config: dict[str, Any] | None) -> int | None:
    """The longest sequence the model was built for, from config.json: max_position_embeddings, or a RoPE
    scaling's factor x its original length when that is longer (YaRN added to a Qwen2.5 config)."""
    if not config:
        return None
    config = config.get("text_config", config)
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if isinstance(rope, dict) and rope.get("original_max_position_embeddings") and rope.get("factor"):
        limit = max(limit or 0, int(rope["original_max_position_embeddings"] * rope["factor"]))
    return int(limit) if limit else None


def sequence_problem(max_seq_length: int, config: dict[str, Any] | None) -> str | None:
    limit = context_length(config)
    if limit is None or max_seq_length <= limit:
        return None
    return (f"FT_MAX_SEQ_LENGTH={max_seq_length} is longer than the model's context of {limit} tokens "
            f"(max_position_embeddings in its config.json): positions past it were never trained. Set "
            f"FT_MAX_SEQ_LENGTH={limit} or less.")


def parameter_count(config: dict[str, Any] | None) -> int | None:
    """The model's parameters from config.json's numbers (no weights, no torch), or None when they are missing."""
    from app.memory import Shape

    try:
        return Shape.from_config(config).params if config else None
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def optimizer_steps(settings, rows: int, micro_batch: int, accumulation: int, world: int) -> int:
    """The run's optimizer steps, as the Trainer counts them: FT_MAX_STEPS, or epochs x the steps of one pass
    (each rank's batches, ceil(rows / micro-batch) shared over the ranks, in groups of `accumulation`)."""
    if settings.max_steps:
        return settings.max_steps
    batches = math.ceil(math.ceil(rows / micro_batch) / world)
    return math.ceil(settings.epochs * max(math.ceil(batches / accumulation), 1))


def check_warmup(settings, steps: int) -> None:
    """A warm-up as long as the run keeps the learning rate below FT_LEARNING_RATE throughout (linear warm-up
    from 0: step s trains at lr x s / warmup_steps); a run of one step then trains at 0 and changes nothing."""
    warmup = settings.warmup_steps
    if warmup < steps or warmup == 0:
        return
    if steps == 1:
        log.warning("FT_WARMUP_STEPS=%d and the run has 1 optimizer step: warm-up starts at learning rate 0, so the "
                    "step trains at 0 and the adapter stays as initialised (it changes nothing). Set "
                    "FT_WARMUP_STEPS=0 for a run this short.", warmup)
        return
    peak = settings.learning_rate * (steps - 1) / warmup
    log.warning("FT_WARMUP_STEPS=%d is not shorter than the run's %d optimizer steps: the learning rate never "
                "reaches FT_LEARNING_RATE=%g (it peaks at %.3g on the last step) and never decays. Lower "
                "FT_WARMUP_STEPS below %d.", warmup, steps, settings.learning_rate, peak, steps)
