"""The batch plan's rules (app/plan.py), one test each, without a GPU: hardware and rows are made up here.

The memory model itself is checked against measured peaks in tests/test_estimate.py; here the numbers only
need to be consistent, so a budget is set just above or below what a choice needs.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from app.backends import backend_class
from app.devmodel import SHAPES
from app.errors import GpuError
from app.hardware import GpuInfo, Hardware
from app.memory import Batch, Shape, Workload, estimate_peak
from app.plan import HEADROOM, plan_batch, require_fit
from app.settings import load_settings
from tests.conftest import SAMPLE

QWEN7B = Shape.from_config({**SHAPES["qwen2-7b"], "model_type": "qwen2"})
UNSLOTH = backend_class("unsloth").memory
ROWS = [700, 650, 400, 380, 370, 360, 350, 300] * 4  # short rows: a few hundred tokens, as the code data
CPU = Hardware(cuda=False)


def gpu(free_gb: float, bitsandbytes: bool = True) -> Hardware:
    info = GpuInfo(name="H200", uuid="GPU-test", index=0, memory_total_gb=139.8, memory_free_gb=free_gb,
                   compute_capability="9.0", bf16=True)
    return Hardware(cuda=True, gpu=info, bf16=True, num_gpus=1, bitsandbytes=bitsandbytes)


def settings(**values):
    values = {"model": "m", "training_file": "t.jsonl", "output_dir": "/tmp/plan-test", "packing": False, "padding_free": False,
              **values}
    return load_settings(**values)[0]


def need(micro_batch: int, checkpointing: bool, rows=ROWS, flat=False, **change) -> float:
    """GiB the estimate needs for this choice (the budget the tests set around)."""
    work = Workload(batch=Batch.worst(rows, micro_batch, flat), load_in_4bit=change.get("load_in_4bit", False), r=16,
                    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                    optimizer_8bit=True, checkpointing=checkpointing)
    return estimate_peak(QWEN7B, UNSLOTH, work).total_gb


def free_for(gib: float) -> float:
    """Free GPU memory whose budget (x HEADROOM) is exactly `gib`."""
    return gib / HEADROOM


# --- rule 1: the optimizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hardware,expected", [(CPU, "adamw_torch"), (gpu(100, bitsandbytes=False), "adamw_torch"),
                                               (gpu(100), "adamw_8bit")])
def test_8bit_adamw_needs_bitsandbytes_on_a_gpu(hardware, expected):
    plan = plan_batch(settings(), QWEN7B, hardware, ROWS, 1, UNSLOTH)
    assert plan.optimizer == expected
    changed = [a for a in plan.adjustments if a["setting"] == "optim"]
    assert bool(changed) == (expected != "adamw_8bit")


# --- rule 2: FT_PER_DEVICE_TRAIN_BATCH_SIZE=auto -----------------------------------------------------------------


def test_auto_takes_the_largest_divisor_that_fits_without_checkpointing():
    # effective batch 2 x 8 = 16; budget between what 8 and 16 rows need without checkpointing
    budget = (need(8, False) + need(16, False)) / 2
    plan = plan_batch(settings(per_device_train_batch_size="auto"), QWEN7B, gpu(free_for(budget)), ROWS, 1, UNSLOTH)
    assert (plan.micro_batch, plan.accumulation, plan.checkpointing) == (8, 2, False)
    assert plan.effective_batch == 16
    assert any(a["setting"] == "per_device_train_batch_size" and a["used"] == 8 for a in plan.adjustments)


def test_auto_checkpoints_only_when_nothing_fits_without():
    budget = (need(1, False) + need(16, True)) / 2  # below one row without checkpointing; 16 fit with it
    assert need(1, False) > budget >= need(16, True)
    plan = plan_batch(settings(per_device_train_batch_size="auto"), QWEN7B, gpu(free_for(budget)), ROWS, 1, UNSLOTH)
    assert (plan.micro_batch, plan.checkpointing) == (16, True)


def test_auto_keeps_the_effective_batch_across_ranks():
    plan = plan_batch(settings(per_device_train_batch_size="auto", gradient_accumulation_steps=3), QWEN7B, gpu(140),
                      ROWS, 4, UNSLOTH)
    # OpenWeights' 2 x 3 = 6 does not divide over 4 ranks: 1 per rank, said so
    assert plan.effective_batch == 4 and plan.world == 4
    assert any(a["setting"] == "gradient_accumulation_steps" for a in plan.adjustments)


def test_auto_without_a_gpu_takes_openweights_micro_batch():
    plan = plan_batch(settings(per_device_train_batch_size="auto", gradient_accumulation_steps=8), QWEN7B, CPU, ROWS,
                      1, UNSLOTH)
    assert (plan.micro_batch, plan.accumulation, plan.estimate) == (2, 8, None)


# --- rule 3: FT_GRADIENT_CHECKPOINTING ----------------------------------------------------------------------------


@pytest.mark.parametrize("fits_without", [True, False])
def test_auto_checkpointing_is_on_only_when_the_run_does_not_fit_without_it(fits_without):
    budget = need(16, False) * (1.05 if fits_without else 0.95)
    plan = plan_batch(settings(per_device_train_batch_size=16, gradient_accumulation_steps=1), QWEN7B,
                      gpu(free_for(budget)), ROWS, 1, UNSLOTH)
    assert plan.checkpointing is (not fits_without)
    assert plan.fits


@pytest.mark.parametrize("forced", [True, False])
def test_forced_checkpointing_is_obeyed(forced):
    plan = plan_batch(settings(gradient_checkpointing=forced), QWEN7B, gpu(140), ROWS, 1, UNSLOTH)
    assert plan.checkpointing is forced


# --- rule 4: nothing to measure --------------------------------------------------------------------------------------


@pytest.mark.parametrize("hardware,shape,checkpointing", [(CPU, QWEN7B, False), (gpu(80), None, True)])
def test_no_estimate_without_a_gpu_or_a_config(hardware, shape, checkpointing):
    plan = plan_batch(settings(per_device_train_batch_size=4), shape, hardware, ROWS, 1, UNSLOTH)
    assert plan.estimate is None and plan.fits and plan.micro_batch == 4
    assert plan.checkpointing is checkpointing


# --- rule 5 and the rows: the estimate is for the worst micro-batch of the real rows ----------------------------------


@pytest.mark.parametrize("packing", [False, True])
def test_packed_rows_are_padding_free_and_unpacked_rows_are_padded(packing):
    plan = plan_batch(settings(packing=packing, per_device_train_batch_size=4), QWEN7B, gpu(140), ROWS, 1, UNSLOTH)
    assert plan.padding_free is packing
    top = sorted(ROWS, reverse=True)[:4]
    drawn = [[ROWS[i] for i in order[k:k + 4]] for order in [sampler_order(len(ROWS), 3407)] for k in range(0, 32, 4)]
    tokens = max(sum(rows) if packing else 4 * max(rows) for rows in drawn)
    assert plan.batch.tokens == tokens <= (sum(top) if packing else 4 * top[0])  # the batches drawn, not any batch
    assert plan.batch.flat is packing and plan.batch.rows == 4


def sampler_order(count: int, seed: int) -> list[int]:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.integration
def test_the_plan_is_for_the_batches_the_trainer_draws(tiny_model, tmp_path):
    """The micro-batches the plan predicts (Batch.drawn) are the ones the job's own trainer draws, pass after pass:
    the same rows, in the same order, for the run's seed (accelerate's seedable sampler, data_seed = FT_SEED)."""
    from app.pipeline import setup
    from app.settings import load_settings
    from app.signals import StopRequest
    from app.trainer import build_trainer

    settings, _ = load_settings(model=str(tiny_model), training_file=str(SAMPLE / "train.jsonl"), packing=False,
                                output_dir=str(tmp_path), per_device_train_batch_size=3, seed=11, epochs=2)
    session = setup(settings)
    try:
        lengths = session.prepared.data.lengths
        loader = build_trainer(session, StopRequest()).trainer.get_train_dataloader()
        for epoch in range(2):
            loader.set_epoch(epoch)
            drawn = [batch["attention_mask"].sum(dim=1).tolist() for batch in loader]
            order = sampler_order(len(lengths), 11 + epoch)
            assert drawn == [[lengths[i] for i in order[k:k + 3]] for k in range(0, len(order), 3)], epoch
        padded = max(len(rows) * max(rows) for rows in drawn)
        assert Batch.drawn(lengths, 3, False, 11, 2).tokens >= padded
    finally:
        session.close()


def test_the_estimate_is_for_the_rows_tokenized_not_for_max_seq_length_rows():
    """The published code run (batch 16, rows of a few hundred tokens) fits a card without checkpointing where
    rows of FT_MAX_SEQ_LENGTH=2048 would not: it is never refused, and never checkpointed needlessly."""
    short, long = need(16, False), need(16, False, rows=[2048] * 32)
    assert long > 2 * short
    free = free_for((short + long) / 2)
    code = settings(per_device_train_batch_size=16, gradient_accumulation_steps=1, gradient_checkpointing=False)
    plan = plan_batch(code, QWEN7B, gpu(free), ROWS, 1, UNSLOTH)
    assert plan.fits and not plan.checkpointing
    require_fit(plan, code, QWEN7B, UNSLOTH, gpu(free), ROWS)  # no refusal
    assert not plan_batch(code, QWEN7B, gpu(free), [2048] * 32, 1, UNSLOTH).fits


def test_a_run_that_cannot_fit_is_refused_with_settings_that_would():
    code = settings(per_device_train_batch_size=16, gradient_accumulation_steps=1, gradient_checkpointing=False)
    free = free_for(need(8, False) * 1.02)  # fits with checkpointing, or with 8 rows per micro-batch
    assert need(16, True) < need(8, False) < need(16, False)
    plan = plan_batch(code, QWEN7B, gpu(free), ROWS, 1, UNSLOTH)
    assert not plan.fits
    with pytest.raises(GpuError) as err:
        require_fit(plan, code, QWEN7B, UNSLOTH, gpu(free), ROWS)
    message = err.value.message
    assert "FT_GRADIENT_CHECKPOINTING=true" in message and "FT_PER_DEVICE_TRAIN_BATCH_SIZE=" in message
    assert err.value.exit_code == 3


def test_batch_worst_takes_the_longest_rows():
    assert Batch.worst([5, 9, 3, 7], 2, flat=True) == Batch(rows=2, tokens=16, longest=9, flat=True)
    assert Batch.worst([5, 9, 3, 7], 2, flat=False) == Batch(rows=2, tokens=18, longest=9, flat=False)
    assert Batch.worst([5], 4, flat=False) == Batch(rows=1, tokens=5, longest=5, flat=False)
    assert replace(Batch.worst([4, 4], 2, True), flat=False).mask_elements == 2 * 16
    assert Batch.worst([4, 4], 2, True).mask_elements == 64


@pytest.mark.parametrize("setting,varlen,expected", [("auto", True, True), ("auto", False, False),
                                                     (True, False, True), (False, True, False)])
def test_unpacked_rows_are_padding_free_where_the_attention_takes_them(setting, varlen, expected):
    profile = replace(UNSLOTH, varlen_attention=varlen)
    plan = plan_batch(settings(padding_free=setting, per_device_train_batch_size=4), QWEN7B, gpu(140), ROWS, 1, profile)
    assert plan.padding_free is expected
    assert plan.batch.flat is expected


def test_the_drawn_batches_cover_every_pass_of_the_run_and_several_ranks_keep_the_worst():
    rows = list(range(100, 132))
    one = plan_batch(settings(per_device_train_batch_size=4), QWEN7B, gpu(140), rows, 1, UNSLOTH).batch
    assert one == Batch.drawn(rows, 4, False, 3407, 1)
    # 20 steps of 4 rows over 32 rows: three passes (seeds 3407, 3408, 3409)
    steps = plan_batch(settings(per_device_train_batch_size=4, max_steps=20), QWEN7B, gpu(140), rows, 1, UNSLOTH)
    assert steps.batch == Batch.drawn(rows, 4, False, 3407, 3) and steps.batch.tokens >= one.tokens
    two_ranks = plan_batch(settings(per_device_train_batch_size=4), QWEN7B, gpu(140), rows, 2, UNSLOTH).batch
    assert two_ranks == Batch.worst(rows, 4, False)  # accelerate shards and evens out batches over ranks
