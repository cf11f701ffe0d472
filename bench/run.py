"""The benchmark table: every (shape, mode, path) in a process of its own, one command for the whole table.

    python -m bench.run --out bench/results                       # 7B then 0.5B; bf16 and 4-bit; job and baseline
    python -m bench.run --out /tmp/b --shapes qwen2-7b --modes 4bit --paths job,job-fixed,baseline
    python -m bench.run --out /tmp/bench-cpu --shapes tiny --modes bf16 --warmup 1 --steps 2 \
        --micro-batch 2 --accum 1 --seq 512                       # CPU smoke test (about a minute)

What it does, in order (progress on stderr; the table is printed last on stdout):
  1. asks a subprocess for the card's name, driver and measured bf16 matmul peak (bench/peak.py); this process
     never touches CUDA, so every run sees the whole card free
  2. per shape, builds the random architecture-faithful model folder once (app.devmodel, on the GPU in bf16),
     just before the shape's first run
  3. writes the data file once, counted with the first model folder's tokenizer (bench/data.py): the same
     conversations for every run
  4. runs each configuration as `python -m bench.worker ...` with a timeout, its stderr in DIR/logs/NAME.log;
     a failed or timed-out run is a row marked so, never the end of the table
  5. after every run rewrites DIR/results.json and DIR/table.md (a call cut short still leaves the rows so far)

Paths: `job` (the job's default: auto micro-batch, same effective batch), `job-fixed` (the job at the baseline's
micro-batch and accumulation), `job-ckpt` (the same with FT_GRADIENT_CHECKPOINTING=true, as the baseline: the
memory criterion compares at the same micro-batch), `job-hf` (the job's default
with FT_BACKEND=hf: transformers + PEFT inside the job), `baseline`, and `baseline-noupcast` (4-bit: the baseline
without prepare_model_for_kbit_training's float32 cast of the non-quantised weights; a loss-parity diagnostic).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.flops import mfu, model_flops
from bench.table import ratios, render

REPO = Path(__file__).resolve().parent.parent
SHAPES = ["qwen2-7b", "qwen2-0.5b", "small", "tiny"]
MODES = ["bf16", "4bit"]
PATHS = ["job", "job-fixed", "job-ckpt", "job-hf", "baseline", "baseline-noupcast"]
LORA_R = 16
MIN_RUN_S = 60  # a run is not started with less of the --budget left than this
BUILD_TIMEOUT_S = 900  # one model folder (7B: random init on the GPU + ~15 GB of safetensors)
PROBE_TIMEOUT_S = 300


def _csv(choices: list[str]):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or text!r}: choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="results folder (results.json, table.md, logs/, runs/)")
    p.add_argument("--shapes", type=_csv(SHAPES), default=["qwen2-7b", "qwen2-0.5b"],
                   help="model shapes, run in this order (default: qwen2-7b,qwen2-0.5b: the acceptance shape first)")
    p.add_argument("--modes", type=_csv(MODES), default=["bf16", "4bit"], help="bf16 LoRA and/or 4-bit QLoRA")
    p.add_argument("--paths", type=_csv(PATHS), default=["job", "baseline"], help=", ".join(PATHS))
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps before the timed window (>= 1)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps in the timed window")
    p.add_argument("--micro-batch", type=int, default=2, help="baseline rows per micro-batch (B)")
    p.add_argument("--accum", type=int, default=4, help="baseline gradient accumulation (G); effective batch B x G")
    p.add_argument("--seq", type=int, default=2048, help="packed row length, tokens")
    p.add_argument("--job-micro-batch", type=int, default=None,
                   help="the `job` path at this fixed micro-batch instead of auto (effective batch kept)")
    p.add_argument("--job-backend", default="auto", choices=["auto", "unsloth", "hf"],
                   help="FT_BACKEND of the job paths (default auto: the job's own choice)")
    p.add_argument("--job-checkpointing", default="auto", choices=["auto", "true", "false"],
                   help="the job's FT_GRADIENT_CHECKPOINTING (auto: off when memory allows)")
    p.add_argument("--seed", type=int, default=3407, help="seed of both paths (LoRA init, data order)")
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/bench-models"), help="model folders, built once")
    p.add_argument("--timeout", type=int, default=420, help="seconds per run before it is killed")
    p.add_argument("--budget", type=int, default=None,
                   help="seconds for the whole command: later runs are skipped (and timeouts shortened) to end in time")
    p.add_argument("--no-peak", action="store_true", help="skip measuring the matmul peak (datasheet only)")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    return args


# --- subprocesses -------------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of every subprocess: offline (no hub on GPU hosts), unbuffered, the repo importable."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def run_logged(cmd: list[str], log_path: Path, timeout: float, extra_env: dict[str, str] | None = None,
               env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run cmd in its own process group, stderr appended to log_path; (exit code or None on timeout, stdout).
    On a timeout the whole group (the worker and the job it started) is killed. `env`: instead of child_env();
    `extra_env`: the FT_* settings of a job, over it (the caller's own FT_* variables are dropped first: the job
    would obey or refuse them)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = env or child_env()
    if extra_env is not None:
        env = {k: v for k, v in env.items() if not k.startswith("FT_")} | extra_env
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
            return proc.returncode, stdout
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, _ = proc.communicate()
            log.write(f"\n[bench.run] killed after {timeout:.0f}s\n")
            return None, stdout or ""
        except BaseException:  # Ctrl-C: leave no training process behind
            _kill_group(proc)
            raise


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this call created (start_new_session): the run alone
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def say(message: str) -> None:
    print(f"[bench.run {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- steps --------------------------------------------------------------------------------------------------


def probe_device(out: Path, measure: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.peak"] + ([] if measure else ["--no-measure"])
    code, stdout = run_logged(cmd, out / "logs" / "device.log", PROBE_TIMEOUT_S)
    if code == 0 and stdout.strip():
        return json.loads(stdout.strip().splitlines()[-1])
    if measure:  # the measurement failed: the facts without it still decide CUDA or not
        say("measuring the matmul peak failed (logs/device.log); datasheet peak only")
        return probe_device(out, measure=False)
    return {"cuda": False, "name": "unknown (probe failed: see logs/device.log)", "error": log_tail(out / "logs" / "device.log")}


def build_model(shape: str, models_dir: Path, cuda: bool, out: Path, timeout: float) -> tuple[Path | None, dict]:
    """The shape's model folder via app.devmodel's CLI, in a subprocess (it initialises on the GPU)."""
    dtype = "bfloat16" if cuda else None
    folder = models_dir / f"{shape}-chatml-{dtype or 'float32'}"
    cmd = [sys.executable, "-m", "app.devmodel", "--out", str(folder), "--shape", shape, "--family", "chatml",
           "--device", "cuda" if cuda else "cpu"] + (["--dtype", dtype] if dtype else [])
    started = time.monotonic()
    code, _ = run_logged(cmd, out / "logs" / f"build-{shape}.log", timeout)
    info = {"path": str(folder), "build_s": round(time.monotonic() - started, 1), "dtype": dtype or "float32"}
    if code != 0:
        info["error"] = ("timed out" if code is None else f"exit {code}") + ": " + log_tail(out / "logs" / f"build-{shape}.log")
        return None, info
    return folder, info


def build_data(args: argparse.Namespace, data_path: Path, model: Path):
    """The data file for every run, sized for (warmup + steps) x B x G packed rows (bench/data.py)."""
    from app.tokenizer import tokenizer_of  # CPU only: this process never initialises CUDA
    from bench.data import build

    rows_needed = (args.warmup + args.steps) * args.micro_batch * args.accum
    stats = build(data_path, seq=args.seq, rows=rows_needed, tokenizer=tokenizer_of(model))
    say(f"data: {stats.conversations} conversations, {stats.tokens:,} tokens (for {rows_needed} rows of "
        f"{args.seq}), mean attended context {stats.ctx_mean:.0f} tokens")
    return stats


def worker_cmd(args: argparse.Namespace, path: str, mode: str, model: Path, data: Path, out_json: Path,
               keep_dir: Path) -> list[str]:
    baseline = path.startswith("baseline")
    cmd = [sys.executable, "-m", "bench.worker", "--path", "baseline" if baseline else "job",
           "--model", str(model), "--mode", mode, "--data", str(data), "--seq", str(args.seq),
           "--micro-batch", str(args.micro_batch), "--accum", str(args.accum), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--out", str(out_json), "--seed", str(args.seed)]
    if path == "baseline-noupcast":
        cmd += ["--no-kbit-upcast"]
    if not baseline:
        cmd += ["--job-backend", "hf" if path == "job-hf" else args.job_backend, "--keep-dir", str(keep_dir),
                "--job-checkpointing", args.job_checkpointing]
        micro = args.micro_batch if path in ("job-fixed", "job-ckpt") else args.job_micro_batch
        if micro:
            cmd += ["--job-micro-batch", str(micro)]
        if path == "job-ckpt":
            cmd[cmd.index("--job-checkpointing") + 1] = "true"
    return cmd


def run_one(args: argparse.Namespace, row: dict[str, Any], model: Path, data: Path, timeout: float) -> dict[str, Any]:
    name = f"{row['shape']}-{row['mode']}-{row['path']}"
    log_path = args.out / "logs" / f"{name}.log"
    out_json = args.out / "runs" / f"{name}.json"
    out_json.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)
    cmd = worker_cmd(args, row["path"], row["mode"], model, data, out_json, args.out / "runs" / name)
    started = time.monotonic()
    code, stdout = run_logged(cmd, log_path, timeout)
    row["log"] = str(log_path.relative_to(args.out))
    row["wall_s"] = round(time.monotonic() - started, 1)
    result = None
    if out_json.exists():
        result = json.loads(out_json.read_text())
    else:
        line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith("BENCH_RESULT ")), None)
        result = json.loads(line.removeprefix("BENCH_RESULT ")) if line else None
    if code is None:
        row.update(status="failed", error=f"timed out after {timeout:.0f}s; log tail:\n{log_tail(log_path)}")
    elif result is None:
        row.update(status="failed", error=f"worker exit {code}, no result; log tail:\n{log_tail(log_path)}")
    else:
        row.update({k: v for k, v in result.items() if k not in ("path", "mode")})
    return row


def add_mfu(row: dict[str, Any], model: Path, ctx_mean: float, device: dict[str, Any]) -> None:
    flops = model_flops(model, LORA_R, ctx_mean)
    row["flops_per_token"] = flops.as_dict() if flops else None
    if not device.get("cuda") or row.get("status") != "ok":
        row["mfu_measured"] = row["mfu_datasheet"] = None
        return
    row["mfu_measured"] = mfu(row.get("tokens_per_second"), flops, device.get("measured_bf16_tflops"))
    row["mfu_datasheet"] = mfu(row.get("tokens_per_second"), flops, device.get("datasheet_bf16_tflops"))


def write_outputs(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    for row in rows:
        row.update({k: v for k, v in ratios(row, rows).items()})
    table = render(meta, rows)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    os.replace(tmp, out / "results.json")
    (out / "table.md").write_text(table)
    return table


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs in the order asked for: shapes first (the first shape listed is the most important), then modes,
    then paths."""
    return [{"shape": s, "mode": m, "path": p} for s in args.shapes for m in args.modes for p in args.paths]


