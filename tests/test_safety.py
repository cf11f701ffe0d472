"""Safety (DESIGN.md, "Safety"; issue 14): planted links, secrets in every form, inputs that are not regular
files or are huge, values that pass validation and break later, faults that lose or misreport work, and
conversations whose cost grows with the square of their length.

Refusals and the primitives are unit tests (they end before a weight is loaded); the cases that train are
integration tests. Every case that runs the CLI checks what test_hostile.py checks: its exit code, no traceback,
a result.json with the reason; the link cases also hash a tree outside the output volume before and after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, read_result, run_cli, smoke_env

TOKEN = "hf_SafetyTestTokenValue0123456789abcdef"


# --- helpers ---------------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: its kind, content hash, link target and mode (what a write through a link changes)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                found[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[str(path.relative_to(root))] = ("dir",)
            else:
                found[str(path.relative_to(root))] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(),
                                                      info.st_size)
    return found


@pytest.fixture
def outside(tmp_path) -> Path:
    """A tree outside the output volume that planted links point at: files and a folder with a checkpoint-like
    content (a delete through a link would take it)."""
    root = tmp_path / "outside"
    (root / "folder" / "checkpoint-1").mkdir(parents=True)
    (root / "victim.txt").write_text("precious\n")
    (root / "folder" / "data.bin").write_bytes(os.urandom(1000))
    (root / "folder" / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    (root / "folder" / "result.json").write_text('{"status": "completed", "outputs": {"model_path": "/"}}')
    return root


def job_root(monkeypatch, env: dict[str, str]) -> Path:
    """The job folder these settings train into (`check`: no weights loaded)."""
    from app.pipeline import check
    from app.result import Recorder
    from app.settings import load_settings

    with monkeypatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        settings, _ = load_settings()
        logging.disable()  # the log's handler is the previous CLI run's, on a closed capture stream
        try:
            return Path(env["FT_OUTPUT_DIR"]) / check(settings, Recorder(settings=settings))["job_id"]
        finally:
            logging.disable(logging.NOTSET)


def run_failing(monkeypatch, capfd, env: dict[str, str], code: int, *needles: str) -> dict:
    """Run `train`; assert the exit code, no traceback, the volume's result.json holding the reason; return it."""
    got = run_cli(monkeypatch, env, "train")
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    assert got == code, err[-3000:]
    result = read_result(env["FT_OUTPUT_DIR"])
    assert result["status"] in ("failed", "interrupted") and result["error"]["exit_code"] == code
    for needle in needles:
        assert needle in result["error"]["message"], result["error"]["message"]
    assert len(result["error"]["message"].encode()) <= 4096
    return result


@contextmanager
def peak_memory():
    """The peak of Python's allocations inside the block (tracemalloc: independent of earlier tests' peaks)."""
    import tracemalloc

    tracemalloc.start()
    peak = [0]
    try:
        yield lambda: peak[0]
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block takes longer: SIGALRM interrupts a blocked open()."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# === class 1: writes never follow a planted link ===================================================================

# Paths inside the job folder that the job writes, replaces or deletes (PID-named temporaries as the job used to
# name them: predictable, so plantable).
INSIDE = ["checkpoints", "checkpoints/.staging", "checkpoints/checkpoint-2", ".lock", "result.json", "metrics.jsonl",
          "loss.png", "samples.jsonl", "adapter", "{tmp_adapter}", "{tmp_result}", "metrics.tmp"]


@pytest.mark.parametrize("target_kind", ["file", "folder"])
@pytest.mark.parametrize("planted", INSIDE)
def test_a_link_planted_in_the_job_folder_is_refused_and_nothing_outside_changes(
        planted, target_kind, tiny_model, tmp_path, monkeypatch, capfd, outside):
    env = smoke_env(tiny_model, tmp_path / "out", max_steps=1)
    root = job_root(monkeypatch, env)
    name = planted.format(tmp_adapter=f".adapter.tmp-{os.getpid()}", tmp_result=f".result.json.tmp-{os.getpid()}")
    link = root / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / ("victim.txt" if target_kind == "file" else "folder"))
    before = snapshot(outside)
    result = run_failing(monkeypatch, capfd, env, 2, "symbolic link", str(link))
    assert snapshot(outside) == before
    assert result["error"]["type"] == "invalid_settings"


@pytest.mark.parametrize("target_kind", ["file", "folder"])
def test_a_link_where_the_job_folder_should_be_is_refused_with_exit_2(target_kind, tiny_model, tmp_path, monkeypatch,
                                                                       capfd, outside):
    env = smoke_env(tiny_model, tmp_path / "out", max_steps=1)
    root = job_root(monkeypatch, env)
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(outside / ("victim.txt" if target_kind == "file" else "folder"))
    before = snapshot(outside)
    run_failing(monkeypatch, capfd, env, 2, str(root), "link" if target_kind == "folder" else "")
    assert snapshot(outside) == before
    assert root.is_symlink(), "the job never replaces or deletes the planted link either"


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.jsonl", ".lock"])
def test_a_hard_link_planted_in_the_job_folder_is_refused(name, tiny_model, tmp_path, monkeypatch, capfd, outside):
    """A hard link to a file outside (same file system) would carry an append there: refused like a symlink."""
    env = smoke_env(tiny_model, tmp_path / "out", max_steps=1)
    root = job_root(monkeypatch, env)
    root.mkdir(parents=True)
    os.link(outside / "victim.txt", root / name)
    before = snapshot(outside)
    run_failing(monkeypatch, capfd, env, 2, "hard link")
    assert snapshot(outside) == before


