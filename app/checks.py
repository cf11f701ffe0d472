"""The checks that need neither a tokenizer nor a weight, run before any expensive step (settings are
validated before this, app/settings.py): each failure names the setting and the fix."""

from __future__ import annotations

from app.errors import GpuError


def check_hardware(settings, hardware) -> None:
    """Settings the device cannot run."""
    if settings.load_in_4bit and not hardware.cuda:
        raise GpuError("FT_LOAD_IN_4BIT=true needs a CUDA GPU (bitsandbytes NF4) and none is visible. Run on a GPU "
                       "host, or set FT_LOAD_IN_4BIT=false to train in 16/32 bits.")