@dataclass
class Session:
    """What the runs of one command share: the clock, the device, the model folders, the data."""

    args: argparse.Namespace
    meta: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    models: dict[str, Path | None] = field(default_factory=dict)
    stats: Any = None  # bench.data.DataStats, once written

    @property
    def cuda(self) -> bool:
        return bool(self.meta["device"].get("cuda"))

    def left(self) -> float | None:
        """Seconds left of --budget (None: no budget)."""
        return None if self.args.budget is None else self.args.budget - (time.monotonic() - self.started)

    def model(self, shape: str) -> Path | None:
        if shape not in self.models:
            say(f"building the {shape} model in {self.args.models_dir}")
            left = self.left()
            timeout = BUILD_TIMEOUT_S if left is None else min(BUILD_TIMEOUT_S, left)
            self.models[shape], self.meta["models"][shape] = build_model(
                shape, self.args.models_dir, self.cuda, self.args.out, timeout)
            say(f"model {shape}: {self.meta['models'][shape]}")
        return self.models[shape]

    def data(self, model: Path):
        if self.stats is None:  # once, with the first model folder's tokenizer (the same in every shape)
            self.stats = build_data(self.args, self.args.out / "data.jsonl", model)
            self.meta["data"] = self.stats.as_dict()
        return self.stats