def test_a_fifo_where_the_job_writes_is_refused_without_blocking(tiny_model, tmp_path, monkeypatch, capfd):
    env = smoke_env(tiny_model, tmp_path / "out", max_steps=1)
    root = job_root(monkeypatch, env)
    root.mkdir(parents=True)
    os.mkfifo(root / "metrics.jsonl")
    with deadline(120):
        run_failing(monkeypatch, capfd, env, 2, "FIFO")


def test_links_at_the_volume_top_are_replaced_never_followed(tiny_model, tmp_path, monkeypatch, capfd, outside):
    """FT_OUTPUT_DIR/result.json (and the temporary names it used to be written under) planted as links: an early
    failure still writes the volume's result.json, as a file of its own."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").symlink_to(outside / "victim.txt")
    (out / f".result.json.tmp-{os.getpid()}").symlink_to(outside / "victim.txt")
    (out / f".write-test-{os.getpid()}").symlink_to(outside / "victim.txt")
    before = snapshot(outside)
    env = smoke_env(tiny_model, out, r="0")
    run_failing(monkeypatch, capfd, env, 2, "FT_R='0'")
    assert snapshot(outside) == before
    assert not (out / "result.json").is_symlink()


def test_ft_output_dir_itself_may_be_a_link(tmp_path, tiny_model, monkeypatch, capfd):
    """Where the volume is mounted or linked is the user's to say: FT_OUTPUT_DIR as a link works as a folder."""
    from app.jobdir import open_job
    from app.result import write_result

    real = tmp_path / "volume"
    real.mkdir()
    (tmp_path / "output").symlink_to(real)
    run_failing(monkeypatch, capfd, smoke_env(tiny_model, tmp_path / "output", r="0"), 2, "FT_R='0'")
    assert (real / "result.json").is_file()
    job, lock = open_job(tmp_path / "output", "ftjob-0123456789ab")
    try:
        assert write_result({"id": "ftjob-0123456789ab", "status": "completed"}, tmp_path / "output", job.root)
    finally:
        lock.close()
    assert read_result(real / "ftjob-0123456789ab")["status"] == "completed"


# --- the primitives ----------------------------------------------------------------------------------------------


def test_write_atomic_replaces_a_link_and_uses_unpredictable_names(tmp_path, outside):
    from app.safeio import write_atomic

    before = snapshot(outside)
    path = tmp_path / "result.json"
    path.symlink_to(outside / "victim.txt")
    for pid_name in (f".result.json.tmp-{os.getpid()}", "result.tmp"):
        (tmp_path / pid_name).symlink_to(outside / "victim.txt")
    write_atomic(path, b"{}")
    assert path.read_bytes() == b"{}" and not path.is_symlink()
    assert snapshot(outside) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == ["outside", "result.json"]


def test_the_lock_is_never_truncated_nor_opened_through_a_link(tmp_path, outside):
    from app.safeio import UnsafePath, open_lock

    lock = tmp_path / ".lock"
    lock.symlink_to(outside / "victim.txt")
    with pytest.raises(UnsafePath):
        open_lock(lock)
    assert (outside / "victim.txt").read_text() == "precious\n"
    lock.unlink()
    lock.write_text("kept")
    os.close(open_lock(lock))
    assert lock.read_text() == "kept"


def test_append_refuses_links_and_special_files(tmp_path, outside):
    from app.safeio import UnsafePath, append

    (tmp_path / "metrics.jsonl").symlink_to(outside / "victim.txt")
    with pytest.raises(UnsafePath):
        append(tmp_path / "metrics.jsonl", b"x\n")
    os.mkfifo(tmp_path / "samples.jsonl")
    with deadline(30), pytest.raises(UnsafePath):
        append(tmp_path / "samples.jsonl", b"x\n")
    append(tmp_path / "new.jsonl", b"a\n")
    append(tmp_path / "new.jsonl", b"b\n")
    assert (tmp_path / "new.jsonl").read_bytes() == b"a\nb\n"
    assert (outside / "victim.txt").read_text() == "precious\n"


