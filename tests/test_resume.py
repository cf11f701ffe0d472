"""Reliability on the CPU with the tiny model: preemption, kills mid-write, reruns, NaN, secrets, disk, atomic files.

The signal tests run `python -m app train` as a subprocess, as Kubernetes would, and watch metrics.jsonl to
signal it at a chosen step. The reference they are compared with is an uninterrupted run of the same settings.
A kill in the middle of a checkpoint write is made deterministic by a sitecustomize shim (on PYTHONPATH, in the
child only) that blocks torch.save for one file; the job's code is not changed for the tests.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, read_result, run_cli, smoke_env

pytestmark = pytest.mark.integration

# 48 sample conversations / (2 per micro-batch x 2 micro-batches) = 12 steps per epoch: 18 steps cross an epoch
# boundary (a reshuffle). Dropout makes the result depend on the restored RNG state too.
RESUME = dict(max_steps=18, lora_dropout=0.1, logging_steps=1, save_steps=100)
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json", "job_totals.json"}
BASE_WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}

SHIM = '''
import os
if os.environ.get("BLOCK_SAVE_MATCH"):
    import pathlib, time, torch
    _save = torch.save
    def _blocking_save(obj, f, *args, **kwargs):
        if os.environ["BLOCK_SAVE_MATCH"] in str(f):
            pathlib.Path(os.environ["BLOCK_SAVE_MARKER"]).write_text(str(f))
            time.sleep(600)  # killed here by the test
        return _save(obj, f, *args, **kwargs)
    torch.save = _blocking_save
'''


def _calibration() -> float:
    """How much slower this machine is now than an idle CI core (>= 1): a fixed CPU-bound loop, timed once.
    Waits are scaled by it, so that two CPU hogs beside `make test` do not turn a slow resume into a failure."""
    started = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i * i
    return max(1.0, (time.perf_counter() - started) / REFERENCE_LOOP_S)


REFERENCE_LOOP_S = 0.15  # the loop above on an idle core of the 2-core CI machine (2026-12-01)
# Seconds without any progress (the child's log growing, a step logged) before a wait fails: the longest silent
# phase is the start (imports, the tiny model) at ~15 s on an idle CI machine. Scaled by _calibration().
STALL_S = 120
SLOWDOWN = None


def _stall_s() -> float:
    global SLOWDOWN
    if SLOWDOWN is None:
        SLOWDOWN = _calibration()
    return STALL_S * SLOWDOWN


class Job:
    """`python -m app train` in a child process with exactly these FT_* settings; its output in a log file.

    Waits poll on progress: they fail only when the child makes none (its log does not grow, no step is logged)
    for _stall_s() seconds, however long the whole run takes on a loaded machine. A wait that fails kills the
    child, and so does the test's teardown (`_no_child_survives`)."""

    running: list[Job] = []

    def __init__(self, env: dict[str, str], log: Path, extra_env: dict[str, str] | None = None,
                 argv: list[str] | None = None):
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
        child_env.update(env, **(extra_env or {}))
        self.log = log
        self.handle = open(log, "w")
        self.proc = subprocess.Popen(argv or [sys.executable, "-m", "app", "train"], cwd=ROOT, env=child_env,
                                     stdout=self.handle, stderr=subprocess.STDOUT)
        self.output_dir = Path(env.get("FT_OUTPUT_DIR", log.parent))
        Job.running.append(self)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def _progress(self) -> tuple:
        try:
            size = self.log.stat().st_size
        except OSError:
            size = 0
        return size, len(self.logged_steps())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.handle.close()

    def _poll_until(self, done, what: str, stall: float | None) -> None:
        stall = stall if stall is not None else _stall_s()
        last, since = self._progress(), time.monotonic()
        try:
            while not done():
                time.sleep(0.01)
                progress = self._progress()
                if progress != last:
                    last, since = progress, time.monotonic()
                elif time.monotonic() - since > stall:
                    raise AssertionError(f"no progress for {stall:.0f} s waiting for {what}:\n{self.text()[-3000:]}")
        except BaseException:
            self.kill()  # never left running behind a failed wait
            raise

    def wait_for(self, condition, what: str, stall: float | None = None) -> None:
        def done() -> bool:
            if condition():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended (exit {self.proc.returncode}) before {what}:\n{self.text()[-3000:]}")
            return False

        self._poll_until(done, what, stall)

    def logged_steps(self) -> list[int]:
        metrics = list(self.output_dir.glob("ftjob-*/metrics.jsonl"))
        if not metrics:
            return []
        steps = []
        for line in metrics[0].read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in record:
                steps.append(record["step"])
        return steps

    def wait(self, stall: float | None = None) -> int:
        """The child's exit code, once it exits; it is killed when it stalls (and the wait fails)."""
        self._poll_until(lambda: self.proc.poll() is not None, "the job to exit", stall)
        self.handle.close()
        return self.proc.returncode


