"""GPU tests (`make test-gpu`): the unsloth and hf backends, 4-bit QLoRA, merged saves, the NVML preflight.

Skipped with a reason where CUDA is absent. Models are architecture-faithful random Qwen2s built locally
by app.devmodel (no hub). unsloth is imported first, as the job does, before transformers/peft/trl.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if CUDA:
    try:
        import unsloth  # noqa: F401  (must precede transformers, peft and trl)
    except ImportError:
        pass

from tests.conftest import ROOT, SAMPLE, read_result, run_cli, smoke_env  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (make test-gpu on a GPU host)")]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from app.devmodel import write

    return write(tmp_path_factory.mktemp("gpu-models") / "small", shape="small", device="cuda", dtype="bfloat16")


@pytest.fixture(scope="module")
def qwen05(tmp_path_factory) -> Path:
    from app.devmodel import write

    return write(tmp_path_factory.mktemp("gpu-models") / "qwen2-0.5b", shape="qwen2-0.5b", device="cuda",
                 dtype="bfloat16")


def _generate(model, tokenizer) -> torch.Tensor:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write is_even(n)."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = {k: v.to("cuda") for k, v in prompt.items()}
    with torch.no_grad():
        return model.generate(**prompt, max_new_tokens=8, do_sample=False)[:, prompt["input_ids"].shape[1]:]


@pytest.mark.parametrize("four_bit", [False, True], ids=["bf16", "4bit"])
@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_every_option_trains_saves_and_reloads(small_model, tmp_path, monkeypatch, four_bit, merge, packing):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = smoke_env(small_model, tmp_path, load_in_4bit=str(four_bit).lower(), merge_before_push=str(merge).lower(),
                    packing=str(packing).lower(), test_file=SAMPLE / "test.jsonl", optim="adamw_8bit")
    assert run_cli(monkeypatch, env, "train") == 0
    result = read_result(tmp_path)
    assert result["status"] == "completed" and result["backend"] == "unsloth"
    assert result["versions"]["unsloth"] and result["versions"]["bitsandbytes"]
    gpu = result["gpu"]
    assert gpu["name"] and gpu["uuid"].startswith(("GPU-", "MIG-")) and gpu["memory_total_gb"] > 10
    assert gpu["estimated_peak_gb"] > 0 and result["outputs"]["peak_gpu_memory_gb"] > 0
    assert result["outputs"]["tokens_per_second"] > 0 and result["adjustments"] == []
    path = Path(result["params"]["validated_params"]["finetuned_model_id"])
    assert path.name == ("merged" if merge else "adapter")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if merge:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0})
        assert not any("lora" in n for n, _ in model.named_parameters())
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.bfloat16, device_map={"": 0})
        model = PeftModel.from_pretrained(base, path)
    assert _generate(model, tokenizer).shape[1] == 8


def first_batch_loss(model: Path, tmp_path: Path, check=None, **overrides) -> float:
    """The loss of the first micro-batch of 8 sample examples (eval mode, no gradient), through setup() and the
    job's trainer; `check(session, batch)` may look at both first."""
    from app.pipeline import setup
    from app.settings import load_settings
    from app.signals import StopRequest
    from app.trainer import build_trainer

    eight = tmp_path / "eight.jsonl"  # one micro-batch of 8 examples, packed or not: the same examples
    eight.write_text("".join((SAMPLE / "train.jsonl").read_text().splitlines(keepends=True)[:8]))
    settings, _ = load_settings(model=str(model), training_file=str(eight), per_device_train_batch_size=8,
                                output_dir=str(tmp_path / "-".join(f"{k}{v}" for k, v in overrides.items())),
                                gradient_accumulation_steps=1, **overrides)
    session = setup(settings)
    try:
        trainer = build_trainer(session, StopRequest()).trainer
        batch = next(iter(trainer.get_train_dataloader()))
        if check:
            check(session, batch)
        session.model.eval()
        with torch.no_grad():
            return float(trainer.compute_loss(session.model, dict(batch)))
    finally:
        session.close()


def test_packed_loss_equals_unpacked_loss_under_unsloth(small_model, tmp_path):
    """unsloth's attention must keep packed examples apart: same loss as the padded batch (bf16 tolerance)."""
    losses = {packing: first_batch_loss(small_model, tmp_path, packing=packing, max_seq_length=2048,
                                        backend="unsloth") for packing in (False, True)}
    print(f"unsloth loss unpacked {losses[False]:.6f} packed {losses[True]:.6f}")
    assert losses[True] == pytest.approx(losses[False], rel=5e-3)


