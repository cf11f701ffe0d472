"""What the job runs on, read once before anything heavy is imported: the GPU(s) through NVML, or the CPU.

The device is found through NVML (nvidia-ml-py) without initialising CUDA: the first entry of
CUDA_VISIBLE_DEVICES, as an index (CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA's order NVML's), a GPU UUID or a
MIG UUID. `Hardware` holds facts only; what the run decides from them (micro-batch, checkpointing, the memory
estimate) is the batch plan's (app/plan.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Any

from app.errors import GpuError
from app.settings import cuda_visible_devices, set_library_defaults

GIB = 2**30


@dataclass(frozen=True)
class GpuInfo:
    name: str
    uuid: str
    index: int | None
    memory_total_gb: float
    memory_free_gb: float
    compute_capability: str
    bf16: bool
    mig: bool = False


@dataclass(frozen=True)
class Hardware:
    """The device(s) the run will execute on and the libraries that use them."""

    cuda: bool
    gpu: GpuInfo | None = None  # with several GPUs: the one with the least free memory (it bounds the run)
    bf16: bool = False
    num_gpus: int = 0
    bitsandbytes: bool = False  # installed (8-bit optimizers, NF4): usable only with CUDA

    @property
    def dtype(self):
        import torch

        if not self.cuda:
            return torch.float32  # CPU: bf16 matmuls are slow or missing on most CPUs
        return torch.bfloat16 if self.bf16 else torch.float16

    @property
    def save_dtype(self):
        import torch

        return torch.bfloat16 if (self.bf16 or not self.cuda) else torch.float16

    def as_dict(self) -> dict[str, Any] | None:
        return asdict(self.gpu) if self.gpu else None


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver, no library: no NVIDIA GPU here
        return None


def visible_devices() -> list[str] | None:
    value = cuda_visible_devices()
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip() and item.strip() != "-1"]


def _as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def device_handles(nvml) -> list[tuple[Any, int | None]]:
    """NVML handles of the GPUs this process may use, in CUDA's order (PCI bus order)."""
    visible = visible_devices()
    if visible is None:
        return [(nvml.nvmlDeviceGetHandleByIndex(i), i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for item in visible:
        if item.isdigit():
            handles.append((nvml.nvmlDeviceGetHandleByIndex(int(item)), int(item)))
        else:
            uuid = item if item.startswith(("GPU-", "MIG-")) else f"GPU-{item}"
            handles.append((nvml.nvmlDeviceGetHandleByUUID(uuid.encode()), None))
    return handles


def gpu_info(nvml, handle, index) -> GpuInfo:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    except Exception:  # a MIG device handle: ask its parent
        parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(parent)
    uuid = _as_text(nvml.nvmlDeviceGetUUID(handle))
    return GpuInfo(
        name=_as_text(nvml.nvmlDeviceGetName(handle)),
        uuid=uuid,
        index=index,
        memory_total_gb=round(memory.total / GIB, 2),
        memory_free_gb=round(memory.free / GIB, 2),
        compute_capability=f"{major}.{minor}",
        bf16=major >= 8,
        mig=uuid.startswith("MIG-"),
    )


def detect_hardware(num_gpus: int | None = None) -> Hardware:
    """The GPU(s) the job will use, read through NVML; a CPU-only Hardware when there is none."""
    set_library_defaults(CUDA_DEVICE_ORDER="PCI_BUS_ID")  # CUDA's device order = NVML's
    bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    nvml = _nvml()
    handles = []
    if nvml is not None:
        try:
            handles = device_handles(nvml)
        except Exception as err:
            raise GpuError(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices()!r} names no GPU that NVML knows ({err}); "
                           "list the GPUs with nvidia-smi -L.") from None
    if not handles:
        return Hardware(cuda=False, bitsandbytes=bitsandbytes)
    if num_gpus is not None and num_gpus > len(handles):
        raise GpuError(f"FT_NUM_GPUS={num_gpus} but only {len(handles)} GPU(s) are visible.")
    gpus = [gpu_info(nvml, handle, index) for handle, index in handles[: num_gpus or len(handles)]]
    tightest = min(gpus, key=lambda g: g.memory_free_gb)
    return Hardware(cuda=True, gpu=tightest, bf16=all(g.bf16 for g in gpus), num_gpus=len(gpus),
                    bitsandbytes=bitsandbytes)
