"""The published research run end to end: from process start to the saved adapter, one process per path.

    python -m bench.e2e --out bench/results-e2e                    # Qwen2-7B shape: job, plain TRL, OpenWeights-style
    python -m bench.e2e --out /tmp/e2e --shape tiny --paths job,plain   # CPU smoke test

The run is the code preset (env/code.env: r 8, alpha 16, lr 2e-5 cosine, warmup 10, batch 16 x 1, no packing,
one epoch, seed 3407) on 717 conversations, the size of the published code data, cycled from data/sample/ (a
few hundred tokens each: the same length distribution). Every path trains the same file on the same random
architecture-faithful model folder (app.devmodel), in a process of its own, timed from spawn to exit:

  job          `python -m app train` with env/code.env, as users run it
  job-warm     the job again, after `job`, with the compile caches it left (the image keeps them on /cache)
  job-padfree  the same with FT_PADDING_FREE=true (unpacked rows flattened instead of padded)
  job-padded   the same with FT_PADDING_FREE=false (rows padded to the longest of their micro-batch)
  job-ckpt     the same with FT_GRADIENT_CHECKPOINTING=true
  job-hf       the same with FT_BACKEND=hf (transformers + PEFT inside the job)
  job-hf-pf    the hf backend with FT_PADDING_FREE=true (its FlashAttention-2 varlen kernel, app/attention.py)
  job-4bit     the job on a 4-bit (NF4) base: FT_LOAD_IN_4BIT=true
  job-4bit-padded   the same with FT_PADDING_FREE=false (the 4-bit run of issue 18's table, padded rows)
  plain        transformers + PEFT + TRL SFTTrainer as a careful user writes it, the same rows (bench/plain.py)
  ow           unsloth + TRL through openweights 0.14.0's own training code (its jobs/unsloth/training.py:
               train(), run on a validated_params of the same settings; bench/ow_style.py)

Every path starts with compile caches of its own, empty (Triton, Inductor, unsloth's generated modules; `job-warm`
reuses `job`'s), and with `--drop-caches` (root) the kernel's page cache is dropped before each path: a first run
on a fresh machine, the model read from disk. Each row reports its time to the first optimizer step, its training time, its final train loss, its peak GPU
memory (the job's: beside its preflight estimate) and its wall time relative to the job's. The table is printed
last and written to DIR/table.md, every detail to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.run import build_model, log_tail, probe_device, run_logged, say

REPO = Path(__file__).resolve().parent.parent
PATHS = ["job", "job-warm", "job-padfree", "job-padded", "job-ckpt", "job-hf", "job-hf-pf", "job-4bit",
         "job-4bit-padded", "plain", "ow"]
JOB_VARIANTS = {"job": {}, "job-warm": {}, "job-padfree": {"FT_PADDING_FREE": "true"},
                "job-padded": {"FT_PADDING_FREE": "false"},
                "job-ckpt": {"FT_GRADIENT_CHECKPOINTING": "true"}, "job-hf": {"FT_BACKEND": "hf"},
                "job-hf-pf": {"FT_BACKEND": "hf", "FT_PADDING_FREE": "true"}, "job-4bit": {"FT_LOAD_IN_4BIT": "true"},
                "job-4bit-padded": {"FT_LOAD_IN_4BIT": "true", "FT_PADDING_FREE": "false"}}
PRESET = REPO / "env" / "code.env"
CONVERSATIONS = 717  # the published code data's size


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env preset (comments and blanks skipped), as Compose and `set -a; .` read them."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def code_like_data(out: Path, count: int = CONVERSATIONS, seed: int = 3407,
                   source: Path = REPO / "data" / "sample" / "train.jsonl") -> Path:
    """`count` conversations cycled from `source`, each repetition shuffled with its own seed."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    chosen: list[str] = []
    repetition = 0
    while len(chosen) < count:
        order = list(lines)
        random.Random(seed + repetition).shuffle(order)
        chosen += order[: count - len(chosen)]
        repetition += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return out