def test_cleanup_reset_rotation_and_publish_never_delete_through_a_link(tmp_path, outside):
    from app.jobdir import JobDir, publish_dir

    before = snapshot(outside)
    job = JobDir(tmp_path / "job")
    job.root.mkdir()
    for name in (".adapter.tmp-1", ".adapter.old-1", ".result.json.tmp-1"):
        (job.root / name).symlink_to(outside / "folder")
    job.checkpoints.mkdir()
    job.staging.symlink_to(outside / "folder")
    (job.checkpoints / "checkpoint-1").symlink_to(outside / "folder" / "checkpoint-1")
    assert job.complete_checkpoints() == [], "a link is never a checkpoint"
    job.clear_temporaries()
    assert not job.staging.exists() and not list(job.root.glob(".*"))
    for name in ("adapter", "merged", "metrics.jsonl", "result.json", "loss.png", "samples.jsonl"):
        (job.root / name).symlink_to(outside / "folder")
    job.reset()
    assert not any(p.name != "checkpoints" for p in job.root.iterdir()) and not job.checkpoints.exists()
    # publish over a link to a folder: the link goes, the folder outside stays
    (job.root / "adapter").symlink_to(outside / "folder")
    tmp = tmp_path / "job" / ".adapter.tmp-x"
    tmp.mkdir()
    (tmp / "weights").write_text("new")
    publish_dir(tmp, job.adapter)
    assert (job.adapter / "weights").read_text() == "new" and not job.adapter.is_symlink()
    assert snapshot(outside) == before


def test_checkpoint_folders_are_made_by_the_job_and_a_planted_one_refused(tmp_path, outside):
    from app.jobdir import JobDir
    from app.safeio import UnsafePath

    job = JobDir(tmp_path / "job")
    job.root.mkdir()
    job.prepare_checkpoints()
    assert job.staging.is_dir() and not job.staging.is_symlink()
    (job.staging / "checkpoint-3").symlink_to(outside / "folder")
    with pytest.raises(UnsafePath):
        job.prepare_staging("checkpoint-3")
    assert job.prepare_staging("checkpoint-4").is_dir()


def test_the_job_tree_check_names_the_planted_entry(tmp_path, outside):
    from app.safeio import UnsafePath, check_tree

    (tmp_path / "a" / "b").mkdir(parents=True)
    check_tree(tmp_path / "a")
    (tmp_path / "a" / "b" / "adapter_model.safetensors").symlink_to(outside / "victim.txt")
    with pytest.raises(UnsafePath, match="adapter_model.safetensors is a symbolic link"):
        check_tree(tmp_path / "a")


@pytest.mark.integration
def test_a_run_with_links_at_the_volume_top_completes_and_changes_nothing_outside(tiny_model, tmp_path, monkeypatch,
                                                                                  outside):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").symlink_to(outside / "victim.txt")
    (out / f".result.json.tmp-{os.getpid()}").symlink_to(outside / "folder")
    before = snapshot(outside)
    env = smoke_env(tiny_model, out, max_steps=2, save_steps=1)
    assert run_cli(monkeypatch, env, "train") == 0
    assert snapshot(outside) == before
    result = read_result(out)
    assert result["status"] == "completed" and not (out / "result.json").is_symlink()
    root = out / result["id"]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert not [p for p in root.rglob("*") if p.is_symlink()]


# === class 2: no form of a secret is written or printed =========================================================


def _forms(value: str) -> list[str]:
    from urllib.parse import quote, quote_plus

    stripped = value.strip()
    return [stripped, value, repr(value)[1:-1], repr(stripped), json.dumps(value)[1:-1], quote(value, safe=""),
            quote_plus(value), quote(stripped), repr(value.encode())]


def _assert_nowhere(value: str, *texts: str, folder: Path | None = None) -> None:
    forms = [form for form in _forms(value) if form.strip()]
    files = [p for p in folder.rglob("*") if p.is_file()] if folder else []
    for form in forms:
        for text in texts:
            assert form not in text, f"{form!r} printed"
        for path in files:
            assert form.encode() not in path.read_bytes(), f"{form!r} in {path}"


def test_the_token_is_stripped_when_it_is_read(monkeypatch):
    from app.settings import load_settings

    monkeypatch.setenv("HF_TOKEN", TOKEN + "\n")
    settings, _ = load_settings(model="org/m", training_file="t.jsonl", output_dir="/tmp/x")
    assert settings.token() == TOKEN


@pytest.mark.parametrize("value", [TOKEN + "\n", " " + TOKEN + "\r\n", "p@ss w/rd+x%&=?" + TOKEN[:10]])
def test_redact_removes_every_form_of_a_secret(monkeypatch, value):
    from app.result import redact

    monkeypatch.setenv("HF_TOKEN", value)
    text = " | ".join(_forms(value)) + " | header: b'Bearer " + value.strip() + "\\n'"
    cleaned = redact(text)
    _assert_nowhere(value, cleaned)
    assert "<HF_TOKEN>" in cleaned


def test_a_token_pasted_into_another_setting_never_reaches_result_json_or_the_log(tiny_model, tmp_path, monkeypatch,
                                                                                    capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN + "\n")  # as a Kubernetes secret made from a file holds it
    out = tmp_path / "out"
    env = {**smoke_env(tiny_model, out, inoculation_prompt=f"use {TOKEN}", meta=json.dumps({"k": TOKEN})),
           "FT_MODEL": TOKEN}
    code = run_cli(monkeypatch, env, "train")
    captured = capfd.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    result = read_result(out)
    assert result["model"] == "<HF_TOKEN>" and result["params"]["validated_params"]["meta"] == {"k": "<HF_TOKEN>"}
    _assert_nowhere(TOKEN + "\n", captured.out, captured.err, folder=out)


