"""The batch plan: micro-batch, accumulation, gradient checkpointing, optimizer and the memory estimate,
decided once, before any weight is loaded, into one immutable value that the backends and the trainer read.

    plan = plan_batch(settings, shape, hardware, lengths, world, profile)   # pure: no I/O, no GPU
    require_fit(plan, ...)                                                  # exit 3 when it cannot fit

The estimate is made for the largest micro-batch the trainer will draw from the rows actually tokenized
(`lengths`: tokens per training row, packed rows when packing; `worst_batch`: the sampler's own order for FT_SEED),
not for rows of FT_MAX_SEQ_LENGTH.
Rules, each with a unit test in tests/test_plan.py:
1. 8-bit optimizers need bitsandbytes on a CUDA GPU; elsewhere adamw_torch (an adjustment).
2. FT_PER_DEVICE_TRAIN_BATCH_SIZE=auto keeps OpenWeights' effective batch (default micro-batch x accumulation,
   over all ranks) and takes its largest divisor that fits without checkpointing, else the largest that fits
   with it; accumulation is lowered to keep the effective batch (adjustments say so).
3. FT_GRADIENT_CHECKPOINTING=auto turns checkpointing on only when the run does not fit without it (it
   costs about a third of each step); true/false are obeyed.
4. Without a GPU or a readable config.json nothing is estimated: the given micro-batch (auto: the default),
   checkpointing as given (auto: on with CUDA, off on the CPU).
5. Packed rows are trained padding-free (TRL's best-fit-decreasing packing needs it); unpacked rows too when
   FT_PADDING_FREE says so (auto: where the backend's attention takes flattened rows without a dense mask),
   else padded to the longest row of their micro-batch. Either way each step trains the same examples with the
   same loss; padding-free skips the padding's compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from app.errors import GpuError
from app.memory import Batch, Estimate, Profile, Shape, Workload, estimate_peak

HEADROOM = 0.92  # use at most this share of the free memory: fragmentation, cuBLAS workspaces, the CUDA context


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    accumulation: int
    world: int  # data-parallel ranks
    checkpointing: bool
    optimizer: str  # transformers' name
    padding_free: bool
    batch: Batch | None = None  # the worst micro-batch the estimate is for
    estimate: Estimate | None = None
    budget_gb: float | None = None  # free GPU memory x HEADROOM; None without a GPU
    adjustments: tuple[dict[str, Any], ...] = ()

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world

    @property
    def fits(self) -> bool:
        return self.estimate is None or self.budget_gb is None or self.estimate.total_gb <= self.budget_gb

    def outputs(self) -> dict[str, Any]:
        """What result.json's outputs say about the plan."""
        out = {"micro_batch": self.micro_batch, "gradient_accumulation_steps": self.accumulation,
               "gradient_checkpointing": self.checkpointing, "world_size": self.world,
               "effective_batch": self.effective_batch}
        if self.estimate is not None:
            out["estimated_peak_gpu_memory_gb"] = round(self.estimate.total_gb, 2)
        return out


def _adjustment(setting: str, requested: Any, used: Any, why: str) -> dict[str, Any]:
    return {"setting": setting, "requested": requested, "used": used, "why": why}


def _optimizer(settings, hardware) -> tuple[str, list[dict[str, Any]]]:
    optimizer = settings.optimizer
    if "8bit" in optimizer and not (hardware.cuda and hardware.bitsandbytes):
        why = "8-bit AdamW needs bitsandbytes on a CUDA GPU" + ("" if hardware.cuda else "; this run is on the CPU")
        return "adamw_torch", [_adjustment("optim", settings.optim, "adamw_torch", why)]
    return optimizer, []


DRAWN_ROWS_MAX = 4_000_000  # rows over all passes up to which the drawn micro-batches are computed (a second or so)


def worst_batch(settings, lengths: list[int], rows: int, flat: bool, world: int, accumulation: int) -> Batch:
    """The largest micro-batch the trainer will draw from these rows (Batch.drawn: one process's sampler order,
    every pass the run makes); the largest any order could form (Batch.worst) where that order is not known here:
    several ranks (accelerate shards and evens out the batches), or more rows than DRAWN_ROWS_MAX to go through."""
    if world > 1 or not lengths:
        return Batch.worst(lengths, rows, flat)
    passes = settings.epochs
    if settings.max_steps:
        steps_per_pass = math.ceil(math.ceil(len(lengths) / rows) / accumulation)
        passes = math.ceil(settings.max_steps / steps_per_pass)
    if passes * len(lengths) > DRAWN_ROWS_MAX:
        return Batch.worst(lengths, rows, flat)
    return Batch.drawn(lengths, rows, flat, settings.seed, passes)


