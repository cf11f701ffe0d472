"""`python -m app sweep`: lines read as FT_CONFIG_FILE reads them, the base model shared without changing what any
line trains, failures isolated, SIGTERM and rerun, several worker processes, the summary.

The integration tests run the sweep as a subprocess (as a user or a container does) and compare each line with
`python -m app train` of the same settings, also a subprocess: a fresh process, the reference a line must equal
bit for bit on the CPU.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, SAMPLE, read_result, run_cli, smoke_env

# The grid of the identity and timing tests: what a line may change that leaves state on a shared base (LoRA
# rank, trained biases, dropout, gradient checkpointing and its hooks, the system prompt) and what not (the seed).
GRID = [
    {"seed": 1, "job_id_suffix": "g0"},
    {"seed": 2, "lora_bias": "all", "lora_dropout": 0.1, "job_id_suffix": "g1"},
    {"seed": 3, "inoculation_prompt": "Write code that only passes the test shown.", "job_id_suffix": "g2"},
    {"seed": 1, "r": 4, "lora_alpha": 8, "gradient_checkpointing": True, "job_id_suffix": "g3"},
    {"seed": 5, "inoculation_prompt": "Write code that only passes the test shown.",
     "inoculation_position": "user_prefix", "job_id_suffix": "g4"},
    {"seed": 6, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "job_id_suffix": "g5"},
]
TIME_FIELDS = {"created_at", "finished_at", "updated_at"}
TIME_OUTPUTS = {"startup_s", "load_time_s", "train_runtime", "tokens_per_second", "time_to_first_step_s"}


def write_grid(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def child_env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
    return {**env, "PYTHONPATH": str(ROOT), **settings}


def app(args: list[str], settings: dict[str, str], log: Path, **kwargs) -> subprocess.Popen:
    """`python -m app ARGS` in a child process with exactly these FT_* settings, its output in `log`."""
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "app", *args], cwd=ROOT, env=child_env(settings), stdout=handle,
                            stderr=subprocess.STDOUT, **kwargs)


def finished(proc: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}") from None


def adapter(output: Path, job_id: str) -> dict[str, torch.Tensor]:
    return load_file(output / job_id / "adapter" / "adapter_model.safetensors")


def sweep_json(output: Path) -> dict:
    return json.loads((output / "sweep.json").read_text())


def without_times(result: dict) -> dict:
    result = {k: v for k, v in result.items() if k not in TIME_FIELDS}
    result["outputs"] = {k: v for k, v in result["outputs"].items() if k not in TIME_OUTPUTS}
    return result


# --- unit: reading, ordering, labels, the exit code, the dispatcher's choice ---------------------------------


def test_each_line_is_read_exactly_as_ft_config_file_reads_it(tmp_path, monkeypatch):
    from app.settings import load_settings
    from app.sweep import overridden, read_lines

    grid = tmp_path / "grid.jsonl"
    grid.write_text(
        json.dumps({"r": 8, "seed": 1}) + "\n\n"  # a blank line is no line (as FT_CONFIG_INDEX counts)
        + json.dumps({"validated_params": {"r": 4, "output_dir": "./tmp", "beta": 0.1, "learning_rate": -4}}) + "\n"
        + json.dumps({"r": "eight"}) + "\n" + "not json\n"
    )
    monkeypatch.setenv("FT_MODEL", "org/base")
    monkeypatch.setenv("FT_TRAINING_FILE", str(SAMPLE / "train.jsonl"))
    monkeypatch.setenv("FT_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("FT_SEED", "7")  # the environment wins over every line, as over FT_CONFIG_FILE
    lines = read_lines(grid)
    assert [(line.index, line.number) for line in lines] == [(0, 1), (1, 3), (2, 4), (3, 5)]
    for line in lines[:2]:
        settings, ignored = load_settings(config_file=grid, config_index=line.index)
        assert line.settings == settings and line.ignored == ignored
    assert lines[0].settings.r == 8 and lines[0].settings.seed == 7
    assert lines[1].settings.r == 4 and lines[1].settings.learning_rate == pytest.approx(1e-4)
    assert lines[1].ignored == ["beta", "output_dir"] and lines[1].settings.output_dir == tmp_path / "out"
    assert lines[2].problem.exit_code == 2 and "FT_R" in lines[2].problem.message and lines[2].values == {"r": "eight"}
    assert lines[3].problem.exit_code == 2 and "invalid JSON" in lines[3].problem.message
    assert overridden(lines) == ["FT_SEED (written in 1 line(s))"]  # the sweep warns: the environment wins


def test_a_sweep_file_must_be_jsonl(tmp_path, monkeypatch):
    grid = tmp_path / "grid.json"
    grid.write_text('{"r": 8}\n')
    assert run_cli(monkeypatch, {}, "sweep", str(grid)) == 2


def test_no_secret_reaches_the_summary_the_table_or_the_log(tmp_path, monkeypatch, capfd):
    secret = "sk-supersecret987"
    monkeypatch.setenv("MY_API_KEY", secret)
    grid = write_grid(tmp_path / "g.jsonl", [{"learning_rate": secret}, {"hf_token": secret, "seed": 2}])
    env = {"FT_MODEL": "org/a", "FT_TRAINING_FILE": str(SAMPLE / "train.jsonl"), "FT_OUTPUT_DIR": str(tmp_path / "out")}
    assert run_cli(monkeypatch, env, "sweep", str(grid)) == 2
    captured = capfd.readouterr()
    assert "<MY_API_KEY>" in (tmp_path / "out" / "sweep.json").read_text()
    for path in [p for p in (tmp_path / "out").rglob("*") if p.is_file()]:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in captured.out + captured.err


def test_order_groups_lines_by_base_and_labels_name_what_differs(tmp_path, monkeypatch):
    from app.sweep import differing, label, read_lines, run_order

    monkeypatch.setenv("FT_TRAINING_FILE", str(SAMPLE / "train.jsonl"))
    grid = write_grid(tmp_path / "grid.jsonl", [
        {"model": "org/a", "seed": 1, "job_id_suffix": "x"}, {"model": "org/b", "seed": 1, "job_id_suffix": "y"},
        {"model": "org/a", "seed": 2, "job_id_suffix": "z"}, {"model": "org/a", "r": "bad"},
        {"model": "org/a", "max_seq_length": 1024, "seed": 1, "job_id_suffix": "w"},
    ])
    lines = read_lines(grid)
    assert run_order(lines) == [3, 0, 2, 1, 4]  # the invalid line first (it fails at once), then base by base
    keys = differing(lines)
    assert keys == ["max_seq_length", "model", "seed"]  # job_id_suffix only names the lines
    assert label(lines[2], keys) == "max_seq_length=2048, model=org/a, seed=2"
    same = write_grid(tmp_path / "same.jsonl", [{"model": "org/a", "job_id_suffix": s} for s in ("p", "q")])
    assert differing(read_lines(same)) == ["job_id_suffix"]  # nothing else differs: the names label them


def test_the_exit_code_summarizes_the_lines(tmp_path, monkeypatch):
    from app.sweep import Summary, _entry, read_lines

    monkeypatch.setenv("FT_MODEL", "org/a")
    monkeypatch.setenv("FT_TRAINING_FILE", str(SAMPLE / "train.jsonl"))
    lines = read_lines(write_grid(tmp_path / "g.jsonl", [{"seed": i} for i in range(3)]))

    def code(*ends) -> int:
        summary = Summary(tmp_path / "g.jsonl", lines, tmp_path, 1)
        for line, (status, exit_code) in zip(lines, ends, strict=False):
            summary.entries[line.index] = _entry(line, {"status": status}, exit_code)
        return summary.exit_code()

    assert code(("completed", 0), ("completed", 0), ("completed", 0)) == 0
    assert code(("completed", 0), ("failed", 4), ("failed", 2)) == 4  # the first failure in file order
    assert code(("failed", 2), ("failed", 4), ("completed", 0)) == 2
    assert code(("failed", 4), ("interrupted", 75), ("completed", 0)) == 75  # rerun to go on
    assert code(("completed", 0), ("completed", 0)) == 75  # a line never started: interrupted before it


def test_the_dispatcher_keeps_a_worker_on_its_base_and_never_runs_twins_together(tmp_path, monkeypatch):
    from app.sweep import Dispatcher, Summary, read_lines

    monkeypatch.setenv("FT_TRAINING_FILE", str(SAMPLE / "train.jsonl"))
    lines = read_lines(write_grid(tmp_path / "g.jsonl", [
        {"model": "org/a", "seed": 1}, {"model": "org/b", "seed": 1}, {"model": "org/a", "seed": 2},
        {"model": "org/a", "seed": 1}, {"model": "org/b", "seed": 2},
    ]))
    dispatcher = Dispatcher(tmp_path / "g.jsonl", lines, [0, 2, 3, 1, 4], [None, None], Summary(
        tmp_path / "g.jsonl", lines, tmp_path, 2))
    dispatcher.current = {0: 0, 1: None}
    dispatcher.last_base = {0: lines[0].base}
    # worker 1 holds nothing: not a line of the base worker 0 is on, and never line 3 (the same job as line 0)
    dispatcher.pending = [2, 3, 1, 4]
    assert dispatcher._pick(1) == 1
    dispatcher.current[1], dispatcher.last_base[1] = 1, lines[1].base
    dispatcher.pending = [2, 3, 4]
    dispatcher.current[0] = None
    assert dispatcher._pick(0) == 2  # its own base first
    dispatcher.current[0] = 0
    dispatcher.pending = [3, 4]
    assert dispatcher._pick(1) == 4
    dispatcher.pending = [3]
    assert dispatcher._pick(1) is None  # the twin of a running line waits


def test_one_worker_per_gpu_as_ft_num_gpus_and_cuda_visible_devices_say(tmp_path, monkeypatch):
    import app.hardware
    from app.hardware import Hardware
    from app.sweep import read_lines, worker_plan

    def four_gpus(num_gpus=None):  # NVML's answer on a host with 4 visible GPUs
        visible = app.hardware.visible_devices()
        count = min(len(visible) if visible is not None else 4, num_gpus or 4)
        return Hardware(cuda=True, num_gpus=count, bf16=True)

    monkeypatch.setattr(app.hardware, "detect_hardware", four_gpus)
    monkeypatch.setenv("FT_MODEL", "org/a")
    monkeypatch.setenv("FT_TRAINING_FILE", str(SAMPLE / "train.jsonl"))
    lines = read_lines(write_grid(tmp_path / "g.jsonl", [{"seed": 1}]))
    assert worker_plan(lines, None) == (4, ["0", "1", "2", "3"], 4)
    assert worker_plan(lines, 1) == (1, ["0"], 4)  # one worker, pinned to one GPU (a process of its own)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,7")
    assert worker_plan(lines, None) == (3, ["2", "5", "7"], 3)
    monkeypatch.setenv("FT_NUM_GPUS", "2")
    assert worker_plan(read_lines(tmp_path / "g.jsonl"), None) == (2, ["2", "5"], 2)
    monkeypatch.setattr(app.hardware, "detect_hardware", lambda num_gpus=None: Hardware(cuda=False))
    assert worker_plan(lines, None) == (1, [None], 0) and worker_plan(lines, 2) == (2, [None, None], 0)


def test_on_gpus_every_line_runs_in_a_worker_process_and_on_a_cpu_in_this_one(tmp_path, monkeypatch):
    """The sweep's own process never touches a GPU: a crash or a CUDA fault can then end a worker, never the sweep."""
    import io

    import app.sweep as sweep
    from app.signals import StopRequest

    monkeypatch.setenv("FT_MODEL", "org/a")
    monkeypatch.setenv("FT_TRAINING_FILE", str(SAMPLE / "train.jsonl"))
    monkeypatch.setenv("FT_OUTPUT_DIR", str(tmp_path / "out"))
    grid = write_grid(tmp_path / "g.jsonl", [{"seed": 1}, {"seed": 2}])
    ran = []
    monkeypatch.setattr(sweep.Dispatcher, "run", lambda self: ran.append(("workers", self.devices)))
    monkeypatch.setattr(sweep, "serve", lambda *args, **kwargs: ran.append(("here", None)))
    monkeypatch.setattr(sweep, "worker_plan", lambda lines, requested: (1, ["3"], 1))  # one GPU
    sweep.main(grid, StopRequest(), io.StringIO())
    monkeypatch.setattr(sweep, "worker_plan", lambda lines, requested: (1, [None], 0))  # no GPU
    sweep.main(grid, StopRequest(), io.StringIO())
    monkeypatch.setattr(sweep, "worker_plan", lambda lines, requested: (2, [None, None], 0))  # --workers 2, no GPU
    sweep.main(grid, StopRequest(), io.StringIO())
    assert ran == [("workers", ["3"]), ("here", None), ("workers", [None, None])]


