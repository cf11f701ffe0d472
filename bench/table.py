"""The markdown report: a header naming the card, the software and the command, then one row per run.

Ratios compare each job row with the baseline row of the same shape and mode: tokens/s (higher is better)
and peak memory (lower is better; marked when the micro-batches differ, since the memory criterion holds at
the same micro-batch).
"""

from __future__ import annotations

from typing import Any

COLUMNS = [
    "shape", "mode", "path", "micro x accum (eff.)", "tok/step", "tok/s", "vs baseline", "MFU meas. / sheet",
    "peak GiB (est.)", "mem vs baseline", "load s", "1st step s", "loss 1st -> last (vs baseline)",
]


def _num(value: Any, fmt: str = "{:,.0f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "–"


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def baseline_of(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["path"] == "baseline" and r["shape"] == row["shape"]
                 and r["mode"] == row["mode"] and r.get("status") == "ok"), None)


def ratios(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """tokens/s and peak-memory ratios of a job row against its baseline (None where not comparable)."""
    base = baseline_of(row, rows)
    if row["path"] == "baseline" or base is None or row.get("status") != "ok":
        return {"speedup": None, "memory_ratio": None, "same_micro_batch": None, "loss_delta": None}
    speed = (row["tokens_per_second"] / base["tokens_per_second"]
             if row.get("tokens_per_second") and base.get("tokens_per_second") else None)
    memory = (row["peak_memory_gib"] / base["peak_memory_gib"]
              if row.get("peak_memory_gib") and base.get("peak_memory_gib") else None)
    same_steps = row.get("measured_steps") == base.get("measured_steps") and row.get("warmup") == base.get("warmup")
    loss_delta = (row["loss_last"] - base["loss_last"]
                  if same_steps and row.get("loss_last") is not None and base.get("loss_last") is not None else None)
    return {"speedup": speed, "memory_ratio": memory,
            "same_micro_batch": row.get("micro_batch") == base.get("micro_batch"), "loss_delta": loss_delta}


def _path_cell(row: dict[str, Any]) -> str:
    if row["path"].startswith("baseline"):
        return row["path"]
    backend = f" ({row['backend']})" if row.get("backend") else ""
    return f"{row['path']}{backend}"


def _cells(row: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    head = [row["shape"], row["mode"], _path_cell(row)]
    if row.get("status") != "ok":
        status = "skipped" if row.get("status") == "skipped" else "**FAILED**"
        return head + ["–", "–", status] + ["–"] * (len(COLUMNS) - 6)
    r = ratios(row, rows)
    base = baseline_of(row, rows)
    memory = "–"
    if r["memory_ratio"] is not None:
        memory = f"{r['memory_ratio']:.2f}x"
        if not r["same_micro_batch"]:
            memory += f" (mb {row.get('micro_batch')} vs {base.get('micro_batch')})"
    peak = _num(row.get("peak_memory_gib"), "{:.1f}")
    if row.get("estimated_peak_gib") is not None:
        peak += f" ({row['estimated_peak_gib']:.1f})"
    mfu = "n/a" if row.get("mfu_measured") is None and row.get("mfu_datasheet") is None else \
        f"{_pct(row.get('mfu_measured'))} / {_pct(row.get('mfu_datasheet'))}"
    return head + [
        f"{row.get('micro_batch')} x {row.get('accumulation')} ({row.get('effective_batch')})"
        + {True: ", ckpt", False: ", no ckpt"}.get(row.get("gradient_checkpointing"), ""),
        _num(row.get("tokens_per_step")),
        _num(row.get("tokens_per_second")),
        f"{r['speedup']:.2f}x" if r["speedup"] is not None else "–",
        mfu,
        peak,
        memory,
        _num(row.get("load_s"), "{:.1f}"),
        _num(row.get("first_step_s"), "{:.1f}"),
        f"{_num(row.get('loss_first'), '{:.4f}')} -> {_num(row.get('loss_last'), '{:.4f}')}"
        + (f" ({r['loss_delta']:+.4f})" if r["loss_delta"] is not None else ""),
    ]


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    device = meta.get("device", {})
    versions = meta.get("versions", {})
    setup = meta.get("setup", {})
    data = meta.get("data", {})
    measured, sheet = device.get("measured_bf16_tflops"), device.get("datasheet_bf16_tflops")
    card = device.get("name", "?")
    if device.get("cuda"):
        card += (f" (driver {device.get('driver')}, CUDA {device.get('torch_cuda')}, "
                 f"{device.get('memory_total_gib')} GiB, {device.get('multiprocessors')} SMs)")
    lines = [
        "# Throughput: the job's default path vs transformers + PEFT + TRL",
        "",
        f"- card: {card}",
        f"- bf16 peak: measured {_num(measured, '{:.0f}')} TFLOP/s (8192^3 torch.matmul, mean of 10 after 3 "
        f"warm-ups), datasheet {_num(sheet, '{:.0f}')} TFLOP/s (dense)",
        f"- date (UTC): {meta.get('date')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) +
        ("; not installed: " + ", ".join(k for k, v in versions.items() if not v) if any(not v for v in versions.values()) else ""),
        f"- command: `{meta.get('command')}`",
        f"- setup: packed rows of {setup.get('seq')} tokens; {setup.get('warmup')} warm-up + {setup.get('steps')} timed "
        f"optimizer steps; effective batch {setup.get('effective_batch')} rows (baseline {setup.get('micro_batch')} x "
        f"{setup.get('accum')}); LoRA r 16, alpha 16, rsLoRA, seven projections; lr 1e-4 constant; seed {setup.get('seed', 3407)}; "
        f"job gradient checkpointing: {setup.get('job_checkpointing', 'auto')}",
        f"- data: {data.get('conversations')} conversations, {_num(data.get('tokens'))} tokens "
        f"(sample conversations repeated), mean attended context {_num(data.get('ctx_mean'), '{:.0f}')} tokens",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row, rows)) + " |" for row in rows]
    notes = [row for row in rows if row.get("status") != "ok"]
    lines += [
        "",
        "tok/s: steady state, (tokens[W+S] - tokens[W]) / (t[W+S] - t[W]) over all tokens of the packed rows. "
        "MFU: tok/s x (4 x N_matmul + 6 x N_lora + 12 x layers x hidden x ctx) / peak, recomputation not counted. "
        "peak: torch.cuda.max_memory_allocated over the process (est.: the job's preflight estimate). "
        "1st step: process start to the end of optimizer step 1 (imports, data, load, compile). "
        "ckpt: gradient checkpointing on.",
    ]
    if notes:
        lines += ["", "Not measured:"]
        for row in notes:
            reason = [ln for ln in (row.get("error") or row.get("reason") or "").strip().splitlines() if ln.strip()]
            text = reason[0] if reason else ""
            if len(reason) > 1:  # a summary line, then a log tail: its last line usually names the cause
                text += f" ... {reason[-1].strip()}"
            log = f" (log: {row['log']})" if row.get("log") else ""
            lines.append(f"- {row['shape']} {row['mode']} {row['path']}: {row.get('status')}: {text[:500]}{log}")
    return "\n".join(lines) + "\n"
