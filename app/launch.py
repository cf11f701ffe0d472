"""Data-parallel training on several GPUs of one host, with no other command to type.

When the job is to use more than one GPU (FT_NUM_GPUS, default: every visible GPU), `python -m app train`
re-runs itself once per GPU with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)
and waits for them. This launcher, rather than torchrun itself, keeps the job's contract: SIGTERM/SIGINT
are forwarded to every rank (they checkpoint together and exit 75), the exit code is rank 0's (2, 3, 4, 75
as documented, never torchrun's generic 1), and a rank that dies takes the others down instead of leaving
them blocked in a collective. Rank 0 alone writes result.json, the adapter, metrics and plots.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

from app.errors import EXIT_INTERRUPTED, EXIT_UNEXPECTED

log = logging.getLogger(__name__)

GRACE_S = 60  # after one rank failed: how long the others get to stop before SIGKILL
# NVLink multicast (NVLS) stays off: a program using it can take a shared host's GPUs out of service.
NCCL_SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a rank started by this launcher (or torchrun)."""
    return "WORLD_SIZE" in os.environ


def finish_ranks() -> None:
    """The end of a completed data-parallel run, on every rank: wait until rank 0 has saved the model and written
    result.json, then leave the process group together. A rank that exits while the others still hold the group
    can abort in the communication library's threads at interpreter shutdown ("terminate called without an active
    exception", seen with gloo on a loaded CPU): the launcher reads that as a failed rank and stops rank 0 in the
    middle of its save. Nothing to do in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, args: list[str]) -> int:
    """Run `python -m app ARGS` as `processes` ranks on this host; return the job's exit code."""
    port = str(_free_port())
    children: list[subprocess.Popen] = []
    for index in range(processes):
        env = {**os.environ, **NCCL_SAFETY, "RANK": str(index), "LOCAL_RANK": str(index),
               "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        children.append(subprocess.Popen([sys.executable, "-m", "app", *args], env=env))
    log.info("launched %d ranks (data parallel): pids %s", processes, [c.pid for c in children])

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _wait(children)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(children: list[subprocess.Popen]) -> int:
    """Wait for every rank. A rank that fails (not 0, not 75) makes the others stop: they would block in the
    next collective. A rank that was interrupted (75) means all of them got the signal: they finish their own
    checkpoint-and-exit, and are killed only if they outlive the grace period."""
    stop_at = None
    while any(child.poll() is None for child in children):
        codes = [child.poll() for child in children]
        if stop_at is None and any(code not in (None, 0, EXIT_INTERRUPTED) for code in codes):
            stop_at = time.monotonic() + GRACE_S
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
        elif stop_at is None and EXIT_INTERRUPTED in codes:
            stop_at = time.monotonic() + GRACE_S
        if stop_at is not None and time.monotonic() > stop_at:
            for child in children:
                if child.poll() is None:
                    child.kill()
        time.sleep(0.2)
    codes = [child.returncode for child in children]
    log.info("ranks exited with %s", codes)
    main = codes[0]
    if main == 0 and any(code != 0 for code in codes[1:]):
        bad = next(code for code in codes[1:] if code != 0)
        log.error("rank 0 finished but another rank exited %s", bad)
        return bad if bad > 0 else EXIT_UNEXPECTED
    return main if main >= 0 else EXIT_UNEXPECTED  # negative: killed by a signal