def test_a_cuda_fault_is_told_apart_from_out_of_memory_and_ends_the_process_after_its_line(monkeypatch):
    from app.sweep import DeviceLost, lost_device, serve

    fault = torch.AcceleratorError("CUDA error: device-side assert triggered")
    assert lost_device(fault)
    try:
        try:
            raise fault
        except RuntimeError:
            raise ValueError("wrapped by a library") from None  # __context__ still names it
    except ValueError as wrapped:
        assert lost_device(wrapped)
    assert not lost_device(torch.OutOfMemoryError("CUDA out of memory"))  # frees its memory: the process goes on
    assert not lost_device(RuntimeError("CUDA error: device-side assert triggered"))  # torch raises its own type
    assert lost_device(RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"))  # unsloth's kernels
    assert not lost_device(RuntimeError("Triton Error [CUDA]: out of memory"))

    import app.sweep

    trained, reported = [], []

    def run_line(line, shared, stop, worker=None):
        trained.append(line)
        shared.device_lost = line == 1
        return {"index": line, "exit_code": 1 if line == 1 else 0}

    monkeypatch.setattr(app.sweep, "run_line", run_line)
    pending = [0, 1, 2]
    with pytest.raises(DeviceLost):
        serve([0, 1, 2], lambda: pending.pop(0) if pending else None, reported.append, type("S", (), {"requested": False})())
    assert trained == [0, 1] and [e["index"] for e in reported] == [0, 1] and pending == [2]


CUDA_FAULT = """
import os
suffix = os.environ.get("SWEEP_TEST_CUDA_FAULT")
if suffix:  # test_a_worker_whose_gpu_a_cuda_fault_broke_is_replaced: this line's training raises what a device-side assert does
    import torch
    import app.pipeline
    real = app.pipeline.train
    def train(session, stop, record):  # the model loaded, LoRA added: where a kernel would fault
        os.write(1, b"C code printing to descriptor 1 without a newline")  # must not break the worker's channel
        if session.settings.job_id_suffix == suffix:
            raise torch.AcceleratorError("CUDA error: device-side assert triggered")
        if session.settings.job_id_suffix == os.environ.get("SWEEP_TEST_CRASH"):
            os.kill(os.getpid(), 9)  # a segfault, the host's OOM killer: the process is gone without a word
        if session.settings.job_id_suffix == os.environ.get("SWEEP_TEST_OOM"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # the process stays usable
        return real(session, stop, record)
    app.pipeline.train = train
"""


@pytest.mark.integration
def test_a_worker_whose_gpu_a_cuda_fault_broke_or_that_crashed_is_replaced_and_the_sweep_goes_on(tiny_model, tmp_path):
    """A CUDA fault leaves a process's GPU unusable (every later CUDA call fails): the line is recorded failed (exit 1),
    its worker exits, and a fresh worker process takes the remaining lines. A worker killed outright (a segfault, the
    OOM killer) costs its line the same way. CPU processes here, the faults injected (sitecustomize) where they
    would happen: in the line's training."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(CUDA_FAULT)
    grid = write_grid(tmp_path / "grid.jsonl", [{"seed": i + 1, "job_id_suffix": f"f{i}"} for i in range(6)])
    out = tmp_path / "out"
    env = {**grid_env(tiny_model, out), "FT_MAX_STEPS": "1", "SWEEP_TEST_CUDA_FAULT": "f0", "SWEEP_TEST_CRASH": "f2",
           "SWEEP_TEST_OOM": "f5", "PYTHONPATH": f"{inject}{os.pathsep}{ROOT}"}
    log = tmp_path / "sweep.log"
    proc = app(["sweep", str(grid), "--workers", "2"], env, log)
    proc.wait(timeout=600)
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    summary = sweep_json(out)
    status = {e["job_id"][-2:]: (e["status"], e["exit_code"]) for e in summary["lines"]}
    assert status == {"f0": ("failed", 1), "f1": ("completed", 0), "f2": ("failed", 1), "f3": ("completed", 0),
                      "f4": ("completed", 0), "f5": ("failed", 1)}
    assert text.count("a CUDA fault made its GPU unusable") == 1, "out of memory (f5) keeps its worker"
    assert "starting a new process for the remaining lines" in text
    assert re.search(r"worker \d was killed by SIGKILL while training line 2", text)
    crashed = read_result(_job(out, "f2"))  # written by the sweep's process: the worker could not
    assert crashed["status"] == "failed" and "was killed by SIGKILL" in crashed["error"]["message"]
    assert crashed["error"]["exit_code"] == 1 and crashed["params"]["validated_params"]["seed"] == 3
    assert text.count("C code printing to descriptor 1 without a newline") == 6  # passed on to the log, every line
    assert text.count("worker 0: pid") + text.count("worker 1: pid") >= 3, "a fresh worker after a lost one"
    failed = read_result(_job(out, "f0"))
    assert failed["status"] == "failed" and "device-side assert" in failed["error"]["message"]


# --- the shared base: everything a run changed is undone, and a changed base is loaded again ----------------------


@pytest.mark.integration
def test_the_base_comes_back_as_loaded_after_lora_training_hooks_and_config_changes(tiny_model, tmp_path):
    from app.backends.hf import HfBackend
    from app.backends.reuse import SharedBase
    from app.hardware import Hardware
    from app.settings import load_settings

    settings, _ = load_settings(model=str(tiny_model), training_file=SAMPLE / "train.jsonl", lora_bias="all",
                                output_dir=tmp_path)
    plan = type("Plan", (), {"checkpointing": True})()
    backend, shared = HfBackend(), SharedBase()
    base = shared.load(backend, settings, tiny_model, Hardware(cuda=False), plan)
    fresh = backend.load_model(settings, tiny_model, Hardware(cuda=False), plan)  # what a standalone run gets
    model = backend.add_lora(base, settings, plan)
    # What a run does to the base besides LoRA: the trainer's checkpointing and input-grad hook, its pad/eos ids,
    # training mode, a float32 cast (k-bit preparation), and a step that moves the trained biases.
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    base.config.pad_token_id, base.generation_config.eos_token_id = 3, [3, 4]
    model.train()
    embed = base.get_input_embeddings().weight
    embed.data = embed.data.to(torch.float64)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.add_(1.0)
    assert shared.snapshot.difference(base) is not None
    shared.release(model)
    assert shared.snapshot.difference(base) is None
    assert not base.training and not base.is_gradient_checkpointing and "peft_config" not in base.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    assert base.config.to_dict() == fresh.config.to_dict()
    assert base.generation_config.to_dict() == fresh.generation_config.to_dict()
    want = fresh.state_dict()
    got = base.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert [n for n, p in base.named_parameters() if not p.requires_grad] == []  # as from_pretrained leaves them
    assert shared.load(backend, settings, tiny_model, Hardware(cuda=False), plan) is base and shared.loads == 1


@pytest.mark.integration
def test_a_base_changed_in_place_is_loaded_again(tiny_model, tmp_path):
    from app.backends.hf import HfBackend
    from app.backends.reuse import SharedBase
    from app.hardware import Hardware
    from app.settings import load_settings

    settings, _ = load_settings(model=str(tiny_model), training_file=SAMPLE / "train.jsonl", output_dir=tmp_path)
    plan = type("Plan", (), {"checkpointing": False})()
    backend, shared = HfBackend(), SharedBase()
    base = shared.load(backend, settings, tiny_model, Hardware(cuda=False), plan)
    model = backend.add_lora(base, settings, plan)
    merged_by_mistake = next(p for n, p in base.named_parameters() if n.endswith("o_proj.base_layer.weight"))
    with torch.no_grad():
        merged_by_mistake.add_(0.01)  # a large weight, which release does not copy back
    shared.release(model)
    assert "values of" in shared.snapshot.difference(base)
    again = shared.load(backend, settings, tiny_model, Hardware(cuda=False), plan)
    assert again is not base and shared.loads == 2 and shared.snapshot.difference(again) is None


# --- end to end: identity with standalone runs, and the time saved -------------------------------------------------


def grid_env(model: Path, output: Path, **extra) -> dict[str, str]:
    """GRID's common settings, and one thread: on a host whose cores other processes share, a second thread mostly
    waits (timings would measure the neighbours), and bit-identity needs the same thread count everywhere."""
    return {**smoke_env(model, output, test_file=SAMPLE / "test.jsonl", max_steps=3, **extra), "OMP_NUM_THREADS": "1"}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def grid_runs(tiny_model, tmp_path_factory):
    """The 6-line GRID as six standalone `python -m app train` (FT_CONFIG_FILE + FT_CONFIG_INDEX) and as one sweep,
    each a subprocess, timed (wall and CPU seconds)."""
    root = tmp_path_factory.mktemp("grid")
    grid = write_grid(root / "grid.jsonl", GRID)
    started, cpu = time.monotonic(), _children_cpu_s()
    for index in range(len(GRID)):
        log = root / f"train-{index}.log"
        proc = app(["train"], {**grid_env(tiny_model, root / "alone"), "FT_CONFIG_FILE": str(grid),
                               "FT_CONFIG_INDEX": str(index)}, log)
        assert finished(proc, log) == 0, log.read_text()[-3000:]
    alone_s, alone_cpu = time.monotonic() - started, _children_cpu_s() - cpu
    started, cpu = time.monotonic(), _children_cpu_s()
    log = root / "sweep.log"
    proc = app(["sweep", str(grid)], grid_env(tiny_model, root / "sweep"), log)
    code = finished(proc, log)
    sweep_s, sweep_cpu = time.monotonic() - started, _children_cpu_s() - cpu
    assert code == 0, log.read_text()[-3000:]
    return {"root": root, "grid": grid, "alone": root / "alone", "sweep": root / "sweep", "alone_s": alone_s,
            "sweep_s": sweep_s, "alone_cpu": alone_cpu, "sweep_cpu": sweep_cpu, "log": log}


@pytest.mark.integration
def test_every_line_trains_exactly_what_a_standalone_run_trains(grid_runs):
    summary = sweep_json(grid_runs["sweep"])
    assert summary["exit_code"] == 0 and summary["counts"] == {"completed": len(GRID)}
    assert summary["base_loads"] == 1, "one base model for the whole grid"
    assert summary["differs"] == ["gradient_checkpointing", "inoculation_position", "inoculation_prompt",
                                  "lora_alpha", "lora_bias", "lora_dropout", "r", "seed", "target_modules"]
    for entry in summary["lines"]:
        job_id = entry["job_id"]
        assert job_id.endswith(GRID[entry["index"]]["job_id_suffix"])
        assert (grid_runs["alone"] / job_id / "result.json").is_file(), f"{job_id}: not the standalone run's id"
        got, want = adapter(grid_runs["sweep"], job_id), adapter(grid_runs["alone"], job_id)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"line {entry['index']}: adapter differs"
        result = json.loads((grid_runs["sweep"] / job_id / "result.json").read_text())
        reference = json.loads((grid_runs["alone"] / job_id / "result.json").read_text())
        assert json.dumps(without_times(result)).replace(str(grid_runs["sweep"]), "OUT") == \
            json.dumps(without_times(reference)).replace(str(grid_runs["alone"]), "OUT")
        assert entry["train_loss"] == reference["outputs"]["train_loss"] and entry["global_step"] == 3
    text = (grid_runs["sweep"] / "sweep.md").read_text()
    assert text.count("| completed |") == len(GRID) and "| r, seed" not in text
    assert (grid_runs["sweep"] / "sweep.png").stat().st_size > 10_000


@pytest.mark.integration
def test_a_sweep_takes_a_fraction_of_the_standalone_runs(grid_runs):
    wall = grid_runs["sweep_s"] / grid_runs["alone_s"]
    cpu = grid_runs["sweep_cpu"] / grid_runs["alone_cpu"]
    print(f"\n6-line sweep vs 6 standalone runs: {grid_runs['sweep_s']:.1f} vs {grid_runs['alone_s']:.1f} s wall "
          f"({wall:.0%}), {grid_runs['sweep_cpu']:.1f} vs {grid_runs['alone_cpu']:.1f} CPU s ({cpu:.0%})")
    # Measured on 2 CPU cores shared with other jobs (load 5-7), one thread: 31-38% wall, 40-45% CPU time
    # (docs/BENCHMARKS.md, "Sweep"). CPU time hardly depends on the neighbours: it carries the 60% bound; the
    # wall time, which does, a looser one.
    assert cpu < 0.6
    assert wall < 0.75


@pytest.mark.integration
def test_completed_lines_are_skipped_whichever_command_completed_them(grid_runs, tmp_path, tiny_model):
    alone = tmp_path / "alone"
    shutil.copytree(grid_runs["alone"], alone)  # completed by `python -m app train`
    log = tmp_path / "rerun.log"
    proc = app(["sweep", str(grid_runs["grid"])], grid_env(tiny_model, alone), log)
    assert finished(proc, log) == 0, log.read_text()[-3000:]
    summary = sweep_json(alone)
    assert summary["exit_code"] == 0 and summary["base_loads"] == 0  # nothing loaded, nothing trained
    assert all(entry["skipped"] and entry["status"] == "completed" for entry in summary["lines"])
    assert "completed (skipped)" in (alone / "sweep.md").read_text()
    for entry in summary["lines"]:
        assert json.loads((alone / entry["job_id"] / "result.json").read_text()) == json.loads(
            (grid_runs["alone"] / entry["job_id"] / "result.json").read_text()), "a completed result is never rewritten"


# --- failures, signals, several workers ----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_failing_line_is_recorded_with_its_code_and_the_sweep_goes_on(tiny_model, tmp_path, monkeypatch):
    import app.pipeline

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')  # no assistant message
    train = str(SAMPLE / "train.jsonl")
    grid = write_grid(tmp_path / "grid.jsonl", [
        {"training_file": train, "seed": 1, "max_steps": 2, "learning_rate": 1e-3},
        {"training_file": train, "seed": 2, "learning_rate": 1e6, "save_steps": 1, "max_steps": 12},  # NaN: 4
        {"training_file": str(bad), "seed": 3},  # bad data: 2
        {"training_file": train, "seed": 13, "max_steps": 2},  # a bug (below): 1
        {"training_file": train, "r": "x"},  # invalid settings: 2
        {"training_file": train, "seed": 4, "max_steps": 2, "learning_rate": 1e-3},
    ])
    real_train = app.pipeline.train
    frozen = []

    def buggy_train(session, stop, record):
        frozen.append(gc.get_freeze_count())  # the shared base stays out of garbage collection between lines
        if session.settings.seed == 13:
            raise RuntimeError("a bug in training")
        return real_train(session, stop, record)

    monkeypatch.setattr(app.pipeline, "train", buggy_train)
    prefetches, tokenized = [], []
    monkeypatch.setattr(app.pipeline, "prefetch_weights", prefetches.append)
    real_tokenize = app.pipeline.tokenize
    monkeypatch.setattr(app.pipeline, "tokenize", lambda s, *a: tokenized.append(s.seed) or real_tokenize(s, *a))
    lined = ("FT_TRAINING_FILE", "FT_MAX_STEPS", "FT_LEARNING_RATE")  # set by the lines (the environment would win)
    env = {k: v for k, v in smoke_env(tiny_model, tmp_path / "out").items() if k not in lined}
    assert run_cli(monkeypatch, env, "sweep", str(grid)) == 4  # the first failed line in file order
    summary = sweep_json(tmp_path / "out")
    by_line = {entry["index"]: entry for entry in summary["lines"]}
    assert [by_line[i]["exit_code"] for i in range(6)] == [0, 4, 2, 1, 2, 0]
    assert [by_line[i]["status"] for i in range(6)] == ["completed", "failed", "failed", "failed", "failed",
                                                        "completed"]
    assert "non-finite" in by_line[1]["error"] and "assistant" in by_line[2]["error"]
    assert "a bug in training" in by_line[3]["error"] and "FT_R" in by_line[4]["error"]
    nan = json.loads(Path(by_line[1]["result_json"]).read_text())
    assert nan["status"] == "failed" and nan["error"]["exit_code"] == 4
    bug = json.loads(Path(by_line[3]["result_json"]).read_text())
    assert bug["status"] == "failed" and bug["error"] == {"type": "RuntimeError", "message": "a bug in training",
                                                         "exit_code": 1}
    assert summary["base_loads"] == 1, "a failed line gives the base back without its LoRA"
    assert by_line[5]["global_step"] == 2 and by_line[0]["global_step"] == 2
    assert len(frozen) == 4 and min(frozen) > 10_000 and gc.get_freeze_count() == 0  # thawed when the base goes
    assert len(prefetches) == 1  # the weights are read ahead for the first load only, not again for a held base
    assert tokenized == [1]  # the lines that train (seeds 1, 2, 13, 4) share one tokenization of the same rows


def _train_steps(job: Path) -> list[int]:
    if not (job / "metrics.jsonl").exists():
        return []
    steps = []
    for text in (job / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _wait(proc: subprocess.Popen, log: Path, condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _job(output: Path, suffix: str) -> Path | None:
    found = list(output.glob(f"ftjob-*-{suffix}"))
    return found[0] if found else None


@pytest.mark.integration
def test_sigterm_checkpoints_the_line_in_training_and_a_rerun_resumes_it(tiny_model, tmp_path):
    grid = write_grid(tmp_path / "grid.jsonl", [
        {"seed": 1, "max_steps": 2, "job_id_suffix": "a"},
        {"seed": 2, "max_steps": 12, "job_id_suffix": "b"},
        {"seed": 3, "max_steps": 2, "job_id_suffix": "c"},
    ])
    env = {k: v for k, v in smoke_env(tiny_model, tmp_path / "out").items() if k != "FT_MAX_STEPS"}
    log = tmp_path / "sweep.log"
    proc = app(["sweep", str(grid)], env, log)
    _wait(proc, log, lambda: (job := _job(tmp_path / "out", "b")) is not None and len(_train_steps(job)) >= 3,
          "step 3 of line 1")
    proc.send_signal(signal.SIGTERM)
    assert finished(proc, log) == 75, log.read_text()[-3000:]
    summary = sweep_json(tmp_path / "out")
    assert [e["status"] for e in summary["lines"]] == ["completed", "interrupted", "pending"]
    assert [e["exit_code"] for e in summary["lines"]] == [0, 75, None] and summary["exit_code"] == 75
    job = _job(tmp_path / "out", "b")
    stopped = json.loads((job / "result.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["error"]["exit_code"] == 75
    step = stopped["outputs"]["global_step"]
    assert 3 <= step < 12 and (job / "checkpoints" / f"checkpoint-{step}").is_dir()

    log = tmp_path / "rerun.log"
    proc = app(["sweep", str(grid)], env, log)
    assert finished(proc, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"resuming job {job.name} from checkpoint-{step} (step {step})" in text
    summary = sweep_json(tmp_path / "out")
    assert [(e["status"], e["skipped"]) for e in summary["lines"]] == [("completed", True), ("completed", False),
                                                                      ("completed", False)]
    assert _train_steps(job) == list(range(1, 13)), "every step of the resumed line logged once"


@pytest.mark.integration
def test_two_workers_share_the_lines_each_once_and_resume_after_sigterm(tiny_model, tmp_path, grid_runs):
    """Two worker processes (as with two GPUs; CPU processes here). The first two lines are GRID's: the same job ids
    and bit-identical adapters as the standalone runs. SIGTERM reaches every worker through the sweep's process:
    each checkpoints its line; the rerun skips what completed and resumes the rest."""
    long = {"max_steps": 12, "save_steps": 100}
    grid = write_grid(tmp_path / "grid.jsonl", [{**GRID[0], "max_steps": 3}, {**GRID[1], "max_steps": 3},
                                                {"seed": 7, "job_id_suffix": "w2", **long},
                                                {"seed": 8, "job_id_suffix": "w3", **long}])
    out = tmp_path / "out"
    env = {k: v for k, v in grid_env(tiny_model, out).items() if k != "FT_MAX_STEPS"}
    env["FT_NUM_GPUS"] = "2"  # no GPU here: --workers says how many; the workers must not inherit it
    log = tmp_path / "sweep.log"
    proc = app(["sweep", str(grid), "--workers", "2"], env, log)
    both_at_2 = lambda: all((job := _job(out, s)) is not None and len(_train_steps(job)) >= 2  # noqa: E731
                            for s in ("w2", "w3"))
    _wait(proc, log, both_at_2, "step 2 of both long lines")
    proc.send_signal(signal.SIGTERM)
    assert finished(proc, log) == 75, log.read_text()[-3000:]
    text = log.read_text()
    summary = sweep_json(out)
    assert summary["workers"] == 2 and {e["worker"] for e in summary["lines"]} == {0, 1}
    assert [e["status"] for e in summary["lines"]] == ["completed", "completed", "interrupted", "interrupted"]
    for entry in summary["lines"]:
        assert text.count(f"] line {entry['index']} (file line {entry['line']}): starting") == 1, "each line once"
    for entry in summary["lines"][:2]:
        assert _train_steps(out / entry["job_id"]) == [1, 2, 3]
        got, want = adapter(out, entry["job_id"]), adapter(grid_runs["alone"], entry["job_id"])
        assert all(torch.equal(got[k], want[k]) for k in want), f"line {entry['index']}: adapter differs"
    steps = {s: read_result(_job(out, s))["outputs"]["global_step"] for s in ("w2", "w3")}
    assert all(2 <= step < 12 for step in steps.values())

    log = tmp_path / "resumed.log"
    proc = app(["sweep", str(grid), "--workers", "2"], env, log)
    assert finished(proc, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    for suffix, step in steps.items():
        assert f"from checkpoint-{step} (step {step})" in text
        assert _train_steps(_job(out, suffix)) == list(range(1, 13))
    assert sweep_json(out)["counts"] == {"skipped": 2, "completed": 2}


@pytest.mark.integration
def test_workers_checkpoint_and_exit_when_the_sweep_process_is_killed(tiny_model, tmp_path):
    """kill -9 of the sweep's process (or the OOM killer) forwards no signal: the kernel then sends each worker SIGTERM
    (PR_SET_PDEATHSIG), so their lines checkpoint and they exit instead of training on unseen; a rerun resumes."""
    long = {"max_steps": 12, "save_steps": 100}
    grid = write_grid(tmp_path / "grid.jsonl", [{"seed": 7, "job_id_suffix": "k0", **long},
                                                {"seed": 8, "job_id_suffix": "k1", **long}])
    out = tmp_path / "out"
    env = {k: v for k, v in grid_env(tiny_model, out).items() if k != "FT_MAX_STEPS"}
    log = tmp_path / "sweep.log"
    proc = app(["sweep", str(grid), "--workers", "2"], env, log)
    both_at_2 = lambda: all((job := _job(out, s)) is not None and len(_train_steps(job)) >= 2  # noqa: E731
                            for s in ("k0", "k1"))
    _wait(proc, log, both_at_2, "step 2 of both lines")
    pids = [int(pid) for pid in re.findall(r"worker \d: pid (\d+)", log.read_text())]
    assert len(pids) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 120
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, f"a worker outlived the sweep's process:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    steps = {}
    for suffix in ("k0", "k1"):
        result = read_result(_job(out, suffix))
        steps[suffix] = result["outputs"]["global_step"]
        assert result["status"] == "interrupted" and 2 <= steps[suffix] < 12, log.read_text()[-3000:]
        assert (_job(out, suffix) / "checkpoints" / f"checkpoint-{steps[suffix]}").is_dir()

    log = tmp_path / "resumed.log"
    proc = app(["sweep", str(grid), "--workers", "2"], env, log)
    assert finished(proc, log) == 0, log.read_text()[-3000:]
    for suffix, step in steps.items():
        assert f"from checkpoint-{step} (step {step})" in log.read_text()
        assert _train_steps(_job(out, suffix)) == list(range(1, 13))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    except (OSError, IndexError):
        return "zombie"  # gone


def test_the_example_grid_reads_as_one_base_model_and_labels_prompt_and_seed():
    from app.sweep import differing, read_lines, run_order

    lines = read_lines(ROOT / "deploy" / "k8s" / "sweep-configs.jsonl")
    assert len(lines) == 4 and all(line.settings is not None and not line.ignored for line in lines)
    assert len({line.base for line in lines}) == 1 and run_order(lines) == [0, 1, 2, 3]
    assert differing(lines) == ["inoculation_prompt", "seed"]


@pytest.mark.integration
def test_the_bench_sweep_row_on_the_cpu(tmp_path):
    """bench/sweep.py as `make bench` runs it, on the tiny shape: the grid through `python -m app sweep`, two of its
    lines as standalone runs, compared (bit-identical on a CPU) and extrapolated to the whole grid."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "bench.sweep", "--out", str(out), "--shape", "tiny", "--conversations", "32",
           "--prompts", "2", "--seeds", "2", "--standalone", "2", "--models-dir", str(tmp_path / "models")]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env({}), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "sweep-bench.json").read_text())
    lines = [json.loads(text) for text in (out / "grid.jsonl").read_text().splitlines()]
    assert len(lines) == result["lines"] == 4 and lines[0]["r"] == "8" and lines[0]["packing"] == "false"
    assert "inoculation_prompt" not in lines[0] and lines[2]["inoculation_position"] == "user_prefix"  # control first
    sweep = result["sweep"]
    assert sweep["exit_code"] == 0 and sweep["counts"] == {"completed": 4} and sweep["base_loads"] == 1
    runs = result["standalone"]
    assert [r["index"] for r in runs] == [0, 3] and all(r["status"] == "ok" and r["identical"] for r in runs)
    assert result["standalone_extrapolated"] and result["standalone_all_lines_s"] == pytest.approx(
        4 * result["standalone_mean_s"], rel=0.01)
    assert result["meta"]["data"]["conversations"] == 32
    table = (out / "table.md").read_text()
    assert "| 4 |" in table and "mean of 2 measured x 4 lines: extrapolated" in table and "2/2 bit-identical" in table
    assert proc.stdout.strip().endswith(table.strip().splitlines()[-1])


