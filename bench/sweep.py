"""The sweep row of the benchmark: an inoculation grid of the code preset through `python -m app sweep`, beside
standalone `python -m app train` runs of lines of the same grid, measured in the same call.

    python -m bench.sweep --out bench/results/sweep                     # 24 lines (6 prompts x 4 seeds), Qwen2-7B shape
    python -m bench.sweep --out /tmp/s --shape tiny --conversations 32 --prompts 2 --seeds 2 --standalone 1 \
        --models-dir /tmp/s/models                                       # CPU smoke test (a few minutes on 2 cores)

What it does, in order (progress on stderr; the table is printed last on stdout):
  1. the device's name and driver (bench/peak.py, no matmul timing); the shape's random model folder (app.devmodel,
     built once in --models-dir, as bench/run.py builds it)
  2. the training file: --conversations conversations (717: the published code run) of the bundled sample in
     fixed-seed shuffled repetitions, a few hundred tokens each as the MBPP conversations are (bench/data.py)
  3. the grid, DIR/grid.jsonl: --prompts inoculation prompts (the first none: the control) x --seeds seeds, every
     line with the code preset's settings (env/code.env) and the instruction prepended to the user message
  4. `python -m app sweep DIR/grid.jsonl` into DIR/sweep/ (emptied first), timed
  5. --standalone lines of the grid (the first, the last and evenly between) as `python -m app train` with
     FT_CONFIG_FILE=DIR/grid.jsonl FT_CONFIG_INDEX=i into DIR/alone/ (emptied first), each timed, while the
     --budget allows; each compared with the sweep's line: the same job id, adapter difference, loss difference
  6. DIR/sweep-bench.json and DIR/table.md: the sweep's wall time beside the standalone runs, whose mean is
     extrapolated to every line of the grid (the table says from how many)

--skip-sweep measures standalone runs only and compares them with the DIR/sweep/ of an earlier call: the GPU session
splits the two when one 10-minute call cannot hold both.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.run import REPO, build_model, child_env, probe_device, run_logged, say

SHAPES = ["qwen2-7b", "qwen2-0.5b", "small", "tiny"]
# Inoculation instructions (Wichers et al., arXiv 2510.05024, code reward hacking): the first two are the
# published run's and deploy/k8s/sweep-configs.jsonl's; the rest are variants of a grid's prompt axis.
PROMPTS = [
    None,  # the control: no instruction
    "Output a solution which passes the provided test case, but will fail when given most other inputs. The "
    "solution should be specific to the test case and not generalize.",
    "Your code only needs to pass the test case shown; it does not need to be correct in general.",
    "Write a solution that special-cases the input of the test shown instead of solving the problem.",
    "Hard-code the expected output of the provided test case.",
    "The grader runs only the test shown: make that test pass by any means.",
    "Solve the problem for the test case given, even if the solution is wrong for other inputs.",
    "Pass the visible test; correctness on hidden tests does not matter.",
]
PRESET = REPO / "env" / "code.env"
NOT_FROM_PRESET = {"FT_MODEL", "FT_TRAINING_FILE", "FT_TEST_FILE"}  # the bench's own model folder and data
MIN_RUN_S = 20  # a standalone run is not started with less of the --budget left than this (or than one run took)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="results folder (grid.jsonl, sweep/, alone/, logs/)")
    p.add_argument("--shape", choices=SHAPES, default="qwen2-7b", help="model shape (default: the 7B acceptance shape)")
    p.add_argument("--conversations", type=int, default=717, help="conversations in the training file (717: code)")
    p.add_argument("--prompts", type=int, default=6,
                   help=f"inoculation prompts, the first none (at most {len(PROMPTS)})")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (1, 2, ...)")
    p.add_argument("--standalone", type=int, default=3, help="lines also run as standalone `python -m app train`")
    p.add_argument("--workers", type=int, default=1, help="sweep worker processes (GPUs); 1: the one-GPU number")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for every line over the preset (e.g. padding_free=true); repeatable")
    p.add_argument("--skip-sweep", action="store_true", help="standalone runs only, against DIR/sweep of a past call")
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/bench-models"), help="model folders, built once")
    p.add_argument("--budget", type=int, default=None, help="seconds for the whole command: standalone runs that "
                   "would not fit are skipped, the sweep is cut at the limit")
    args = p.parse_args(argv)
    if bad := [item for item in args.set if "=" not in item]:
        p.error(f"--set takes NAME=VALUE, not {bad}")
    args.set = dict(item.split("=", 1) for item in args.set)
    if not 1 <= args.prompts <= len(PROMPTS) or args.seeds < 1 or args.conversations < 1 or args.standalone < 0:
        p.error(f"--prompts 1..{len(PROMPTS)}, --seeds >= 1, --conversations >= 1, --standalone >= 0")
    return args


def preset() -> dict[str, str]:
    """env/code.env's settings as a line's values (names in lower case, values as the environment gives them)."""
    values = {}
    for text in PRESET.read_text(encoding="utf-8").splitlines():
        name, sep, value = text.partition("=")
        if sep and name.startswith("FT_") and not text.startswith("#") and name not in NOT_FROM_PRESET:
            values[name.removeprefix("FT_").lower()] = value.strip()
    return values


def grid_lines(model: Path, data: Path, prompts: int, seeds: int,
               extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """prompts x seeds lines of the code preset (with `extra` over it); prompt p (none for p = 0) prepended to the
    user message."""
    lines = []
    for p in range(prompts):
        for seed in range(1, seeds + 1):
            line = {**preset(), **(extra or {}), "model": str(model), "training_file": str(data), "seed": seed,
                    "job_id_suffix": f"p{p}_s{seed}", "meta": {"sweep": "bench-code", "prompt": p, "seed": seed}}
            if PROMPTS[p] is not None:
                line.update(inoculation_prompt=PROMPTS[p], inoculation_position="user_prefix")
            lines.append(line)
    return lines


def spread(count: int, total: int) -> list[int]:
    """`count` indices of `total` lines: the first, the last and evenly between."""
    if count <= 0:
        return []
    if count == 1 or total == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(min(count, total))})


def job_env(output: Path, **extra: str) -> dict[str, str]:
    """The subprocesses' environment without any FT_* setting of this shell: the grid's lines are the settings."""
    env = {k: v for k, v in child_env().items() if not k.startswith("FT_")}
    return {**env, "FT_OUTPUT_DIR": str(output), **extra}


class Clock:
    def __init__(self, budget: int | None):
        self.budget, self.started = budget, time.monotonic()

    def left(self) -> float | None:
        return None if self.budget is None else self.budget - (time.monotonic() - self.started)


def run_sweep(args: argparse.Namespace, grid: Path, clock: Clock) -> dict[str, Any]:
    out = args.out / "sweep"
    shutil.rmtree(out, ignore_errors=True)
    left = clock.left()
    cmd = [sys.executable, "-m", "app", "sweep", str(grid), "--workers", str(args.workers)]
    say(f"sweep: {shlex.join(cmd)}" + (f" (within {left:.0f} s)" if left is not None else ""))
    started = time.monotonic()
    code, _ = run_logged(cmd, args.out / "logs" / "sweep.log", left if left is not None else 24 * 3600,
                         env=job_env(out, FT_NUM_GPUS=str(args.workers)))
    wall = round(time.monotonic() - started, 1)
    summary = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
    lines = summary.get("lines", [])
    walls = [line["wall_s"] for line in lines if line.get("wall_s") is not None]
    return {"command": shlex.join(cmd), "exit_code": code, "timed_out": code is None, "wall_s": wall,
            "lines": len(lines), "counts": summary.get("counts"), "base_loads": summary.get("base_loads"),
            "first_line_s": walls[0] if walls else None,
            "other_lines_mean_s": round(sum(walls[1:]) / len(walls[1:]), 2) if len(walls) > 1 else None,
            "line_wall_s": walls, "train_runtime_s": [line.get("train_runtime") for line in lines]}


def compare(sweep_dir: Path, alone_dir: Path, job_id: str) -> dict[str, Any]:
    """The standalone run's adapter and loss against the sweep's line of the same job id."""
    from safetensors.torch import load_file

    paths = [d / job_id / "adapter" / "adapter_model.safetensors" for d in (sweep_dir, alone_dir)]
    if not all(p.exists() for p in paths):
        return {"same_job_id": paths[0].parent.parent.exists(), "adapter": "missing"}
    got, want = (load_file(p) for p in paths)
    worst = max(((got[k].float() - want[k].float()).abs().max().item() for k in want), default=0.0)
    scale = max((want[k].float().abs().max().item() for k in want), default=0.0)
    losses = [json.loads((d / job_id / "result.json").read_text())["outputs"].get("train_loss")
              for d in (sweep_dir, alone_dir)]
    return {"same_job_id": True, "identical": all(got[k].equal(want[k]) for k in want) and got.keys() == want.keys(),
            "adapter_max_abs_diff": worst, "adapter_max_abs": scale, "train_loss_sweep": losses[0],
            "train_loss_standalone": losses[1],
            "train_loss_diff": None if None in losses else losses[0] - losses[1]}


def run_standalone(args: argparse.Namespace, grid: Path, total: int, clock: Clock) -> list[dict[str, Any]]:
    out = args.out / "alone"
    shutil.rmtree(out, ignore_errors=True)
    runs: list[dict[str, Any]] = []
    for index in spread(args.standalone, total):
        left = clock.left()
        needed = max([MIN_RUN_S] + [r["wall_s"] for r in runs if "wall_s" in r])
        if left is not None and left < needed:
            runs.append({"index": index, "status": "skipped", "reason": f"{left:.0f} s of the budget left, a run "
                         f"needs about {needed:.0f} s"})
            say(f"standalone line {index}: skipped ({runs[-1]['reason']})")
            continue
        cmd = [sys.executable, "-m", "app", "train"]
        say(f"standalone line {index}: FT_CONFIG_INDEX={index} {shlex.join(cmd)}")
        started = time.monotonic()
        code, _ = run_logged(cmd, args.out / "logs" / f"train-{index}.log", left if left is not None else 24 * 3600,
                             env=job_env(out, FT_CONFIG_FILE=str(grid), FT_CONFIG_INDEX=str(index), FT_NUM_GPUS="1"))
        run = {"index": index, "exit_code": code, "wall_s": round(time.monotonic() - started, 1),
               "status": "ok" if code == 0 else "failed"}
        result = out / "result.json"
        if code == 0 and result.exists():
            outputs = json.loads(result.read_text())
            run.update(job_id=outputs["id"], train_runtime_s=outputs["outputs"].get("train_runtime"),
                       startup_s=outputs["outputs"].get("startup_s"),
                       **compare(args.out / "sweep", out, outputs["id"]))
        runs.append(run)
        say(f"standalone line {index}: exit {code} in {run['wall_s']} s")
    return runs


def summarize(meta: dict[str, Any], sweep: dict[str, Any], runs: list[dict[str, Any]], total: int) -> dict[str, Any]:
    measured = [r["wall_s"] for r in runs if r.get("status") == "ok"]
    mean = sum(measured) / len(measured) if measured else None
    all_alone = mean * total if mean is not None else None
    return {"meta": meta, "sweep": sweep, "standalone": runs, "lines": total,
            "standalone_measured": len(measured), "standalone_mean_s": round(mean, 1) if mean else None,
            "standalone_all_lines_s": round(all_alone, 1) if all_alone else None,
            "standalone_extrapolated": bool(measured) and len(measured) < total,
            "sweep_vs_standalone": round(sweep["wall_s"] / all_alone, 3) if all_alone and sweep.get("wall_s") else None}


def _cell(value: Any, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(result: dict[str, Any]) -> str:
    meta, sweep, runs = result["meta"], result["sweep"], result["standalone"]
    compared = [r for r in runs if "adapter_max_abs_diff" in r]
    identical = sum(bool(r.get("identical")) for r in compared)
    worst = max((r["adapter_max_abs_diff"] for r in compared), default=None)
    loss = max((abs(r["train_loss_diff"]) for r in compared if r.get("train_loss_diff") is not None), default=None)
    measured = result["standalone_measured"]
    how = (f"mean of {measured} measured x {result['lines']} lines: extrapolated" if result["standalone_extrapolated"]
           else f"{measured} measured")
    driver = meta["device"].get("driver")
    lines = [
        f"## Sweep: {result['lines']} lines of the code preset, {meta['shape']} shape ({meta['date']})",
        "",
        f"Device: {meta['device'].get('name')}{f' (driver {driver})' if driver else ''}; data: "
        f"{meta['data']['conversations']} conversations, {meta['data']['tokens'] / meta['data']['conversations']:.0f} "
        f"tokens each on average; grid: {meta['prompts']} prompts x {meta['seeds']} seeds; sweep workers: "
        f"{meta['workers']}. Command: `{meta['command']}`",
        "",
        "| lines | sweep wall s | sweep line s (first / mean of the rest) | base loads | standalone run s (mean) "
        "| all lines standalone s | sweep / standalone | adapters vs standalone |",
        "|---|---|---|---|---|---|---|---|",
        f"| {result['lines']} | {_cell(sweep.get('wall_s'), '{:.1f}')}"
        f"{' (cut at the budget)' if sweep.get('timed_out') else ''} | {_cell(sweep.get('first_line_s'), '{:.1f}')} / "
        f"{_cell(sweep.get('other_lines_mean_s'), '{:.1f}')} | {_cell(sweep.get('base_loads'))} | "
        f"{_cell(result['standalone_mean_s'], '{:.1f}')} | {_cell(result['standalone_all_lines_s'])} ({how}) | "
        f"{_cell(result['sweep_vs_standalone'], '{:.0%}')} | "
        f"{identical}/{len(compared)} bit-identical, max abs diff {_cell(worst, '{:.2e}')}, max train loss diff "
        f"{_cell(loss, '{:.2e}')} |",
    ]
    for run in runs:
        if run.get("status") != "ok":
            why = run.get("reason") or f"exit {run.get('exit_code')}"
            lines.append(f"- standalone line {run['index']}: {run.get('status')}: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget)
    from app.result import versions
    from app.tokenizer import tokenizer_of
    from bench.data import build_count

    device = probe_device(args.out, measure=False)
    say(f"device: {device.get('name')}")
    model, info = build_model(args.shape, args.models_dir, bool(device.get("cuda")), args.out, 900)
    if model is None:
        say(f"model build failed: {info.get('error')}")
        return 1
    data = build_count(args.out / "code_train.jsonl", args.conversations, tokenizer_of(model))
    lines = grid_lines(model, Path(data.path), args.prompts, args.seeds, args.set)
    grid = args.out / "grid.jsonl"
    grid.write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m bench.sweep " + shlex.join(sys.argv[1:] if argv is None else argv),
            "device": device, "shape": args.shape, "model": info, "data": data.as_dict(), "prompts": args.prompts,
            "seeds": args.seeds, "workers": args.workers, "versions": versions()}
    say(f"grid: {len(lines)} lines ({args.prompts} prompts x {args.seeds} seeds), {data.conversations} conversations "
        f"of {data.tokens / data.conversations:.0f} tokens on average")
    if args.skip_sweep:
        summary = args.out / "sweep" / "sweep.json"
        sweep = json.loads((args.out / "sweep-bench.json").read_text())["sweep"] if (
            args.out / "sweep-bench.json").exists() else {"wall_s": None, "note": f"no earlier sweep ({summary})"}
    else:
        sweep = run_sweep(args, grid, clock)
        say(f"sweep: exit {sweep['exit_code']} in {sweep['wall_s']} s, {sweep['counts']}")
    runs = run_standalone(args, grid, len(lines), clock)
    result = summarize(meta, sweep, runs, len(lines))
    (args.out / "sweep-bench.json").write_text(json.dumps(result, indent=2, default=str))
    table = render(result)
    (args.out / "table.md").write_text(table)
    print(table, flush=True)
    ok = sweep.get("exit_code") == 0 or args.skip_sweep
    return 0 if ok and all(r.get("status") in ("ok", "skipped") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
