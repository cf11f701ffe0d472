"""Device facts and the card's measured bf16 matmul peak, in a process of its own.

    python -m bench.peak          # prints one JSON object

The orchestrator never initialises CUDA itself (a context in the parent would hold GPU memory that the job's
preflight and auto micro-batch then see as used), so it asks this subprocess once. The peak is the mean rate
of ten 8192 x 8192 x 8192 bf16 torch.matmul calls on random data after three warm-ups, timed with CUDA events:
what a large, well-shaped GEMM reaches on this card today (clocks, power cap), typically ~80% of the datasheet.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

N = 8192
WARMUP = 3
TIMED = 10


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def measure_bf16_tflops(n: int = N, warmup: int = WARMUP, timed: int = TIMED) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(timed):
        torch.matmul(a, b)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return 2 * n**3 * timed / seconds / 1e12


def probe(measure: bool = True) -> dict:
    import torch

    from bench.flops import datasheet_tflops

    facts: dict = {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if not facts["cuda"]:
        facts.update(name=f"CPU ({platform.processor() or platform.machine()})", driver=None,
                     measured_bf16_tflops=None, datasheet_bf16_tflops=None)
        return facts
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    facts.update(name=name, driver=driver_version(), capability=f"{props.major}.{props.minor}",
                 memory_total_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                 datasheet_bf16_tflops=datasheet_tflops(name), measured_bf16_tflops=None)
    if measure:
        facts["measured_bf16_tflops"] = round(measure_bf16_tflops(), 1)
    return facts


def main() -> None:
    facts = probe(measure="--no-measure" not in sys.argv)
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
