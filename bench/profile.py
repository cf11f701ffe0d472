"""Where a sweep line's time goes: the first lines of the code grid in one process, as `python -m app sweep` runs
them (one shared base), each phase of each line timed, the steps' wall times, and one line profiled.

    python -m bench.profile --out /tmp/prof --model MODEL_DIR            # 3 lines of prompt 0 (seeds 1-3)
    python -m bench.profile --out /tmp/p --shape tiny --conversations 32 --lines 2 --models-dir /tmp/p/models

Writes DIR/profile.md (printed last) and DIR/profile.json:
  - per line, the seconds of each phase of pipeline.run: prepare (data, plan), base (SharedBase.load: the held
    base checked), lora (add_lora), trainer (build_trainer), train (run_training), save (save_model), finish
    (result.json), release (LoRA off, base restored, memory freed), and what is left (other)
  - per line, the optimizer steps' wall times: the first, the median of the rest, their sum
  - for --profile-line: cProfile of the whole line (Python time by function, cumulative and own), and torch's
    profiler over --profile-steps (the GPU's busy time against the steps' wall time; operators by device time
    and by CPU time)
The timers wrap the job's own functions (module attributes, looked up at call time); nothing else changes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.run import build_model, say
from bench.sweep import SHAPES, grid_lines

PHASES = ["prepare", "base", "lora", "trainer", "train", "save", "finish", "release"]  # plot: inside train


class Timers:
    """Seconds per phase of the current line, from wrappers around the job's functions."""

    def __init__(self):
        self.line: dict[str, float] = {}

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        inner = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                timers.line[phase] = timers.line.get(phase, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)


def install(timers: Timers, steps: list[float], profile: dict[str, Any]) -> None:
    """Time the phases of pipeline.run; record every step's wall time; profile the chosen steps."""
    from transformers import TrainerCallback

    import app.artifacts
    import app.pipeline
    import app.plots
    import app.trainer
    from app.backends.hf import HfBackend
    from app.backends.reuse import SharedBase
    from app.backends.unsloth import UnslothBackend

    timers.wrap(app.pipeline, "prepare", "prepare")
    timers.wrap(SharedBase, "load", "base")
    timers.wrap(SharedBase, "release", "release")
    timers.wrap(app.trainer, "run_training", "train")
    timers.wrap(app.artifacts, "save_model", "save")
    timers.wrap(app.pipeline, "finish", "finish")
    timers.wrap(app.plots, "write_loss_plot", "plot")
    for cls in (HfBackend, UnslothBackend):  # importing the module imports no unsloth (activate() does)
        timers.wrap(cls, "add_lora", "lora")

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()
            window = profile.get("window")
            if window and state.global_step == window[0] and profile.get("active"):
                profile["profiler"].start()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.began)
            window = profile.get("window")
            if window and state.global_step == window[1] and profile.get("active"):
                import torch

                torch.cuda.synchronize()
                profile["profiler"].stop()
                profile["active"] = False
                profile["done"] = True

    build = app.trainer.build_trainer

    def build_trainer(session, stop):
        started = time.perf_counter()
        training = build(session, stop)
        training.trainer.add_callback(StepClock())
        timers.line["trainer"] = timers.line.get("trainer", 0.0) + time.perf_counter() - started
        return training

    app.trainer.build_trainer = build_trainer