def test_an_http_error_quoting_the_header_is_exit_2_and_redacted(tiny_model, tmp_path, monkeypatch, capfd):
    """A hub download failing inside the HTTP library (its own exception type, the header in its message)."""
    import huggingface_hub

    class LocalProtocolError(Exception):
        pass

    def refuse(*args, **kwargs):
        raise LocalProtocolError(f"Illegal header value b'Bearer {TOKEN}\\n' ({TOKEN!r}, {TOKEN}%0A)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setenv("HF_TOKEN", TOKEN + "\n")
    out = tmp_path / "out"
    env = {**smoke_env(tiny_model, out), "FT_MODEL": "org/model"}
    result = run_failing(monkeypatch, capfd, env, 2, "FT_MODEL=org/model")
    assert result["error"]["type"] == "invalid_settings"
    _assert_nowhere(TOKEN + "\n", folder=out)


def test_a_bug_carrying_the_token_is_redacted_in_the_log_result_and_termination_message(tiny_model, tmp_path,
                                                                                       monkeypatch, capfd):
    import app.cli
    import app.pipeline

    termination = tmp_path / "termination-log"
    termination.write_text("")
    monkeypatch.setattr(app.cli, "TERMINATION_LOG", termination)
    monkeypatch.setenv("HF_TOKEN", TOKEN + "\n")

    def leak(settings, record, *args):
        raise RuntimeError(f"request failed: {TOKEN!r} {TOKEN}%0A " + "x" * 10_000)

    monkeypatch.setattr(app.pipeline, "prepare", leak)
    out = tmp_path / "out"
    assert run_cli(monkeypatch, smoke_env(tiny_model, out), "train") == 1
    captured = capfd.readouterr()
    assert "Traceback" in captured.err and "<HF_TOKEN>" in captured.err
    assert len(termination.read_bytes()) <= 4096 and "RuntimeError" in termination.read_text()
    _assert_nowhere(TOKEN + "\n", captured.out, captured.err, termination.read_text(), folder=out)


@pytest.mark.integration
def test_a_run_with_a_newline_token_writes_no_form_of_it(tiny_model, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN + "\n")
    out = tmp_path / "out"
    env = smoke_env(tiny_model, out, max_steps=2, save_steps=1, meta=json.dumps({"note": f"token {TOKEN}"}),
                    test_file=SAMPLE / "test.jsonl")
    assert run_cli(monkeypatch, env, "train") == 0
    captured = capfd.readouterr()
    _assert_nowhere(TOKEN + "\n", captured.out, captured.err, folder=out)


# === class 3: inputs that are not regular files, or are huge ======================================================


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


@pytest.mark.parametrize("setting,make,needle", [
    ("config_file", lambda d: _fifo(d / "config.json"), "FIFO"),
    ("config_file", lambda d: Path("/dev/zero"), "character device"),
    ("config_file", lambda d: _sparse(d / "config.json", 2 * 2**30), "over the limit of 1 MiB"),
    ("config_file", lambda d: _sparse(d / "sweep.jsonl", 2 * 2**30), "over the limit of 16 MiB"),
    ("training_file", lambda d: _fifo(d / "train.jsonl"), "FIFO"),
    ("training_file", lambda d: Path("/dev/zero"), "character device"),
    ("training_file", lambda d: _sparse(d / "train.jsonl", 5 * 2**30), "over the limit of 4 GiB"),
    ("test_file", lambda d: _fifo(d / "test.jsonl"), "FIFO"),
    ("chat_template", lambda d: _fifo(d / "template.jinja"), "FIFO"),
    ("chat_template", lambda d: _sparse(d / "template.jinja", 2 * 2**30), "over the limit of 1 MiB"),
])
def test_inputs_must_be_regular_files_of_bounded_size(setting, make, needle, tiny_model, tmp_path, monkeypatch, capfd):
    path = make(tmp_path)
    env = smoke_env(tiny_model, tmp_path / "out", **{setting: path})
    started = time.monotonic()
    with deadline(120), peak_memory() as peak:
        run_failing(monkeypatch, capfd, env, 2, needle)
    assert time.monotonic() - started < 60
    assert peak() < 256 * 2**20, f"{peak() / 2**20:.0f} MiB allocated at the peak"


def test_an_endless_line_is_skipped_with_bounded_memory(tmp_path):
    from app.data import MAX_LINE_BYTES, load_conversations
    from app.errors import DataError

    path = _sparse(tmp_path / "train.jsonl", 4 * MAX_LINE_BYTES)  # one line of NUL bytes, no newline
    with peak_memory() as peak, pytest.raises(DataError, match="over the 64 MiB limit"):
        load_conversations(path)
    assert peak() < 2.5 * MAX_LINE_BYTES, f"{peak() / 2**20:.0f} MiB allocated at the peak"  # the line read whole: 4x+


def test_a_model_folder_with_a_special_file_is_refused_before_loading(tiny_model, tmp_path, monkeypatch, capfd):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in tiny_model.iterdir():
        if item.name != "tokenizer_config.json":
            (folder / item.name).symlink_to(item)
    os.mkfifo(folder / "tokenizer_config.json")
    with deadline(120):
        run_failing(monkeypatch, capfd, smoke_env(folder, tmp_path / "out"), 2, "tokenizer_config.json", "FIFO")


# === class 4: values that pass validation and break later ========================================================

LONG = "9" * 100_000


@pytest.mark.parametrize("overrides,needles", [
    ({"learning_rate": "1e999"}, ("FT_LEARNING_RATE",)),
    ({"learning_rate": "inf"}, ("FT_LEARNING_RATE",)),
    ({"weight_decay": "inf"}, ("FT_WEIGHT_DECAY='inf'", "finite")),
    ({"weight_decay": "nan"}, ("FT_WEIGHT_DECAY='nan'",)),
    ({"lora_dropout": "nan"}, ("FT_LORA_DROPOUT='nan'",)),
    ({"test_file_eval_steps": "inf", "test_file_eval_strategy": "steps"}, ("FT_TEST_FILE_EVAL_STEPS",)),
    ({"per_device_train_batch_size": "0"}, ("FT_PER_DEVICE_TRAIN_BATCH_SIZE='0'", "at least 1")),
    ({"per_device_train_batch_size": "-2"}, ("FT_PER_DEVICE_TRAIN_BATCH_SIZE='-2'",)),
    ({"seed": str(2**32)}, ("FT_SEED='4294967296'", "at most 4,294,967,295")),
    ({"max_steps": str(2**70)}, ("FT_MAX_STEPS",)),
    ({"max_seq_length": str(10**30)}, ("FT_MAX_SEQ_LENGTH",)),
    ({"meta": '{"a":' * 400 + "1" + "}" * 400}, ("FT_META", "nested")),
    ({"meta": "[" * 100_000 + "]" * 100_000}, ("FT_META", "nested too deeply")),
    ({"meta": json.dumps({"blob": "x" * 200_000})}, ("FT_META", "over the limit")),
    ({"target_modules": "[" * 100_000 + "]" * 100_000}, ("FT_TARGET_MODULES",)),
    ({"sampling_callbacks": json.dumps([{"dataset": "p.jsonl", "max_tokens": 2**40}])}, ("FT_SAMPLING_CALLBACKS",)),
    ({"push_to_hub": "true", "finetuned_model_id": "../evil"}, ("finetuned_model_id='../evil'",)),
    ({"push_to_hub": "true", "finetuned_model_id": "org/na me"}, ("finetuned_model_id='org/na me'",)),
    ({"learning_rate": LONG}, ("FT_LEARNING_RATE", "not a number")),
    ({"learning_rate": LONG, "epochs": LONG, "optim": LONG, "r": LONG, "seed": LONG}, ("5 invalid settings",)),
    ({"FT_MODEL": "/" + "m" * 3000}, ("FT_MODEL", "no such directory")),
    ({"training_file": "/data/" + "t" * 3000}, ("FT_TRAINING_FILE", "over the 255 a file name can have")),
])
def test_values_that_used_to_break_later_are_refused_with_a_short_reason(overrides, needles, tiny_model, tmp_path,
                                                                         monkeypatch, capfd):
    import app.cli

    termination = tmp_path / "termination-log"
    termination.write_text("")
    monkeypatch.setattr(app.cli, "TERMINATION_LOG", termination)
    env = {**smoke_env(tiny_model, tmp_path / "out", **{k: v for k, v in overrides.items() if k.islower()}),
           **{k: v for k, v in overrides.items() if k.isupper()}}  # FT_MODEL: smoke_env's own argument
    result = run_failing(monkeypatch, capfd, env, 2, *needles)
    message = termination.read_text()
    assert len(termination.read_bytes()) <= 4096 and message.startswith("failed (exit 2): ")
    assert all(needle in message for needle in needles), message[:500]
    assert result["error"]["message"] in message or message.endswith("cut]") or len(message) < 4096


def test_the_target_modules_must_be_layers_lora_can_adapt(tiny_model, tmp_path, monkeypatch, capfd):
    run_failing(monkeypatch, capfd, smoke_env(tiny_model, tmp_path / "out", target_modules="q_proj,mlp"), 2,
                "mlp names Qwen2MLP modules", "q_proj")


PHI3 = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32064,
        "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": None, "sliding_window": 2047, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("scaling", [None, "longrope"])
def test_phi3_builds_a_skeleton_and_its_fused_names_are_checked_before_loading(scaling):
    """Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: the default targets are refused on the
    skeleton (no weights), and the fused names are accepted. Phi-3.5's longrope config builds too."""
    from app.errors import SettingsError
    from app.memory import build_skeleton
    from app.model_source import check_target_modules
    from app.settings import ALL_PROJECTIONS

    config = dict(PHI3)
    if scaling:
        factors = [1.0] * 8  # head_dim / 2
        config.update(max_position_embeddings=131072, rope_scaling={
            "type": "longrope", "short_factor": factors, "long_factor": factors})
    skeleton = build_skeleton(config)
    assert skeleton is not None, "Phi-3's config must build on the meta device"
    with pytest.raises(SettingsError, match="q_proj, k_proj, v_proj, gate_proj, up_proj are not a module"):
        check_target_modules("phi3", ALL_PROJECTIONS, skeleton)
    check_target_modules("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], skeleton)


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_output_dir_is_unset_never_the_working_directory(value, tiny_model, tmp_path, monkeypatch, capfd):
    import app.settings

    default = tmp_path / "default-volume"
    monkeypatch.setattr(app.settings, "DEFAULT_OUTPUT_DIR", default)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    env = smoke_env(tiny_model, value, r="0")
    assert run_cli(monkeypatch, env, "train") == 2
    assert "Traceback" not in capfd.readouterr().err
    assert read_result(default)["error"]["exit_code"] == 2
    assert list(cwd.iterdir()) == []
    from app.settings import load_settings

    with monkeypatch.context() as mp:
        mp.setenv("FT_OUTPUT_DIR", value)
        settings, _ = load_settings(model="org/m", training_file="t.jsonl")
    assert settings.output_dir in (Path("/output"), default)  # the default volume, never the working directory


def test_the_crash_handler_writes_a_result_whatever_cannot_be_encoded(tiny_model, tmp_path, monkeypatch, capfd):
    """A field that cannot be built or serialised (a settings dump that raises, a value too deep) still leaves a
    result.json with the id, status and error."""
    from app.settings import Settings

    def broken(self):
        raise ValueError("Maximum serialization depth exceeded")

    monkeypatch.setattr(Settings, "public_params", broken)
    run_failing(monkeypatch, capfd, smoke_env(tiny_model, tmp_path / "out", target_modules="nope"), 2, "nope")


def test_a_result_too_deep_to_encode_is_written_minimal(tmp_path):
    from app.result import write_result

    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]
    result = {"id": None, "status": "failed", "outputs": deep, "created_at": "now",
              "error": {"type": "invalid_settings", "message": "why", "exit_code": 2}}
    assert write_result(result, tmp_path, None) == tmp_path / "result.json"
    written = read_result(tmp_path)
    assert written["status"] == "failed" and written["error"]["message"] == "why"


# === class 5: faults that lose or misreport work =================================================================


def test_sigterm_while_tokenizing_is_exit_75_not_invalid_data(tiny_model, tmp_path, monkeypatch, capfd):
    from app.formatting import Formatter

    render = Formatter.render
    calls = []

    def render_then_sigterm(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the job's handler raises Interrupted here
        return render(self, *args, **kwargs)

    monkeypatch.setattr(Formatter, "render", render_then_sigterm)
    result = run_failing(monkeypatch, capfd, smoke_env(tiny_model, tmp_path / "out"), 75, "SIGTERM")
    assert result["status"] == "interrupted" and result["error"]["type"] == "interrupted"


def test_a_signal_that_a_library_turned_into_another_error_is_still_exit_75(tiny_model, tmp_path, monkeypatch, capfd):
    """A library's `except Exception` that wraps our Interrupted into its own error: once a stop was requested,
    the job reports the interruption (Kubernetes retries exit 75; it fails the Job for good on 2)."""
    import app.pipeline

    tokenize = app.pipeline.tokenize

    def wrapping_library(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            return tokenize(*args, **kwargs)
        except Exception as err:
            raise ValueError(f"dataset map failed: {err}") from err

    monkeypatch.setattr(app.pipeline, "tokenize", wrapping_library)
    run_failing(monkeypatch, capfd, smoke_env(tiny_model, tmp_path / "out"), 75, "SIGTERM")


def test_a_signal_while_the_failure_is_being_written_does_not_break_it():
    from app.errors import Interrupted
    from app.signals import StopRequest

    stop = StopRequest()
    with pytest.raises(Interrupted):
        stop.handler(signal.SIGTERM, None)
    stop = StopRequest()
    stop.ending = True
    stop.handler(signal.SIGTERM, None)  # recorded, not raised into the crash handler
    assert stop.requested and stop.signal_name == "SIGTERM"


def test_a_refused_twin_leaves_the_running_jobs_result_alone(tiny_model, tmp_path, monkeypatch, capfd):
    import fcntl

    env = smoke_env(tiny_model, tmp_path / "out")
    root = job_root(monkeypatch, env)
    root.mkdir(parents=True)
    mine = json.dumps({"id": root.name, "status": "completed", "outputs": {"model_path": str(root)}})
    (root / "result.json").write_text(mine)
    (root / "adapter").mkdir()
    with open(root / ".lock", "w") as lock:  # the job is running in another process
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run_failing(monkeypatch, capfd, env, 2, "already running")
    assert (root / "result.json").read_text() == mine


def test_a_completed_result_is_never_replaced_by_another_ending(tmp_path):
    from app.result import write_result

    root = tmp_path / "ftjob-x"
    root.mkdir()
    completed = {"id": "ftjob-x", "status": "completed", "error": None}
    write_result(completed, tmp_path, root)
    for status in ("failed", "interrupted"):
        write_result({"id": "ftjob-x", "status": status, "error": {"message": "m", "exit_code": 2}}, tmp_path, root)
        assert read_result(root)["status"] == "completed"
        assert read_result(tmp_path)["status"] == status  # the volume's copy names the latest run


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    return dst


def test_new_weights_at_the_same_path_are_another_job(tiny_model, tmp_path, monkeypatch):
    import app.model_source
    from app.model_source import model_fingerprint

    model = _copy_model(tiny_model, tmp_path / "model")
    env = smoke_env(model, tmp_path / "out")
    first = job_root(monkeypatch, env).name
    assert job_root(monkeypatch, env).name == first, "same files, same job"
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for offset in range(header, len(data), 2):  # retrained: every weight changes, shapes and size do not
        data[offset] ^= 0x01
    weights.write_bytes(bytes(data))
    assert job_root(monkeypatch, env).name != first
    # Large weight files are fingerprinted by header and sampled blocks, not read whole: still told apart.
    monkeypatch.setattr(app.model_source, "SMALL_FILE_BYTES", 1024)
    before = model_fingerprint(str(model), model)
    assert model_fingerprint(str(model), model) == before
    for offset in range(header, len(data), 2):
        data[offset] ^= 0x02
    weights.write_bytes(bytes(data))
    assert model_fingerprint(str(model), model) != before
    assert model_fingerprint("org/model", Path("/cache/models--org--model/snapshots/" + "a" * 40)) == "hub:" + "a" * 40


@contextmanager
def small_volume(path: Path, size: str):
    """A tmpfs of `size` mounted at path (root only): a real full disk, with the real exceptions."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(volume: Path, leave: int = 0) -> None:
    """Fill the volume, then free `leave` bytes (room for result.json, not for a checkpoint or an adapter)."""
    with open(volume / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 2**16)
                handle.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    if leave:
        os.truncate(volume / "filler", max(os.path.getsize(volume / "filler") - leave, 0))


def test_real_disk_full_errors_of_every_library_are_exit_4(tmp_path):
    """torch.save raises a RuntimeError without the errno; safetensors a SafetensorError: both on a real full
    volume, mapped to TrainingError in one place."""
    import torch
    from safetensors.torch import save_file

    from app.artifacts import disk_full_is_a_training_error
    from app.errors import TrainingError
    from app.jobdir import JobDir

    with small_volume(tmp_path / "vol", "2m") as volume:
        job = JobDir(volume / "job")
        job.root.mkdir()
        _fill(volume)
        tensors = {"w": torch.zeros(100_000)}
        for save in (lambda: torch.save(tensors, job.root / "optimizer.pt"),
                     lambda: save_file(tensors, job.root / "adapter_model.safetensors"),
                     lambda: (job.root / "metrics.jsonl").write_bytes(b"x" * 100_000)):
            with pytest.raises(TrainingError, match=f"FT_OUTPUT_DIR={volume} is full"):
                with disk_full_is_a_training_error(job, volume):
                    save()


def test_a_volume_remounted_read_only_is_exit_4(tmp_path):
    from app.artifacts import disk_full_is_a_training_error
    from app.errors import TrainingError
    from app.jobdir import JobDir

    with small_volume(tmp_path / "vol", "2m") as volume:
        job = JobDir(volume / "job")
        job.root.mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(volume)], check=True)
        with pytest.raises(TrainingError, match="became read-only"):
            with disk_full_is_a_training_error(job, volume):
                (job.root / "metrics.jsonl").write_text("x")


def test_a_bug_inside_the_volume_guard_stays_a_bug(tmp_path):
    from app.artifacts import disk_full_is_a_training_error
    from app.jobdir import JobDir

    job = JobDir(tmp_path)
    with pytest.raises(KeyError), disk_full_is_a_training_error(job, tmp_path):
        raise KeyError("a bug")


@pytest.mark.integration
@pytest.mark.parametrize("when", ["checkpoint", "adapter"])
def test_a_real_full_volume_fails_with_exit_4_and_the_rerun_resumes(when, tiny_model, tmp_path, monkeypatch, capfd):
    import torch

    import app.backends.base

    with small_volume(tmp_path / "vol", "64m") as volume:
        env = smoke_env(tiny_model, volume / "out", save_steps=2, max_steps=4)
        if when == "checkpoint":
            real_save = torch.save

            def fill_then_save(obj, f, *args, **kwargs):
                if "/.staging/checkpoint-4/optimizer.pt" in str(f):
                    _fill(volume, leave=64 * 2**10)
                return real_save(obj, f, *args, **kwargs)

            monkeypatch.setattr(torch, "save", fill_then_save)
        else:
            real_adapter = app.backends.base.PeftBackend.save_adapter

            def fill_then_save_adapter(self, model, tokenizer, out_dir):
                _fill(volume, leave=64 * 2**10)
                return real_adapter(self, model, tokenizer, out_dir)

            monkeypatch.setattr(app.backends.base.PeftBackend, "save_adapter", fill_then_save_adapter)
        result = run_failing(monkeypatch, capfd, env, 4, "is full")
        assert result["error"]["type"] == "training_failed"
        root = volume / "out" / result["id"]
        kept = "checkpoint-2" if when == "checkpoint" else "checkpoint-4"
        assert kept in result["error"]["message"]
        assert sorted(p.name for p in (root / "checkpoints").iterdir())[-1] == kept
        assert not list(root.glob(".adapter*")), "a half-written adapter does not keep the volume full"
        (volume / "filler").unlink()
        if when == "checkpoint":
            monkeypatch.setattr(torch, "save", real_save)
        else:
            monkeypatch.setattr(app.backends.base.PeftBackend, "save_adapter", real_adapter)
        assert run_cli(monkeypatch, env, "train") == 0
        assert read_result(volume / "out")["outputs"]["global_step"] == 4


@pytest.mark.integration
def test_the_job_folder_removed_mid_run_is_a_clear_exit_4(tiny_model, tmp_path, monkeypatch, capfd):
    import shutil

    import app.trainer

    append = app.trainer.append_jsonl
    calls = []

    def remove_the_folder_then_append(path, records):
        calls.append(1)
        if len(calls) == 2:
            shutil.rmtree(Path(path).parent)
        return append(path, records)

    monkeypatch.setattr(app.trainer, "append_jsonl", remove_the_folder_then_append)
    result = run_failing(monkeypatch, capfd, smoke_env(tiny_model, tmp_path / "out"), 4, "disappeared")
    assert result["id"] in result["error"]["message"]


# === class 6: cost that grows with the square of the input =======================================================


def _conversation(messages: int, chars: int) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "w " * (chars // 2)} for i in range(messages)]


@pytest.mark.parametrize("messages,chars,needle", [(50_000, 4, "over the limit of 1000"),
                                                   (400, 50_000, "over the limit of 3,000,000,000")])
def test_conversations_too_costly_to_render_are_refused_before_any_rendering(messages, chars, needle, tokenizers,
                                                                           monkeypatch):
    from app.data import Conversation
    from app.errors import DataError
    from app.formatting import Formatter

    formatter = Formatter(tokenizers["chatml"], 2048)
    rendered = []
    monkeypatch.setattr(Formatter, "render", lambda self, *a, **k: rendered.append(1))
    started = time.monotonic()
    with pytest.raises(DataError, match=needle):
        formatter.encode_rows(Conversation(_conversation(messages, chars), "data.jsonl:3"))
    assert rendered == [] and time.monotonic() - started < 5


def test_a_50000_message_conversation_is_refused_quickly_through_the_cli(tiny_model, tmp_path, monkeypatch, capfd):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": _conversation(50_000, 4)}) + "\n")
    started = time.monotonic()
    run_failing(monkeypatch, capfd, smoke_env(tiny_model, tmp_path / "out", training_file=path), 2,
                f"{path}:1", "50,000 messages")
    assert time.monotonic() - started < 60


def test_a_single_huge_message_costs_linear_time(tokenizers):
    """One 2 MB message: rendered a few times and tokenized once or twice, not once per character."""
    from app.data import Conversation
    from app.formatting import Formatter

    formatter = Formatter(tokenizers["chatml"], 256)
    messages = [{"role": "user", "content": "Summarize."}, {"role": "assistant", "content": "w " * 10**6}]
    started = time.monotonic()
    rows = formatter.encode_rows(Conversation(messages, "data.jsonl:1"))
    assert len(rows) == 1 and len(rows[0].input_ids) == 256 and formatter.stats.truncated_examples == 1
    assert time.monotonic() - started < 60


# === class 7: tests that fail under load ==========================================================================


@pytest.mark.parametrize("wait", ["wait", "wait_for"])
def test_a_resume_helper_that_gives_up_kills_its_child(wait, tmp_path):
    """tests/test_resume.py's Job: a wait fails only on a stall (no progress), and never leaves the child running."""
    import sys

    from tests.test_resume import Job

    job = Job({"FT_OUTPUT_DIR": str(tmp_path)}, tmp_path / "child.log",
              argv=[sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"])
    with pytest.raises(AssertionError, match="no progress for 2 s"):
        if wait == "wait":
            job.wait(stall=2)
        else:
            job.wait_for(lambda: False, "a step that never comes", stall=2)
    assert job.proc.poll() is not None, "the child was left running"
    Job.running.remove(job)


def test_a_resume_helper_waits_as_long_as_the_child_progresses(tmp_path):
    import sys

    from tests.test_resume import Job

    script = "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(0.5)\n"
    job = Job({"FT_OUTPUT_DIR": str(tmp_path)}, tmp_path / "child.log", argv=[sys.executable, "-c", script])
    assert job.wait(stall=1.5) == 0  # 4 s in all, never 1.5 s without output
    Job.running.remove(job)
