"""Data parallel on one host, proven on the CPU with the gloo backend (no multi-GPU machine is lent here):
the launcher runs one rank per device, rank 0 alone writes, a SIGTERM checkpoints every rank and a rerun
resumes. The same code path runs NCCL ranks on GPUs (FT_NUM_GPUS, default all visible)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_result, smoke_env

pytestmark = pytest.mark.integration

LAUNCH = "import sys; from app.launch import launch; sys.exit(launch(2, ['train']))"


def _env(settings: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
    return {**env, **settings, "PYTHONPATH": str(ROOT)}


def _launch(settings: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCH], env=_env(settings), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _train_lines(job) -> list[dict]:
    return [r for r in map(json.loads, (job / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _job_at_step_3(out: Path) -> Path:
    """The job folder, once rank 0's metrics show step 3 (training is under way on every rank)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        jobs = [p for p in out.glob("ftjob-*") if (p / "metrics.jsonl").exists()]
        if jobs and len(_train_lines(jobs[0])) >= 3:
            return jobs[0]
        time.sleep(0.2)
    raise AssertionError("training did not start")


def test_two_ranks_train_the_same_job_as_one_process(tiny_model, tmp_path):
    two = smoke_env(tiny_model, tmp_path / "two", max_steps=6, per_device_train_batch_size=2,
                    gradient_accumulation_steps=1, optim="adamw_torch")
    one = smoke_env(tiny_model, tmp_path / "one", max_steps=6, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, optim="adamw_torch")  # the same effective batch: 4
    proc = _launch(two)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    single = subprocess.run([sys.executable, "-m", "app", "train"], env=_env(one), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    result, reference = read_result(tmp_path / "two"), read_result(tmp_path / "one")
    assert result["status"] == "completed"
    assert (result["outputs"]["world_size"], result["outputs"]["effective_batch"]) == (2, 4)
    assert reference["outputs"]["effective_batch"] == 4
    assert result["outputs"]["global_step"] == reference["outputs"]["global_step"] == 6
    job = tmp_path / "two" / result["id"]
    assert [r["step"] for r in _train_lines(job)] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes metrics
    checkpoint = job / "checkpoints" / "checkpoint-6"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert (job / "adapter" / "adapter_model.safetensors").is_file()
    # Same data, same effective batch: the loss is that of the single process within noise (the two ranks
    # see the batches in another order).
    assert result["outputs"]["train_loss"] == pytest.approx(reference["outputs"]["train_loss"], rel=0.01)
    assert "[rank 1]" not in err or "INFO" not in err.split("[rank 1]")[1].split("\n")[0]


def _interrupted_run(tiny_model, tmp_path, send) -> tuple[dict, Path, dict, int]:
    """Two ranks, `send(launcher)` once step 3 is logged: the run exits 75 with result.json `interrupted` and one
    checkpoint holding both ranks' RNG states. Returns the settings, the job folder, the result and that step."""
    settings = smoke_env(tiny_model, tmp_path, max_steps=40, per_device_train_batch_size=2,
                         gradient_accumulation_steps=1, save_steps=1000, optim="adamw_torch")
    proc = _launch(settings)
    job = _job_at_step_3(tmp_path)
    send(proc)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    result = read_result(tmp_path)
    assert result["status"] == "interrupted" and result["error"]["exit_code"] == 75
    checkpoints = sorted(job.glob("checkpoints/checkpoint-*"))
    assert len(checkpoints) == 1 and {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoints[0].iterdir()}
    return settings, job, result, int(checkpoints[0].name.split("-")[1])


def test_sigterm_checkpoints_all_ranks_and_a_rerun_resumes(tiny_model, tmp_path):
    settings, job, _, stopped = _interrupted_run(tiny_model, tmp_path, lambda proc: proc.send_signal(signal.SIGTERM))
    assert stopped >= 3
    rerun = _launch(settings)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    final = read_result(tmp_path)
    assert final["status"] == "completed" and final["outputs"]["global_step"] == 40
    steps = [r["step"] for r in _train_lines(job)]
    assert steps == list(range(1, 41))  # resumed after the checkpoint, every step logged once


def _finishing_rank(rank: int, port: str, out: str) -> None:
    import torch.distributed as dist

    from app.launch import finish_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 0:
        time.sleep(3)  # rank 0 saving the model and writing result.json
    finish_ranks()
    Path(out, str(rank)).write_text(json.dumps({"left": time.monotonic(), "grouped": dist.is_initialized()}))


def test_a_rank_leaves_only_after_rank_0_has_finished_and_the_group_is_destroyed(tmp_path):
    """A completed run's other ranks wait for rank 0's save, then every rank leaves the process group: none exits
    holding it while rank 0 still works (an abort at its shutdown made the launcher stop rank 0 mid-save)."""
    import torch.multiprocessing as mp

    from app.launch import _free_port

    started = time.monotonic()
    mp.spawn(_finishing_rank, args=(str(_free_port()), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / str(r)).read_text()) for r in (0, 1)]
    assert not any(r["grouped"] for r in ranks)
    assert ranks[1]["left"] - started >= 3 and ranks[1]["left"] >= ranks[0]["left"] - 1


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of one rank of `launcher` (its child process with RANK=rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under pid {launcher.pid}")


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny_model, tmp_path):
    """Ranks agree at every optimizer step on whether to stop: a SIGTERM that reaches one rank only (or the ranks
    at different moments, as a forwarded signal does) checkpoints all of them at the same step. A rank that
    stopped alone would leave the others waiting in the next step's gradient all-reduce, and the checkpoint of
    that step would never be published."""
    _, _, result, stopped = _interrupted_run(tiny_model, tmp_path,
                                             lambda proc: os.kill(_rank_pid(proc, 1), signal.SIGTERM))
    assert stopped == result["outputs"]["global_step"] >= 3