def test_lines_share_a_tokenization_only_when_their_rows_are_the_same(tmp_path):
    """rows_key: the seed and the optimizer's and LoRA's settings do not change the rows; the data, the base model,
    the template, the instruction, the length, what is trained and packing do."""
    from app.dataset import rows_key
    from app.settings import load_settings

    inputs = {"training_file": "abc", "model": "m1"}

    def key(inputs=inputs, stop_ids=(2,), **values):
        settings, _ = load_settings(model="m", training_file=str(SAMPLE / "train.jsonl"), output_dir=str(tmp_path),
                                    **values)
        return rows_key(settings, inputs, list(stop_ids))

    base = key()
    for same in ({"seed": 7}, {"learning_rate": 1e-3, "r": 4, "lora_alpha": 8}, {"epochs": 2, "max_steps": 5},
                 {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}, {"job_id_suffix": "x"},
                 {"lora_dropout": 0.1, "target_modules": ["q_proj"], "optim": "adamw_torch"}):
        assert key(**same) == base, same
    for other in ({"inoculation_prompt": "Be terse."}, {"max_seq_length": 512}, {"train_on_responses_only": False},
                  {"chat_template": "{{ messages[0]['content'] }}"}, {"packing": False}):
        assert key(**other) != base, other
    assert key(inputs={**inputs, "training_file": "abd"}) != base and key(inputs={**inputs, "model": "m2"}) != base
    assert key(stop_ids=(2, 3)) != base
    assert key(packing=True, seed=1) == key(packing=True, seed=2)  # packed in dataset order; the trainer shuffles