@pytest.fixture(autouse=True)
def _no_child_survives():
    yield
    while Job.running:
        Job.running.pop().kill()


def _env(model: Path, output: Path, **settings) -> dict[str, str]:
    return smoke_env(model, output, **{**RESUME, **settings})


def _job_dir(output: Path) -> Path:
    (job,) = output.glob("ftjob-*")
    return job


def _adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(_job_dir(output) / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(output: Path, reference: Path) -> None:
    got, want = _adapter(output), _adapter(reference)
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    # CPU kernels are deterministic for a fixed thread count: resuming must reproduce the run to float noise.
    assert worst <= 1e-5, f"adapter differs from the uninterrupted run by up to {worst}"


def _assert_checkpoint_is_resumable(checkpoint: Path, step: int) -> None:
    names = {p.name for p in checkpoint.iterdir()}
    assert CHECKPOINT_FILES <= names, f"{checkpoint.name} lacks {CHECKPOINT_FILES - names}"
    assert not names & BASE_WEIGHT_FILES, f"{checkpoint.name} holds base weights: {names & BASE_WEIGHT_FILES}"
    assert all("lora_" in key for key in load_file(checkpoint / "adapter_model.safetensors"))
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted run of the RESUME settings (in this process; the same code path as the CLI)."""
    output = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("FT_") or k == "HF_TOKEN"]:
            mp.delenv(key)
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert run_cli(mp, _env(tiny_model, output), "train") == 0
    result = read_result(output)
    assert result["outputs"]["global_step"] == RESUME["max_steps"]
    return output


# --- (a) + (d): SIGTERM/SIGINT at random steps, rerun until completed == uninterrupted -------------------------------


def test_sigterm_at_random_steps_then_rerun_equals_an_uninterrupted_run(tiny_model, tmp_path, reference):
    kills = sorted(random.Random(20261125).sample(range(2, RESUME["max_steps"] - 5), 3))
    signals = [signal.SIGTERM, signal.SIGINT, signal.SIGTERM]  # Kubernetes' stop, and Ctrl-C in a terminal
    env = _env(tiny_model, tmp_path)
    saved = 0  # the step of the newest checkpoint
    for number, (kill_at, signum) in enumerate(zip(kills, signals, strict=True)):
        target = max(kill_at, saved + 1)
        job = Job(env, tmp_path / f"run-{number}.log")
        job.wait_for(lambda job=job, target=target: any(s >= target for s in job.logged_steps()), f"step {target}")
        job.proc.send_signal(signum)
        signalled = time.monotonic()
        code = job.wait()
        took = time.monotonic() - signalled
        assert code == 75, job.text()[-3000:]
        assert took < GRACE_S, f"SIGTERM to exit took {took:.1f} s"
        result = read_result(tmp_path)
        assert result["status"] == "interrupted" and result["error"]["exit_code"] == 75
        checkpoint = _job_dir(tmp_path) / "checkpoints" / f"checkpoint-{result['outputs']['global_step']}"
        step = int(checkpoint.name.split("-")[1])
        assert target <= step < RESUME["max_steps"], f"signalled at step {target}, checkpoint at {step}"
        assert checkpoint.name in result["error"]["message"] and signum.name in result["error"]["message"]
        _assert_checkpoint_is_resumable(checkpoint, step)
        if saved:
            assert f"resuming job {result['id']} from checkpoint-{saved} (step {saved})" in job.text()
        saved = step

    job = Job(env, tmp_path / "final.log")
    assert job.wait() == 0, job.text()[-3000:]
    assert f"from checkpoint-{saved} (step {saved})" in job.text()
    result, want = read_result(tmp_path), read_result(reference)
    assert result["status"] == "completed" and result["error"] is None
    assert result["outputs"]["global_step"] == want["outputs"]["global_step"] == RESUME["max_steps"]
    # HF's train_loss and TRL's token count cover one session only: the job carries them across resumes.
    assert result["outputs"]["train_loss"] == pytest.approx(want["outputs"]["train_loss"], rel=1e-6)
    assert result["outputs"]["train_tokens"] == want["outputs"]["train_tokens"]
    assert job.logged_steps() == list(range(1, RESUME["max_steps"] + 1)), "each step logged exactly once"
    _assert_same_adapter(tmp_path, reference)


# --- (b): SIGKILL in the middle of a checkpoint write ---------------------------------------------------------


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_complete_one(tiny_model, tmp_path, reference):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    marker = tmp_path / "blocked"
    env = _env(tiny_model, tmp_path / "out", save_steps=2)
    job = Job(env, tmp_path / "killed.log", {"PYTHONPATH": str(shim), "BLOCK_SAVE_MARKER": str(marker),
                                             "BLOCK_SAVE_MATCH": "/.staging/checkpoint-4/optimizer.pt"})
    job.wait_for(marker.exists, "the write of checkpoint-4")
    job.proc.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL

    root = _job_dir(tmp_path / "out")
    half = root / "checkpoints" / ".staging" / "checkpoint-4"
    assert (half / "adapter_model.safetensors").is_file() and not (half / "trainer_state.json").exists()
    assert [p.name for p in (root / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]

    rerun = Job(env, tmp_path / "rerun.log")
    assert rerun.wait() == 0, rerun.text()[-3000:]
    assert "from checkpoint-2 (step 2)" in rerun.text()
    assert not (root / "checkpoints" / ".staging").exists()
    result = read_result(tmp_path / "out")
    assert result["status"] == "completed" and result["outputs"]["global_step"] == RESUME["max_steps"]
    assert rerun.logged_steps() == list(range(1, RESUME["max_steps"] + 1))
    _assert_same_adapter(tmp_path / "out", reference)  # checkpoint every 2 steps or none: the same training


# --- (c): a second signal exits at once ----------------------------------------------------------------------


def test_a_second_sigterm_exits_at_once(tiny_model, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    marker = tmp_path / "blocked"
    env = _env(tiny_model, tmp_path / "out")
    # The checkpoint that the first SIGTERM asks for blocks: only the second signal can end the process.
    job = Job(env, tmp_path / "job.log", {"PYTHONPATH": str(shim), "BLOCK_SAVE_MARKER": str(marker),
                                          "BLOCK_SAVE_MATCH": "/.staging/checkpoint-"})
    job.wait_for(lambda: job.logged_steps(), "the first step")
    job.proc.send_signal(signal.SIGTERM)
    job.wait_for(marker.exists, "the checkpoint write after SIGTERM")
    job.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert job.wait(stall=GRACE_S) == 75, job.text()[-3000:]
    assert time.monotonic() - signalled < 5
    result = read_result(tmp_path / "out")
    assert result["status"] == "interrupted" and result["error"]["exit_code"] == 75
    assert "twice" in result["error"]["message"]
    assert not list((tmp_path / "out").glob("ftjob-*/checkpoints/checkpoint-*")), "no half checkpoint published"


# --- (e): a non-finite loss ----------------------------------------------------------------------------------------


def test_nonfinite_training_stops_with_exit_4_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path, monkeypatch):
    # A learning rate of 1e6 blows the LoRA weights up within a few steps; a checkpoint after every step.
    env = smoke_env(tiny_model, tmp_path, learning_rate="1e6", save_steps=1, max_steps=12)
    assert run_cli(monkeypatch, env, "train") == 4
    result = read_result(tmp_path)
    assert result["status"] == "failed" and result["error"]["type"] == "training_failed"
    assert result["error"]["exit_code"] == 4 and "non-finite" in result["error"]["message"]
    bad_step = result["outputs"]["global_step"]
    root = _job_dir(tmp_path)
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (root / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "the run must have saved good checkpoints before the weights went bad"
    assert max(checkpoints) < bad_step, "no checkpoint at or after the non-finite step"
    assert f"checkpoint-{max(checkpoints)}" in result["error"]["message"]
    for step in checkpoints:
        weights = load_file(root / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), f"checkpoint-{step} holds non-finite weights"
    assert not (root / "adapter").exists() and not list(root.glob(".adapter*"))


# --- (f): secrets ------------------------------------------------------------------------------------------------

SECRETS = {"HF_TOKEN": "hf_secretvalue123456", "MY_API_KEY": "sk-supersecret987"}


def _assert_no_secret(output: Path, *texts: str) -> None:
    for path in [p for p in output.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        for value in SECRETS.values():
            assert value.encode() not in data, f"{value} in {path}"
    for text in texts:
        for value in SECRETS.values():
            assert value not in text


def test_secrets_never_reach_logs_results_metrics_or_checkpoints(tiny_model, tmp_path, monkeypatch, capfd):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    env = smoke_env(tiny_model, tmp_path / "ok", meta='{"run": "secrets"}')
    assert run_cli(monkeypatch, env, "train") == 0
    captured = capfd.readouterr()
    _assert_no_secret(tmp_path / "ok", captured.out, captured.err)

    # A failure whose message quotes the offending value: the value of a secret variable is redacted.
    env = smoke_env(tiny_model, tmp_path / "bad", learning_rate=SECRETS["MY_API_KEY"])
    assert run_cli(monkeypatch, env, "train") == 2
    captured = capfd.readouterr()
    message = read_result(tmp_path / "bad")["error"]["message"]
    assert "FT_LEARNING_RATE='<MY_API_KEY>'" in message
    _assert_no_secret(tmp_path / "bad", captured.out, captured.err)

    # A bug (exit 1) whose exception text carries the token: the logged traceback is redacted too.
    import app.pipeline

    def leak(settings, record, *args):
        raise RuntimeError(f"could not use token {SECRETS['HF_TOKEN']}")

    monkeypatch.setattr(app.pipeline, "prepare", leak)
    assert run_cli(monkeypatch, smoke_env(tiny_model, tmp_path / "bug"), "train") == 1
    captured = capfd.readouterr()
    assert "Traceback" in captured.err and "<HF_TOKEN>" in captured.err
    _assert_no_secret(tmp_path / "bug", captured.out, captured.err)


# --- (g): disk space for the merged model -------------------------------------------------------------------------


def test_too_little_disk_for_the_merged_model_fails_clearly_and_keeps_the_adapter(tiny_model, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - 50 * 2**20, 50 * 2**20))
    env = smoke_env(tiny_model, tmp_path, merge_before_push="true")
    assert run_cli(monkeypatch, env, "train") == 4
    result = read_result(tmp_path)
    message = result["error"]["message"]
    assert result["status"] == "failed" and result["error"]["type"] == "training_failed"
    assert f"FT_OUTPUT_DIR={tmp_path}" in message and "0.0 GiB are free" in message
    root = _job_dir(tmp_path)
    assert (root / "adapter" / "adapter_model.safetensors").is_file()
    assert not (root / "merged").exists() and not list(root.glob(".merged*"))
    trained = _adapter(tmp_path)

    # With space again, the rerun resumes from the last checkpoint, trains nothing more (no step 5 of 4) and
    # merges the same adapter.
    monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)
    assert run_cli(monkeypatch, env, "train") == 0
    result = read_result(tmp_path)
    assert result["status"] == "completed" and result["outputs"]["model_path"] == str(root / "merged")
    assert (root / "merged" / "config.json").is_file() and result["outputs"]["global_step"] == 4
    assert [r["step"] for r in map(json.loads, (root / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]
    again = _adapter(tmp_path)
    assert all(torch.equal(again[k], trained[k]) for k in trained), "the rerun changed the trained adapter"


def test_a_full_volume_while_checkpointing_fails_with_exit_4_and_the_rerun_resumes(tiny_model, tmp_path, monkeypatch):
    import errno

    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if "/.staging/checkpoint-4/" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    env = smoke_env(tiny_model, tmp_path, save_steps=2, max_steps=6)
    assert run_cli(monkeypatch, env, "train") == 4
    result = read_result(tmp_path)
    message = result["error"]["message"]
    assert result["status"] == "failed" and result["error"]["type"] == "training_failed"
    assert f"FT_OUTPUT_DIR={tmp_path} is full" in message and "checkpoint-2" in message
    root = _job_dir(tmp_path)
    assert [p.name for p in (root / "checkpoints").iterdir()] == ["checkpoint-2"]  # no .staging left either

    monkeypatch.setattr(torch, "save", real_save)
    assert run_cli(monkeypatch, env, "train") == 0
    result = read_result(tmp_path)
    assert result["status"] == "completed" and result["outputs"]["global_step"] == 6


# --- (h): atomic writes and leftovers --------------------------------------------------------------------------------


def test_write_json_atomic_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    import app.safeio
    from app.jobdir import write_json_atomic

    path = tmp_path / "result.json"
    write_json_atomic(path, {"status": "completed"})
    fdopen = os.fdopen

    class HalfWrite:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])  # half a file, then the failure (disk full, a kill)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(app.safeio.os, "fdopen", lambda fd, *a, **k: HalfWrite(fdopen(fd, *a, **k)))
    with pytest.raises(OSError):
        write_json_atomic(path, {"status": "failed"})
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"], "no temporary file left behind"


def test_publish_dir_replaces_a_folder_whole(tmp_path):
    from app.jobdir import publish_dir

    final = tmp_path / "adapter"
    for version in ("old", "new"):
        tmp = tmp_path / f".adapter.tmp-{version}"
        tmp.mkdir()
        (tmp / "weights").write_text(version)
        publish_dir(tmp, final)
        assert (final / "weights").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_rerun_clears_what_a_killed_run_left_half_written(tiny_model, tmp_path, monkeypatch):
    from app.pipeline import check
    from app.result import Recorder
    from app.settings import load_settings

    env = smoke_env(tiny_model, tmp_path, max_steps=2)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings, _ = load_settings()
    root = tmp_path / check(settings, Recorder(settings=settings))["job_id"]
    leftovers = [root / ".adapter.tmp-999", root / ".merged.tmp-999-adapter", root / ".adapter.old-999",
                 root / "checkpoints" / ".staging" / "checkpoint-3"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    (root / ".result.json.tmp-999").write_text('{"status": "comp')
    assert run_cli(monkeypatch, env, "train") == 0
    assert read_result(tmp_path)["status"] == "completed"
    assert not [p for p in root.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert not (root / "checkpoints" / ".staging").exists()


def test_the_same_job_running_twice_at_once_is_refused(tiny_model, tmp_path, monkeypatch):
    import fcntl

    from app.pipeline import check
    from app.result import Recorder
    from app.settings import load_settings

    env = smoke_env(tiny_model, tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings, _ = load_settings()
    root = tmp_path / check(settings, Recorder(settings=settings))["job_id"]
    root.mkdir(parents=True)
    with open(root / ".lock", "w") as lock:  # another process is training this very job
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_cli(monkeypatch, env, "train") == 2
    message = read_result(tmp_path)["error"]["message"]
    assert "already running" in message and "FT_JOB_ID_SUFFIX" in message
    assert not (root / "checkpoints").exists()