def test_varlen_kernel_equals_per_row_sdpa_forward_and_backward():
    """app.attention's FlashAttention-2 varlen call: each row attends causally to itself only (GQA, bf16), with the
    gradients of SDPA run on every row alone."""
    from app import attention

    assert attention.kernel_available()
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [37, 300, 5, 128], 28, 4, 128
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    cu, longest = attention.row_bounds(positions, total, "cuda")
    out = attention.varlen_attn(q, k, v, cu, cu, longest, longest, scale=dim ** -0.5, window_size=(-1, 0),
                                enable_gqa=True)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    rows, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        rows.append(torch.nn.functional.scaled_dot_product_attention(
            q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None], is_causal=True,
            enable_gqa=True)[0].transpose(0, 1))
        start += n
    ref = torch.cat(rows)
    want = (ref, *torch.autograd.grad(ref, (q, k, v), grad))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = (a.float() - b.float()).abs().max().item()
        print(f"varlen vs per-row SDPA {name}: max abs diff {err:.2e}")
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_hf_backend_padding_free_loss_equals_padded_loss(small_model, tmp_path):
    """FT_PADDING_FREE=true on the hf backend on CUDA flattens unpacked rows through app.attention: the loss of a
    micro-batch equals the padded one's."""
    losses = {}
    for padding_free in (False, True):
        def check(session, batch, padding_free=padding_free):
            assert session.model.config._attn_implementation == ("ft_varlen" if padding_free else "sdpa")
            assert ("attention_mask" in batch) != padding_free

        losses[padding_free] = first_batch_loss(small_model, tmp_path, check, packing=False, backend="hf",
                                                padding_free=padding_free)
    print(f"hf loss padded {losses[False]:.6f} padding-free {losses[True]:.6f}")
    assert losses[True] == pytest.approx(losses[False], rel=5e-3)


def test_unsloth_padding_free_runs_one_varlen_call_per_layer_and_equals_padded_loss(small_model, tmp_path,
                                                                                     monkeypatch):
    """On torch 2.11 unsloth gets app.attention's varlen kernel (enable_unsloth_varlen): FT_PADDING_FREE=true
    flattens unpacked rows, every layer attends them in one call, and the loss equals the padded batch's."""
    from app import attention

    calls = []
    real = attention._FlashVarlen.apply
    monkeypatch.setattr(attention._FlashVarlen, "apply", lambda *a: calls.append(a[3].numel() - 1) or real(*a))
    layers = json.loads((small_model / "config.json").read_text())["num_hidden_layers"]
    losses = {}
    for padding_free in (True, False):
        def check(session, batch, padding_free=padding_free):
            assert session.plan.padding_free == padding_free
            assert ("attention_mask" in batch) != padding_free

        calls.clear()
        losses[padding_free] = first_batch_loss(small_model, tmp_path, check, packing=False, backend="unsloth",
                                                padding_free=padding_free)
        assert calls == ([8] * layers if padding_free else []), calls  # 8 rows, one call per layer
    print(f"unsloth loss padded {losses[False]:.6f} padding-free {losses[True]:.6f}")
    assert losses[True] == pytest.approx(losses[False], rel=5e-3)


def test_nvml_device_is_the_device_torch_uses(monkeypatch):
    from app.hardware import detect_hardware

    hardware = detect_hardware()
    props = torch.cuda.get_device_properties(0)
    assert hardware.gpu.uuid.removeprefix("GPU-").removeprefix("MIG-") == str(props.uuid)
    assert hardware.bf16 == torch.cuda.is_bf16_supported()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hardware.gpu.uuid)
    assert detect_hardware().gpu.uuid == hardware.gpu.uuid