def torch_tables(profiler, steps: int) -> dict[str, Any]:
    """The profiled steps: device busy time against wall time, and the top operators."""
    from torch.autograd import DeviceType

    averages = profiler.key_averages()
    spans = sorted((e.time_range.start, e.time_range.end) for e in profiler.events() if e.device_type == DeviceType.CUDA)
    device, end = 0.0, float("-inf")  # the union of the kernels' intervals: overlapping streams counted once
    for start, stop in spans:
        if stop > end:
            device += stop - max(start, end)
            end = stop
    device /= 1e6
    tables = {}
    for key in ("self_device_time_total", "self_cpu_time_total"):
        try:
            tables[key] = averages.table(sort_by=key, row_limit=30, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError) as err:
            tables[key] = f"({err})"
    syncs = {e.key: e.count for e in averages if any(s in e.key for s in ("Synchronize", "aten::item",
                                                                             "_local_scalar_dense", "cudaMalloc"))}
    return {"steps": steps, "device_busy_s": round(device, 3), "tables": tables, "sync_counts": syncs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shape", choices=SHAPES, default="qwen2-7b")
    p.add_argument("--model", type=Path, default=None, help="a model folder (default: built in --models-dir)")
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/bench-models"))
    p.add_argument("--conversations", type=int, default=717)
    p.add_argument("--lines", type=int, default=3, help="lines of prompt 0 (seeds 1..N), run in this process")
    p.add_argument("--prompt", type=int, default=0, help="the grid's prompt index of every line")
    p.add_argument("--profile-line", type=int, default=1, help="the line to profile (-1: none)")
    p.add_argument("--profile-steps", default="10-13", help="optimizer steps under torch's profiler (FIRST-LAST)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a setting of every line")
    return p.parse_args(argv)


def render(result: dict[str, Any]) -> str:
    out = [f"## Sweep lines, phase by phase ({result['started']}, {result['device']})", "",
           f"Command: `{result['command']}`", "",
           "| line | wall s | " + " | ".join(PHASES) + " | (plot) | other | steps | first step s | median step s | "
           "steps sum s |", "|---" * (len(PHASES) + 8) + "|"]
    for row in result["lines"]:
        phases = row["phases"]
        other = row["wall_s"] - sum(phases.get(p, 0.0) for p in PHASES)
        steps = row["steps"]
        cells = [f"{phases.get(p, 0.0):.2f}" for p in [*PHASES, "plot"]]
        out.append(f"| {row['line']} | {row['wall_s']:.2f} | " + " | ".join(cells) + f" | {other:.2f} | {len(steps)} | "
                   f"{steps[0] if steps else 0:.3f} | {statistics.median(steps[1:]) if len(steps) > 1 else 0:.3f} | "
                   f"{sum(steps):.2f} |")
    torch_profile = result.get("torch")
    if torch_profile:
        wall = torch_profile["wall_s"]
        out += ["", f"torch profiler, steps {torch_profile['steps']}: wall {wall:.3f} s, device busy "
                    f"{torch_profile['device_busy_s']:.3f} s ({torch_profile['device_busy_s'] / wall:.0%}); "
                    f"sync-like calls {torch_profile['sync_counts']}", "",
                "```", torch_profile["tables"]["self_device_time_total"], "```", "",
                "```", torch_profile["tables"]["self_cpu_time_total"], "```"]
    if result.get("cprofile"):
        out += ["", f"cProfile of line {result['profile_line']} (cumulative):", "", "```", result["cprofile"], "```"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from bench.e2e import code_like_data

    model = args.model
    if model is None:
        model, _ = build_model(args.shape, args.models_dir, torch.cuda.is_available(), args.out, 900)
        if model is None:
            say("no model folder")
            return 1
    data = code_like_data(args.out / "code_train.jsonl", args.conversations)
    extra = dict(item.split("=", 1) for item in args.set)
    lines = [line for line in grid_lines(model, data, args.prompt + 1, args.lines, extra)
             if line["meta"]["prompt"] == args.prompt]
    grid = args.out / "grid.jsonl"
    grid.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    run_dir = args.out / "sweep"
    import os
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    os.environ["FT_OUTPUT_DIR"] = str(run_dir)

    from app.backends.reuse import SharedBase
    from app.signals import StopRequest
    from app.sweep import read_lines, run_line

    timers, steps, profile = Timers(), [], {}
    install(timers, steps, profile)
    first, last = (int(x) for x in args.profile_steps.split("-"))
    shared, stop = SharedBase(), StopRequest()
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "lines": [],
        "profile_line": args.profile_line}
    try:
        for index, line in enumerate(read_lines(grid)):
            timers.line, steps[:] = {}, []
            profiled = index == args.profile_line
            if profiled and torch.cuda.is_available():
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                profile.update(profiler=torch.profiler.profile(activities=activities), window=(first - 1, last),
                               active=True)
            cprof = cProfile.Profile() if profiled else None
            started = time.perf_counter()
            if cprof:
                cprof.enable()
            entry = run_line(line, shared, stop)
            if cprof:
                cprof.disable()
            wall = time.perf_counter() - started
            result["lines"].append({"line": index, "wall_s": wall, "exit_code": entry["exit_code"],
                                    "phases": dict(timers.line), "steps": list(steps)})
            if cprof:
                text = io.StringIO()
                stats = pstats.Stats(cprof, stream=text).sort_stats("cumulative")
                stats.print_stats(60)
                stats.sort_stats("tottime").print_stats(30)
                result["cprofile"] = text.getvalue()
            if profiled and profile.get("done"):
                walls = sum(steps[first - 1:last])
                result["torch"] = {**torch_tables(profile["profiler"], last - first + 1), "wall_s": walls,
                                   "steps": f"{first}-{last}"}
            say(f"line {index}: exit {entry['exit_code']} in {wall:.1f} s {json.dumps(timers.line)}")
    finally:
        shared.drop()
        (args.out / "profile.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        table = render(result)
        (args.out / "profile.md").write_text(table, encoding="utf-8")
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