def command(path: str, model: Path, data: Path, run_dir: Path, ow_dir: Path | None,
            max_steps: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The command and the extra environment of one path."""
    preset = read_env_file(PRESET)
    if path.startswith("job"):
        env = {k: v for k, v in preset.items() if k.startswith("FT_")}
        env.update(FT_MODEL=str(model), FT_TRAINING_FILE=str(data), FT_OUTPUT_DIR=str(run_dir), **JOB_VARIANTS[path])
        if max_steps:
            env["FT_MAX_STEPS"] = str(max_steps)
        return [sys.executable, "-m", "app", "train"], env
    module = {"plain": "bench.plain", "ow": "bench.ow_style"}[path]
    cmd = [sys.executable, "-m", module, "--model", str(model), "--data", str(data), "--preset", str(PRESET),
           "--out", str(run_dir)] + (["--max-steps", str(max_steps)] if max_steps else [])
    if path == "ow":
        cmd += ["--ow-dir", str(ow_dir)]
    return cmd, {}


def job_row(run_dir: Path) -> dict[str, Any]:
    result = json.loads((run_dir / "result.json").read_text())
    outputs = result.get("outputs", {})
    return {
        "status": "ok" if result.get("status") == "completed" else "failed",
        "error": (result.get("error") or {}).get("message"), "backend": result.get("backend"),
        "first_step_s": outputs.get("time_to_first_step_s"), "startup_s": outputs.get("startup_s"),
        "train_s": outputs.get("train_runtime"), "tokens_per_second": outputs.get("tokens_per_second"),
        "train_tokens": outputs.get("train_tokens"), "loss": outputs.get("train_loss"),
        "global_step": outputs.get("global_step"), "peak_gib": outputs.get("peak_gpu_memory_gb"),
        "estimate_gib": outputs.get("estimated_peak_gpu_memory_gb"), "micro_batch": outputs.get("micro_batch"),
        "checkpointing": outputs.get("gradient_checkpointing"), "padding_free": None,
        "adjustments": result.get("adjustments"),
    }


def run_path(args: argparse.Namespace, path: str, model: Path, data: Path, timeout: float) -> dict[str, Any]:
    run_dir = args.out / "runs" / path
    log_path = args.out / "logs" / f"{path}.log"
    log_path.unlink(missing_ok=True)
    cmd, extra = command(path, model, data, run_dir, args.ow_dir, args.max_steps)
    caches = args.out / "caches" / ("job" if path == "job-warm" else path)
    extra.update(TRITON_CACHE_DIR=str(caches / "triton"), TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"),
                 UNSLOTH_COMPILE_LOCATION=str(caches / "unsloth"))
    if args.drop_caches:
        drop_page_cache()
    env_line = " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items())
    say(f"{path}: {env_line} {shlex.join(cmd)}".strip())
    started = time.monotonic()
    code, stdout = run_logged(cmd, log_path, timeout, extra_env=extra)
    row: dict[str, Any] = {"path": path, "wall_s": round(time.monotonic() - started, 1), "exit": code,
                           "log": str(log_path.relative_to(args.out))}
    try:
        if path.startswith("job"):
            row.update(job_row(run_dir))
        else:
            line = next(ln for ln in reversed(stdout.splitlines()) if ln.startswith("BENCH_RESULT "))
            row.update(json.loads(line.removeprefix("BENCH_RESULT ")))
    except (OSError, StopIteration, ValueError) as err:
        row.update(status="failed", error=f"exit {code}, no result ({type(err).__name__}); log tail:\n{log_tail(log_path)}")
    if code is None:
        row.update(status="failed", error=f"timed out after {timeout:.0f}s; log tail:\n{log_tail(log_path)}")
    return row


def drop_page_cache() -> None:
    """The kernel's clean page cache dropped (root): the next process reads its libraries and weights from disk."""
    import os

    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        say(f"could not drop the page cache ({err}): this row reads from a warm cache")


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    job = next((r for r in rows if r["path"] == "job" and r.get("status") == "ok"), None)

    def cell(value, fmt="{:.1f}"):
        return "–" if value is None else fmt.format(value)

    lines = [f"End to end: {meta['run']} on {meta['shape']} ({meta['device'].get('name')}, driver "
             f"{meta['device'].get('driver')}), {meta['date']}",
             f"`{meta['command']}`", "",
             "| path | wall s | to first step s | train s | tok/s | steps | train loss | peak GiB (estimate) | "
             "ckpt | wall vs job |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['path']} | {cell(r.get('wall_s'))} | failed: "
                         f"{(r.get('error') or '').splitlines()[0][:120] if r.get('error') else ''} | | | | | | | |")
            continue
        peak = cell(r.get("peak_gib"), "{:.1f}") + (f" ({r['estimate_gib']:.1f})" if r.get("estimate_gib") else "")
        ratio = f"{r['wall_s'] / job['wall_s']:.2f}x" if job else "–"
        name = r["path"] + (f" ({r['backend']})" if r.get("backend") else "")
        lines.append(f"| {name} | {r['wall_s']:.1f} | {cell(r.get('first_step_s'))} | {cell(r.get('train_s'))} | "
                     f"{cell(r.get('tokens_per_second'), '{:,.0f}')} | {cell(r.get('global_step'), '{}')} | "
                     f"{cell(r.get('loss'), '{:.4f}')} | {peak} | {cell(r.get('checkpointing'), '{}')} | {ratio} |")
    lines += ["", "wall: spawn to exit (imports, data, model load, training, save); to first step: from the process's "
              "start to the end of optimizer step 1; train: the trainer's train_runtime; peak: "
              "torch.cuda.max_memory_allocated (the job's estimate from its preflight, in brackets)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shape", default="qwen2-7b", help="app.devmodel shape (qwen2-7b; tiny for a CPU smoke test)")
    p.add_argument("--paths", default="job,plain,ow", help=",".join(PATHS))
    p.add_argument("--conversations", type=int, default=CONVERSATIONS)
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/bench-models"))
    p.add_argument("--ow-dir", type=Path, default=None,
                   help="openweights 0.14.0's jobs/unsloth folder (from its wheel: pip download openweights==0.14.0)")
    p.add_argument("--max-steps", type=int, default=None, help="stop every path after this many optimizer steps")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before each path (root)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per path")
    p.add_argument("--budget", type=int, default=None, help="seconds for the whole command")
    args = p.parse_args(argv)
    args.paths = [x for x in args.paths.split(",") if x]
    if bad := [x for x in args.paths if x not in PATHS]:
        p.error(f"unknown paths {bad}; choose from {PATHS}")
    if "ow" in args.paths and args.ow_dir is None:
        p.error("--paths ow needs --ow-dir")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "shape": args.shape,
                            "command": "python -m bench.e2e " + shlex.join(sys.argv[1:] if argv is None else argv),
                            "run": f"the code preset (env/code.env), {args.conversations} conversations"
                                   + (f", {args.max_steps} steps" if args.max_steps else "")
                                   + (", page cache dropped before each path" if args.drop_caches else "")}
    meta["device"] = probe_device(args.out, measure=False)
    model, meta["model"] = build_model(args.shape, args.models_dir, bool(meta["device"].get("cuda")), args.out, 900)
    if model is None:
        say(f"model build failed: {meta['model']}")
        return 1
    data = code_like_data(args.out / "code-like.jsonl", args.conversations)
    rows: list[dict[str, Any]] = []
    for path in args.paths:
        left = None if args.budget is None else args.budget - (time.monotonic() - started)
        if left is not None and left < 30:
            rows.append({"path": path, "status": "skipped", "error": f"out of the --budget ({left:.0f}s left)"})
            continue
        rows.append(run_path(args, path, model, data, args.timeout if left is None else min(args.timeout, left - 5)))
        row = rows[-1]
        say(f"{path}: {row.get('status')} wall {row.get('wall_s')}s first step {row.get('first_step_s')}s "
            f"train {row.get('train_s')}s loss {row.get('loss')}")
        table = render(meta, rows)
        (args.out / "table.md").write_text(table)
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    print(table, flush=True)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