def run_row(session: Session, row: dict[str, Any]) -> None:
    """Fill one row: skipped (4-bit without CUDA, out of budget), failed, or measured."""
    args = session.args
    if row["mode"] == "4bit" and not session.cuda:
        row.update(status="skipped", reason="4-bit QLoRA needs a CUDA GPU (bitsandbytes NF4); none here")
        return
    if row["path"] == "baseline-noupcast" and row["mode"] != "4bit":
        row.update(status="skipped", reason="the same run as `baseline` outside 4-bit (nothing is upcast)")
        return
    out_of_time = f"out of the --budget of {args.budget}s"
    if (left := session.left()) is not None and left < MIN_RUN_S:
        row.update(status="skipped", reason=f"{out_of_time} ({left:.0f}s left)")
        return
    model = session.model(row["shape"])
    if model is None:
        row.update(status="failed", error=f"model build failed: {session.meta['models'][row['shape']].get('error')}")
        return
    stats = session.data(model)
    if (left := session.left()) is not None and left < MIN_RUN_S:
        row.update(status="skipped", reason=f"{out_of_time} ({left:.0f}s left)")
        return
    timeout = args.timeout if left is None else min(args.timeout, left - 5)
    say(f"{row['shape']} {row['mode']} {row['path']}: running (timeout {timeout:.0f}s)")
    run_one(args, row, model, args.out / "data.jsonl", timeout)
    add_mfu(row, model, stats.ctx_mean, session.meta["device"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from app.result import versions

    meta: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv),
        "versions": {k: v for k, v in versions().items() if k in
                     ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth")},
        "setup": {"seq": args.seq, "warmup": args.warmup, "steps": args.steps, "micro_batch": args.micro_batch,
                  "accum": args.accum, "effective_batch": args.micro_batch * args.accum, "lora_r": LORA_R,
                  "job_backend": args.job_backend, "job_micro_batch": args.job_micro_batch,
                  "job_checkpointing": args.job_checkpointing, "seed": args.seed},
        "models": {},
    }
    session = Session(args, meta)
    say("device probe" + ("" if args.no_peak else " and bf16 matmul peak"))
    device = meta["device"] = probe_device(args.out, measure=not args.no_peak)
    say(f"device: {device.get('name')}; bf16 peak measured {device.get('measured_bf16_tflops')} / datasheet "
        f"{device.get('datasheet_bf16_tflops')} TFLOP/s")

    rows = plan(args)
    try:
        for index, row in enumerate(rows, start=1):
            run_row(session, row)
            label = f"[{index}/{len(rows)}] {row['shape']} {row['mode']} {row['path']}"
            if row["status"] == "ok":
                say(f"{label}: {row['tokens_per_second']:,.0f} tok/s, peak {row.get('peak_memory_gib')} GiB, "
                    f"loss {row.get('loss_last')}, {row.get('wall_s')}s")
            else:
                reason = (row.get("error") or row.get("reason") or "").splitlines()
                say(f"{label}: {row['status']}: {reason[0][:300] if reason else ''}")
            write_outputs(args.out, meta, [r for r in rows if "status" in r])
    except KeyboardInterrupt:
        say("interrupted: writing the rows so far")
    done = [r for r in rows if "status" in r]
    meta["wall_s"] = round(time.monotonic() - session.started, 1)
    table = write_outputs(args.out, meta, done)
    say(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'} in {meta['wall_s']}s")
    print(table, flush=True)
    return 0 if len(done) == len(rows) and all(r["status"] in ("ok", "skipped") for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