def plan_batch(settings, shape: Shape | None, hardware, lengths: list[int], world: int,
               profile: Profile) -> Plan:
    """The plan for these settings on this hardware and these training rows (see the module's rules)."""
    from app.settings import Settings

    optimizer, adjustments = _optimizer(settings, hardware)
    default_micro = Settings.model_fields["per_device_train_batch_size"].default  # OpenWeights' 2
    accumulation = settings.gradient_accumulation_steps
    micro = settings.per_device_train_batch_size
    forced = settings.gradient_checkpointing  # "auto", True or False
    padding_free = settings.packing or (
        profile.varlen_attention if settings.padding_free == "auto" else settings.padding_free)
    measurable = hardware.cuda and shape is not None and bool(lengths)
    budget = hardware.gpu.memory_free_gb * HEADROOM if hardware.cuda and hardware.gpu else None

    drawn: dict[int, Batch] = {}
    auto_micro, given_accumulation = micro == "auto", accumulation

    def worst(batch_size: int) -> Batch:
        if batch_size not in drawn:
            per_step = (max(default_micro * given_accumulation // world // batch_size, 1) if auto_micro
                        else given_accumulation)
            drawn[batch_size] = worst_batch(settings, lengths, batch_size, padding_free, world, per_step)
        return drawn[batch_size]

    def estimate(batch_size: int, checkpointing: bool) -> tuple[Batch, Estimate]:
        batch = worst(batch_size)
        work = Workload(batch=batch, load_in_4bit=settings.load_in_4bit, r=settings.r,
                        target_modules=tuple(settings.target_modules), optimizer_8bit="8bit" in optimizer,
                        checkpointing=checkpointing)
        return batch, estimate_peak(shape, profile, work)

    def fits(batch_size: int, checkpointing: bool) -> bool:
        return estimate(batch_size, checkpointing)[1].total_gb <= budget

    choices = (False, True) if forced == "auto" else (forced,)
    checkpointing = (forced if forced != "auto" else hardware.cuda)
    if micro == "auto":
        effective = max(default_micro * accumulation // world, 1)
        if world > 1 and (default_micro * accumulation) % world:
            adjustments.append(_adjustment(
                "gradient_accumulation_steps", accumulation, effective * world // default_micro,
                f"the effective batch {default_micro * accumulation} does not divide over {world} GPUs"))
        micro, checkpointing = default_micro, checkpointing
        if measurable:
            divisors = sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True)
            micro, checkpointing = next(((d, c) for c in choices for d in divisors if fits(d, c)), (1, choices[-1]))
        accumulation = max(effective // micro, 1)
        adjustments.append(_adjustment("per_device_train_batch_size", "auto", micro,
                                       f"largest divisor of the effective batch {effective} that fits; "
                                       f"accumulation {accumulation}"))
    elif measurable and forced == "auto":
        checkpointing = not fits(micro, False)
    batch, peak = estimate(micro, checkpointing) if measurable else (None, None)
    return Plan(micro_batch=micro, accumulation=accumulation, world=world, checkpointing=checkpointing,
                optimizer=optimizer, padding_free=padding_free, batch=batch, estimate=peak, budget_gb=budget,
                adjustments=tuple(adjustments))


def what_fits(settings, shape: Shape, profile: Profile, plan: Plan, lengths: list[int]) -> list[str]:
    """Changes that would fit, each alone: 4-bit, a smaller micro-batch, shorter rows."""
    options = []
    base = Workload(batch=plan.batch, load_in_4bit=settings.load_in_4bit, r=settings.r,
                    target_modules=tuple(settings.target_modules), optimizer_8bit="8bit" in plan.optimizer,
                    checkpointing=plan.checkpointing)

    def total(**change) -> float:
        return estimate_peak(shape, profile, replace(base, **change)).total_gb

    if not settings.load_in_4bit and total(load_in_4bit=True) <= plan.budget_gb:
        options.append("FT_LOAD_IN_4BIT=true")
    if not plan.checkpointing and total(checkpointing=True) <= plan.budget_gb:
        options.append("FT_GRADIENT_CHECKPOINTING=true (or auto)")
    def drawn(rows: list[int], micro_batch: int) -> Batch:  # the suggested run keeps the effective batch
        accumulation = max(plan.effective_batch // plan.world // micro_batch, 1)
        return worst_batch(settings, rows, micro_batch, plan.padding_free, plan.world, accumulation)

    batch = plan.micro_batch // 2
    while batch >= 1:
        if total(batch=drawn(lengths, batch)) <= plan.budget_gb:
            options.append(f"FT_PER_DEVICE_TRAIN_BATCH_SIZE={batch} (raise FT_GRADIENT_ACCUMULATION_STEPS to keep "
                           "the effective batch)")
            break
        batch //= 2
    seq = min(settings.max_seq_length, plan.batch.longest) // 2
    while seq >= 256:
        if total(batch=drawn([min(n, seq) for n in lengths], plan.micro_batch)) <= plan.budget_gb:
            options.append(f"FT_MAX_SEQ_LENGTH={seq}")
            break
        seq //= 2
    return options


def require_fit(plan: Plan, settings, shape: Shape | None, profile: Profile, hardware, lengths: list[int]) -> None:
    """Refuse (exit 3) before loading weights when the estimate exceeds the GPU's free memory."""
    if plan.fits:
        return
    gpu, estimate = hardware.gpu, plan.estimate
    fits = what_fits(settings, shape, profile, plan, lengths)
    advice = ("Any one of these fits: " + "; ".join(fits) + ".") if fits else (
        "Nothing smaller fits either: use a GPU with more free memory or a smaller model.")
    raise GpuError(
        f"Not enough GPU memory: the run needs about {estimate.total_gb:.1f} GiB at its peak (weights "
        f"{estimate.weights_gb:.1f}, activations {estimate.activations_gb:.1f}, logits {estimate.logits_gb:.1f}) "
        f"but {gpu.name} ({gpu.uuid}) has {gpu.memory_free_gb:.1f} of {gpu.memory_total_gb:.1f} GiB free "
        f"(micro-batch {plan.micro_batch}: {plan.batch.rows} rows, {plan.batch.tokens} tokens"
        f"{', checkpointing on' if plan.checkpointing else ''}, "
        f"{'4-bit' if settings.load_in_4bit else '16-bit'} weights). {advice}"
    )