def _cli(env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "app", *args], env=full, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_qwen2_05b_through_python_m_app_train(qwen05, tmp_path):
    """The 0.5B shape end to end as users run it: a fresh `python -m app train` process (packed 2 x 2048)."""
    env = smoke_env(qwen05, tmp_path, packing="true", max_seq_length=2048, per_device_train_batch_size=2,
                    gradient_accumulation_steps=1, max_steps=3, optim="adamw_8bit")
    proc = _cli(env, "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    result = read_result(tmp_path)
    assert result["status"] == "completed" and result["backend"] == "unsloth"
    assert result["outputs"]["tokens_per_second"] > 0 and result["outputs"]["time_to_first_step_s"] > 0
    print(f"0.5B startup: {result['outputs']['startup_s']}, first step {result['outputs']['time_to_first_step_s']} s")


@pytest.mark.parametrize("four_bit", [False, True], ids=["bf16", "4bit"])
@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_qwen2_05b_estimate_within_20_percent_of_measured_peak(qwen05, tmp_path, monkeypatch, backend, four_bit):
    """Micro-batch 2 x 2048 packed, checkpointing off: the preflight estimate against
    torch.cuda.max_memory_allocated, for both backends (hf in a fresh process: this one imported unsloth)."""
    env = smoke_env(qwen05, tmp_path, packing="true", max_seq_length=2048, per_device_train_batch_size=2,
                    gradient_accumulation_steps=1, max_steps=3, load_in_4bit=str(four_bit).lower(),
                    optim="adamw_8bit", backend=backend, gradient_checkpointing="false")
    if backend == "unsloth":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # this process ran other tests before
        assert run_cli(monkeypatch, env, "train") == 0
    else:
        proc = _cli(env, "train")
        assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_result(tmp_path)
    assert result["backend"] == backend
    estimate, measured = result["gpu"]["estimated_peak_gb"], result["outputs"]["peak_gpu_memory_gb"]
    print(f"0.5B {backend} {'4bit' if four_bit else 'bf16'}: estimate {estimate:.2f} GiB, measured {measured:.2f} GiB")
    assert abs(estimate - measured) / measured <= 0.20


def test_hf_backend_4bit_merged_through_python_m_app_train(small_model, tmp_path):
    """FT_BACKEND=hf on the GPU: bitsandbytes NF4 + PEFT's k-bit preparation, packed, merged into 16-bit weights
    from the published adapter (a 4-bit base is reloaded in 16 bits); nothing half-written is left behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = smoke_env(small_model, tmp_path, backend="hf", load_in_4bit="true", merge_before_push="true",
                    packing="true", optim="adamw_8bit")
    proc = _cli(env, "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_result(tmp_path)
    assert result["status"] == "completed" and result["backend"] == "hf"
    assert "Unsloth" not in proc.stdout + proc.stderr  # the hf backend runs without importing unsloth
    assert result["outputs"]["tokens_per_second"] > 0 and result["outputs"]["peak_gpu_memory_gb"] > 0
    merged = Path(result["params"]["validated_params"]["finetuned_model_id"])
    assert merged.name == "merged" and (merged.parent / "adapter" / "adapter_config.json").is_file()
    assert not [p.name for p in merged.parent.iterdir() if ".tmp" in p.name]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16, device_map={"": 0})
    assert not any("lora" in n for n, _ in model.named_parameters())
    config = json.loads((merged / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"  # 16-bit weights, not NF4
    assert "quantization_config" not in config
    assert _generate(model, AutoTokenizer.from_pretrained(merged)).shape[1] == 8


def test_a_run_that_cannot_fit_is_refused_before_loading(qwen05, tmp_path, monkeypatch, capfd):
    env = smoke_env(qwen05, tmp_path, packing="true", max_seq_length=4096, per_device_train_batch_size=4096,
                    gradient_accumulation_steps=1)
    assert run_cli(monkeypatch, env, "train") == 3
    result = read_result(tmp_path)
    assert result["status"] == "failed" and result["error"]["exit_code"] == 3
    message = result["error"]["message"]
    assert "FT_PER_DEVICE_TRAIN_BATCH_SIZE=" in message and "Loading weights" not in capfd.readouterr().err
    suggestion = message.split("FT_PER_DEVICE_TRAIN_BATCH_SIZE=")[1].split()[0]
    assert run_cli(monkeypatch, {**env, "FT_PER_DEVICE_TRAIN_BATCH_SIZE": suggestion}, "check") == 0
    summary = json.loads(capfd.readouterr().out)  # stdout is check's JSON alone (unsloth's banners go to stderr)
    assert 0 < summary["estimated_peak_gpu_memory_gb"] <= summary["gpu"]["memory_free_gb"]


def test_sigterm_then_rerun_under_unsloth_continues_the_uninterrupted_run(small_model, tmp_path):
    """Preemption on the GPU path: SIGTERM mid-run -> checkpoint + exit 75; the rerun resumes from it (unsloth's
    patched trainer, 8-bit Adam state, CUDA RNG for dropout) and ends where an uninterrupted run ends."""
    from safetensors.torch import load_file

    from tests.test_resume import GRACE_S, RESUME, Job, _assert_checkpoint_is_resumable, _job_dir

    def env(output: Path) -> dict[str, str]:
        return smoke_env(small_model, output, optim="adamw_8bit", **RESUME)

    offline = {"HF_HUB_OFFLINE": "1"}
    reference = tmp_path / "reference"
    job = Job(env(reference), tmp_path / "reference.log", offline)
    assert job.wait(600) == 0, job.text()[-3000:]

    output = tmp_path / "preempted"
    job = Job(env(output), tmp_path / "first.log", offline)
    job.wait_for(lambda: any(s >= 6 for s in job.logged_steps()), "step 6", timeout=300)
    job.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert job.wait(GRACE_S) == 75, job.text()[-3000:]
    assert time.monotonic() - signalled < GRACE_S
    result = read_result(output)
    step = result["outputs"]["global_step"]
    assert result["status"] == "interrupted" and 6 <= step < RESUME["max_steps"]
    _assert_checkpoint_is_resumable(_job_dir(output) / "checkpoints" / f"checkpoint-{step}", step)

    job = Job(env(output), tmp_path / "rerun.log", offline)
    assert job.wait(600) == 0, job.text()[-3000:]
    assert f"from checkpoint-{step} (step {step})" in job.text()
    result, want = read_result(output), read_result(reference)
    assert result["status"] == "completed" and result["backend"] == "unsloth"
    assert result["outputs"]["global_step"] == want["outputs"]["global_step"] == RESUME["max_steps"]
    assert result["outputs"]["train_tokens"] == want["outputs"]["train_tokens"]
    assert result["outputs"]["train_loss"] == pytest.approx(want["outputs"]["train_loss"], rel=2e-3)
    assert job.logged_steps() == list(range(1, RESUME["max_steps"] + 1)), "each step logged exactly once"
    # LoRA B starts at zero, so it is all training: a lost optimizer state, a repeated or skipped step or another
    # data order moves it by several percent; GPU kernels' run-to-run noise by far less.
    got = load_file(_job_dir(output) / "adapter" / "adapter_model.safetensors")
    ref = load_file(_job_dir(reference) / "adapter" / "adapter_model.safetensors")
    b = [k for k in ref if "lora_B" in k]
    assert b and got.keys() == ref.keys()
    diff = torch.cat([(got[k].float() - ref[k].float()).flatten() for k in b]).norm()
    size = torch.cat([ref[k].float().flatten() for k in b]).norm()
    print(f"unsloth resume: checkpoint-{step}, lora_B relative difference {float(diff / size):.2e}")
    assert diff <= 0.02 * size


def test_a_sweep_on_one_gpu_trains_in_a_worker_what_standalone_runs_train(small_model, tmp_path):
    """`python -m app sweep` on one GPU: the lines run in one worker process pinned to it, on one base model; each
    line's adapter equals its standalone `python -m app train` twin's within the GPU's run-to-run noise."""
    from safetensors.torch import load_file

    lines = [{"seed": 1, "job_id_suffix": "s1"}, {"seed": 2, "r": 4, "lora_alpha": 8, "job_id_suffix": "s2"}]
    grid = tmp_path / "grid.jsonl"
    grid.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = smoke_env(small_model, tmp_path / "sweep", max_steps=6)
    proc = _cli(env, "sweep", str(grid))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker 0: pid" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["counts"] == {"completed": 2} and summary["base_loads"] == 1 and summary["workers"] == 1
    for index, entry in enumerate(summary["lines"]):
        alone = _cli({**smoke_env(small_model, tmp_path / "alone", max_steps=6), "FT_CONFIG_FILE": str(grid),
                      "FT_CONFIG_INDEX": str(index)}, "train")
        assert alone.returncode == 0, alone.stderr[-3000:]
        job = entry["job_id"]
        want = read_result(tmp_path / "alone" / job)  # the same job id: the same job
        got = read_result(tmp_path / "sweep" / job)
        assert got["backend"] == want["backend"] == "unsloth"
        assert got["outputs"]["train_loss"] == pytest.approx(want["outputs"]["train_loss"], rel=2e-3)
        a = load_file(tmp_path / "sweep" / job / "adapter" / "adapter_model.safetensors")
        b = load_file(tmp_path / "alone" / job / "adapter" / "adapter_model.safetensors")
        keys = [k for k in b if "lora_B" in k]
        assert keys and a.keys() == b.keys()
        diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in keys]).norm()
        size = torch.cat([b[k].float().flatten() for k in keys]).norm()
        print(f"sweep line {index} vs standalone: loss {got['outputs']['train_loss']:.6f} vs "
              f"{want['outputs']['train_loss']:.6f}, lora_B relative difference {float(diff / size):.2e}")
        assert diff <= 0.02 * size
