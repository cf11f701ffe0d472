"""The benchmark harness (bench/) on the CPU: one `python -m bench.run` table of the tiny shape.

The GPU numbers in docs/BENCHMARKS.md come from this harness; here it runs where CI runs, so a harness that
stopped comparing like with like fails before the next GPU session. On the CPU both paths train in fp32
with the same data, seed and LoRA initialisation, so the job (`python -m app train`) and plain
transformers + PEFT + TRL must log the same loss at every step.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "bench.run", "--out", str(out), "--models-dir", str(out / "models"),
           "--shapes", "tiny", "--modes", "bf16,4bit", "--paths", "job,job-ckpt,baseline,baseline-noupcast",
           "--warmup", "1", "--steps", "2", "--micro-batch", "2", "--accum", "1", "--seq", "512"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "table.md").read_text()


def _rows(results: dict) -> dict[tuple[str, str], dict]:
    return {(row["mode"], row["path"]): row for row in results["rows"]}


def test_every_row_is_measured_or_skipped_with_its_reason(table):
    rows = _rows(table[0])
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {("bf16", "job"), ("bf16", "job-ckpt"),
                                                                    ("bf16", "baseline")}
    assert "needs a CUDA GPU" in rows[("4bit", "job")]["reason"]
    assert "same run as `baseline`" in rows[("bf16", "baseline-noupcast")]["reason"]
    ckpt = rows[("bf16", "job-ckpt")]
    assert ckpt["gradient_checkpointing"] is True and ckpt["micro_batch"] == 2
    assert ckpt["ft_env"]["FT_GRADIENT_CHECKPOINTING"] == "true"


def test_the_job_and_the_baseline_train_the_same_model_on_the_same_tokens(table):
    rows = _rows(table[0])
    job, ckpt, base = rows[("bf16", "job")], rows[("bf16", "job-ckpt")], rows[("bf16", "baseline")]
    for row in (job, ckpt):
        assert [s["tokens"] for s in row["steps"]] == [s["tokens"] for s in base["steps"]]
        assert [s["loss"] for s in row["steps"]] == pytest.approx([s["loss"] for s in base["steps"]], rel=1e-5)
        assert row["effective_batch"] == base["effective_batch"] == 2
    assert job["speedup"] == pytest.approx(job["tokens_per_second"] / base["tokens_per_second"])
    assert job["loss_delta"] == pytest.approx(0, abs=1e-4)


def test_the_table_names_the_command_and_compares_each_row_with_its_baseline(table):
    results, markdown = table
    assert results["meta"]["command"].startswith("python -m bench.run ")
    assert "| tiny | bf16 | job (hf) |" in markdown and "(+0.0000)" in markdown
    assert "- tiny 4bit job: skipped: 4-bit QLoRA needs a CUDA GPU" in markdown


def test_end_to_end_rows_train_the_same_run_and_time_it_whole(tmp_path):
    """bench/e2e.py: the job and plain TRL run the code preset on the same file, each timed from spawn to exit;
    same step count, and on the CPU the same loss (same rows, LoRA B starts at zero)."""
    out = tmp_path / "e2e"
    cmd = [sys.executable, "-m", "bench.e2e", "--out", str(out), "--shape", "tiny", "--models-dir",
           str(tmp_path / "models"), "--paths", "job,plain", "--conversations", "32", "--max-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["path"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    job, plain = rows["job"], rows["plain"]
    assert job["status"] == plain["status"] == "ok"
    assert job["global_step"] == plain["global_step"] == 2
    assert job["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    for row in (job, plain):
        assert 0 < row["first_step_s"] < row["wall_s"] and 0 < row["train_s"] < row["wall_s"]
    table = (out / "table.md").read_text()
    assert "| job (hf) |" in table and "| plain |" in table and "1.00x" in table


def test_the_profile_times_every_phase_of_each_sweep_line(tmp_path):
    """bench/profile.py: the grid's first lines in one process on one shared base, each phase timed through the
    job's own functions. The phases are disjoint parts of a line: together no longer than its wall time, training
    the largest, and the base loaded once (the second line's `base` phase only checks the held one)."""
    out = tmp_path / "profile"
    cmd = [sys.executable, "-m", "bench.profile", "--out", str(out), "--shape", "tiny", "--models-dir",
           str(tmp_path / "models"), "--conversations", "32", "--lines", "2", "--profile-line", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "profile.json").read_text())
    assert [row["exit_code"] for row in result["lines"]] == [0, 0]
    phases = ["prepare", "base", "lora", "trainer", "train", "save", "finish", "release"]
    for row in result["lines"]:
        assert set(phases) <= set(row["phases"]), row["phases"]
        assert sum(row["phases"][p] for p in phases) <= row["wall_s"]
        assert max(phases, key=row["phases"].get) == "train"
        assert len(row["steps"]) == 2 and sum(row["steps"]) < row["phases"]["train"]
    first, second = result["lines"]
    assert second["phases"]["base"] < first["phases"]["base"]  # the held base, not a second load
    assert "run_line" in result["cprofile"]
    table = (out / "profile.md").read_text()
    assert table.count("\n| 0 |") == table.count("\n| 1 |") == 1
