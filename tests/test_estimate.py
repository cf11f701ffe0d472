"""The preflight's memory estimate (app/memory.py, the backends' profiles) against peaks measured on a GPU.

tests/memory_measurements.jsonl holds the peaks (torch.cuda.max_memory_allocated) measured on the lent H100s and
H200s since 2026-11-25, packed rows and unpacked ones (padded or flattened, with the run's worst micro-batch), each
with where it came from: the memory probes of both backends, the GPU tests, the benchmark, e2e and sweep tables
(docs/BENCHMARKS.md, "Memory estimate", which also lists the peaks left out and why). The estimate is computed
here from the same architecture (app.devmodel's shapes) without a GPU, so a change to the coefficients that stops
matching what the card measured fails on every machine, not only on the next GPU session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.backends import backend_class
from app.devmodel import SHAPES
from app.hardware import GpuInfo, Hardware
from app.memory import Batch, Shape, Workload, estimate_peak
from app.plan import HEADROOM, plan_batch
from app.settings import load_settings

MEASUREMENTS = [json.loads(line) for line in (Path(__file__).parent / "memory_measurements.jsonl").open()]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
H100_FREE_GIB = 79.2  # what NVML reported free on the lent H100


def shape(name: str) -> Shape:
    return Shape.from_config({**SHAPES[name], "model_type": "qwen2"})


def profile(backend: str):
    return backend_class(backend).memory


def work(micro_batch: int, seq: int, packed: bool = True, mode: str = "bf16", checkpointing: bool = False,
         batch: dict | None = None, r: int = 16) -> Workload:
    """Rows of `seq` tokens, `micro_batch` of them (packed rows are flat, padding-free), or the measured run's
    own worst micro-batch of real rows (`batch`, app.memory.Batch's fields)."""
    batch = Batch(**batch) if batch else Batch(rows=micro_batch, tokens=micro_batch * seq, longest=seq, flat=packed)
    return Workload(batch=batch, load_in_4bit=mode == "4bit", r=r, target_modules=PROJECTIONS, optimizer_8bit=True,
                    checkpointing=checkpointing)


def plan(m: dict) -> Workload:
    return work(m["micro_batch"], m["seq"], m["packed"], m["mode"], m["checkpointing"], m.get("batch"), m.get("r", 16))


def _id(m: dict) -> str:
    return f"{m['backend']}-{m['shape']}-{m['mode']}-mb{m['micro_batch']}x{m['seq']}-{'ckpt' if m['checkpointing'] else 'nockpt'}"


@pytest.mark.parametrize("m", MEASUREMENTS, ids=[_id(m) for m in MEASUREMENTS])
def test_estimate_matches_the_measured_peak(m):
    """Within -8%/+15% everywhere (a small overestimate is the safe side), within 6% on the 7B shape."""
    estimate = estimate_peak(shape(m["shape"]), profile(m["backend"]), plan(m)).total_gb
    error = (estimate - m["measured_gib"]) / m["measured_gib"]
    low, high = (-0.06, 0.06) if m["shape"] == "qwen2-7b" else (-0.08, 0.15)
    assert low <= error <= high, f"estimate {estimate:.2f} GiB vs measured {m['measured_gib']} ({error:+.1%}; {m['source']})"


def test_the_hf_run_that_ran_out_of_memory_is_not_planned_again(tmp_path):
    """7B 4-bit, hf backend, effective batch 8 on a free H100: with the old structural coefficients 'auto'
    chose micro-batch 4 without checkpointing (estimate 46 GiB) and the run hit CUDA OOM (2026-11-25 12:28
    UTC). Now that plan must not fit, and 'auto' must pick micro-batch 2, measured at 48.1 GiB."""
    qwen7b = shape("qwen2-7b")
    oom = work(4, 2048, mode="4bit")
    assert estimate_peak(qwen7b, profile("hf"), oom).total_gb > H100_FREE_GIB
    gpu = GpuInfo(name="H100", uuid="GPU-x", index=0, memory_total_gb=79.6, memory_free_gb=H100_FREE_GIB,
                  compute_capability="9.0", bf16=True)
    settings, _ = load_settings(model="m", training_file="t.jsonl", output_dir=str(tmp_path), load_in_4bit=True,
                                per_device_train_batch_size="auto", gradient_accumulation_steps=4, packing=True)
    hardware = Hardware(cuda=True, gpu=gpu, bf16=True, num_gpus=1, bitsandbytes=True)
    planned = plan_batch(settings, qwen7b, hardware, [2048] * 64, 1, profile("hf"))
    assert (planned.micro_batch, planned.checkpointing) == (2, False)
    assert estimate_peak(qwen7b, profile("hf"), work(2, 2048, mode="4bit")).total_gb <= H100_FREE_GIB * HEADROOM


def test_packing_costs_the_hf_backend_a_mask_quadratic_in_the_micro_batch():
    """Padding-free packing gives SDPA one block-diagonal mask over the whole flattened micro-batch:
    doubling the micro-batch more than doubles the activations; unsloth's varlen attention has no such term."""
    qwen05 = shape("qwen2-0.5b")
    hf = [estimate_peak(qwen05, profile("hf"), work(b, 2048)).activations_gb for b in (2, 4)]
    fast = [estimate_peak(qwen05, profile("unsloth"), work(b, 2048)).activations_gb for b in (2, 4)]
    assert hf[1] > 2.05 * hf[0]
    assert fast[1] == pytest.approx(2 * fast[0])
