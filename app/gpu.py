"""The GPU preflight: which device the job will use, what it has free, and whether the run fits.

The device is found through NVML (nvidia-ml-py) without initialising CUDA: the first entry of
CUDA_VISIBLE_DEVICES, as an index (CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA's order NVML's), a GPU UUID or a
MIG UUID. The peak-memory estimate is computed from the model's config.json alone, before any weight is
loaded, so a run that cannot fit is refused in seconds (exit 3) with settings that would fit.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from app.errors import GpuError

log = logging.getLogger(__name__)

GIB = 2**30
HEADROOM = 0.92  # use at most this share of the free memory: fragmentation, cuBLAS workspaces, the CUDA context


@dataclass
class GpuInfo:
    name: str
    uuid: str
    index: int | None
    memory_total_gb: float
    memory_free_gb: float
    compute_capability: str
    bf16: bool
    mig: bool = False
    estimated_peak_gb: float | None = None


@dataclass
class Hardware:
    """What the run will execute on, decided once before loading weights."""

    cuda: bool
    gpu: GpuInfo | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    num_gpus: int = 0

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
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
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
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's device order = NVML's
    nvml = _nvml()
    handles = []
    if nvml is not None:
        try:
            handles = device_handles(nvml)
        except Exception as err:
            raise GpuError(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} names no GPU that "
                           f"NVML knows ({err}); list the GPUs with nvidia-smi -L.") from None
    if not handles:
        return Hardware(cuda=False)
    if num_gpus is not None and num_gpus > len(handles):
        raise GpuError(f"FT_NUM_GPUS={num_gpus} but only {len(handles)} GPU(s) are visible.")
    gpus = [gpu_info(nvml, handle, index) for handle, index in handles[: num_gpus or len(handles)]]
    # The device with the least free memory bounds a data-parallel run.
    tightest = min(gpus, key=lambda g: g.memory_free_gb)
    return Hardware(cuda=True, gpu=tightest, bf16=all(g.bf16 for g in gpus), gradient_checkpointing=True,
                    num_gpus=len(gpus))


# --- the memory estimate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        config = config.get("text_config", config)
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        return cls(
            hidden=hidden,
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            intermediate=config.get("intermediate_size") or 4 * hidden,
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.projections().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.layers * 2 * self.hidden


@dataclass(frozen=True)
class Plan:
    """What the estimate depends on besides the shape."""

    micro_batch: int
    seq_len: int
    load_in_4bit: bool
    r: int
    target_modules: tuple[str, ...]
    optimizer_8bit: bool
    gradient_checkpointing: bool = True
    backend: str = "unsloth"
    packed: bool = False  # FT_PACKING: a micro-batch is one flattened sequence of micro_batch x seq_len tokens


@dataclass
class Estimate:
    weights_gb: float
    lora_gb: float
    activations_gb: float
    logits_gb: float
    overhead_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.lora_gb + self.activations_gb + self.logits_gb + self.overhead_gb


@dataclass(frozen=True)
class Profile:
    """How a backend spends activation memory. Both are fitted to peaks measured on an H100
    (torch.cuda.max_memory_allocated, packed rows of 2048, 2026-11-25; docs/BENCHMARKS.md, "Memory estimate"):
    unsloth's to the Qwen2-0.5B shape at micro-batch 1/2/4, hf's to Qwen2-0.5B at 1/2/4 and Qwen2-7B at 1/2 (2/4 checkpointed),
    bf16 and 4-bit, checkpointing on and off (18 probes, all within -3%/+13%, the 7B ones within 3%)."""

    layer_bytes: tuple[float, float, float]  # saved bytes per token per layer = a*hidden + b*kv + c*intermediate
    scale_4bit: float  # activations of a 4-bit base relative to a 16-bit one
    checkpoint_keeps_inputs: bool  # checkpointed layer inputs stay on the GPU (False: offloaded to the CPU)
    recompute_fraction: float  # share of one layer's activations alive during checkpointed backward
    logits_bytes: float  # bytes per token per vocabulary entry alive at the peak
    logits_tokens_cap: int | None  # a chunked/fused cross-entropy holds at most this many tokens' logits
    fp32_embeddings_4bit: bool  # PEFT's prepare_model_for_kbit_training upcasts embeddings/LM head to fp32
    # ... and with them the residual stream: layer inputs kept by checkpointing are fp32 on a 4-bit base
    mask_bytes: float = 0.0  # per layer, per element of the (tokens x tokens) attention mask SDPA is given


PROFILES = {
    # transformers + PEFT: SDPA, TRL's chunked cross-entropy. Measured: 66 KB per token per layer in bf16
    # (0.5B), x1.46 on a 4-bit base (PEFT's k-bit preparation makes the residual stream fp32), 0.57 GiB of
    # cross-entropy workspace, and a term quadratic in the tokens of a micro-batch: padding-free packing hands
    # SDPA a block-diagonal mask over the flattened micro-batch, which every layer keeps for backward.
    "hf": Profile(layer_bytes=(24.0, 6.0, 9.0), scale_4bit=1.46, checkpoint_keeps_inputs=True, recompute_fraction=1.0,
                  logits_bytes=12.0, logits_tokens_cap=336, fp32_embeddings_4bit=True, mask_bytes=1.5),
    # unsloth: fused RMSNorm/RoPE/SwiGLU kernels, offloaded checkpoints, fused cross-entropy. Measured: 35.9 KB
    # per token per layer in bf16 (Qwen2-0.5B), 32.4 KB on a 4-bit base, 0.37 GiB of cross-entropy workspace.
    "unsloth": Profile(layer_bytes=(16.0, 0.0, 4.43), scale_4bit=0.90, checkpoint_keeps_inputs=False,
                       recompute_fraction=0.48, logits_bytes=4.0, logits_tokens_cap=650, fp32_embeddings_4bit=False),
}


def estimate_peak(shape: Shape, plan: Plan) -> Estimate:
    """Peak training memory (torch.cuda.max_memory_allocated) in GiB, from the shape alone.

    weights      16-bit: 2 bytes/param; NF4: 0.5 byte + double-quantised absmax (~0.127 bit) per linear
                 weight, embeddings and LM head in 16 bits (32 after PEFT's k-bit preparation)
    LoRA         r x (in + out) per adapted projection, fp32: weight 4 + grad 4 + Adam 8 (8-bit Adam: 2)
    activations  not checkpointed: every layer's saved tensors (Profile.layer_bytes per token per layer,
                 plus Profile.mask_bytes per attention-mask element: (b x s)^2 packed, b x s^2 padded);
                 checkpointed: each layer's input (b x s x h x 2 bytes, 4 in an fp32 residual stream, none
                 when offloaded to the CPU) + the part of one layer that is recomputed at a time
    logits       the LM head's output over the vocabulary that is alive at once (chunked or fused CE)
    """
    profile = PROFILES.get(plan.backend, PROFILES["hf"])
    tokens = plan.micro_batch * plan.seq_len
    kv = shape.kv_heads * shape.head_dim
    if plan.load_in_4bit:
        embedding_bytes = 4 if profile.fp32_embeddings_4bit else 2
        weights = shape.linear_params * (0.5 + 0.127 / 8) + shape.embedding_params * embedding_bytes
    else:
        weights = shape.params * 2
    lora_params = shape.layers * sum(
        plan.r * (a + o) for name, (a, o) in shape.projections().items() if name in plan.target_modules
    )
    lora = lora_params * (4 + 4 + (2 if plan.optimizer_8bit else 8))
    a, b, c = profile.layer_bytes
    per_layer = (a * shape.hidden + b * kv + c * shape.intermediate) * (profile.scale_4bit if plan.load_in_4bit else 1)
    mask_elements = tokens * tokens if plan.packed else plan.micro_batch * plan.seq_len**2
    per_layer_total = tokens * per_layer + profile.mask_bytes * mask_elements
    if plan.gradient_checkpointing:
        residual_bytes = 4 if plan.load_in_4bit and profile.fp32_embeddings_4bit else 2
        kept = tokens * shape.layers * residual_bytes * shape.hidden if profile.checkpoint_keeps_inputs else 0
        activations = kept + profile.recompute_fraction * per_layer_total
    else:
        activations = shape.layers * per_layer_total
    logit_tokens = min(tokens, profile.logits_tokens_cap or tokens)
    logits = logit_tokens * shape.vocab * profile.logits_bytes
    overhead = 0.05 * GIB + 0.02 * weights  # cuBLAS/attention workspaces and allocator rounding
    return Estimate(
        weights_gb=weights / GIB, lora_gb=lora / GIB, activations_gb=activations / GIB, logits_gb=logits / GIB,
        overhead_gb=overhead / GIB,
    )


def choose_checkpointing(shape: Shape, plan: Plan, free_gb: float) -> bool:
    """Gradient checkpointing only when the run does not fit without it: recomputing every layer's
    forward costs about a third of the step."""
    budget = free_gb * HEADROOM
    return estimate_peak(shape, replace(plan, gradient_checkpointing=False)).total_gb > budget


def read_shape(model_path: Path) -> Shape | None:
    config = Path(model_path) / "config.json"
    try:
        return Shape.from_config(json.loads(config.read_text()))
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        log.warning("no memory estimate: cannot read %s (%s)", config, err)
        return None


def what_fits(shape: Shape, plan: Plan, free_gb: float) -> list[str]:
    """Changes that would fit: 4-bit, a smaller micro-batch, a shorter sequence (each alone)."""
    budget = free_gb * HEADROOM
    options = []
    if not plan.load_in_4bit and estimate_peak(shape, replace(plan, load_in_4bit=True)).total_gb <= budget:
        options.append("FT_LOAD_IN_4BIT=true")
    batch = plan.micro_batch // 2
    while batch >= 1:
        if estimate_peak(shape, replace(plan, micro_batch=batch)).total_gb <= budget:
            options.append(f"FT_PER_DEVICE_TRAIN_BATCH_SIZE={batch} (raise FT_GRADIENT_ACCUMULATION_STEPS to keep "
                           "the effective batch)")
            break
        batch //= 2
    seq = plan.seq_len // 2
    while seq >= 256:
        if estimate_peak(shape, replace(plan, seq_len=seq)).total_gb <= budget:
            options.append(f"FT_MAX_SEQ_LENGTH={seq}")
            break
        seq //= 2
    return options


def auto_micro_batch(shape: Shape, plan: Plan, free_gb: float, effective: int,
                     checkpointing_choices: tuple[bool, ...] = (False, True)) -> tuple[int, bool]:
    """(micro-batch, gradient checkpointing): the largest divisor of the effective batch that fits without
    checkpointing; only when even 1 does not, the largest that fits with it."""
    budget = free_gb * HEADROOM
    divisors = sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True)
    for checkpointing in checkpointing_choices:
        for batch in divisors:
            candidate = replace(plan, micro_batch=batch, gradient_checkpointing=checkpointing)
            if estimate_peak(shape, candidate).total_gb <= budget:
                return batch, checkpointing
    return 1, True


def preflight(hardware: Hardware, shape: Shape | None, plan: Plan) -> Estimate | None:
    """Refuse (exit 3) before loading weights when the estimate exceeds the GPU's free memory."""
    if not hardware.cuda or shape is None:
        return None
    estimate = estimate_peak(shape, plan)
    gpu = hardware.gpu
    gpu.estimated_peak_gb = round(estimate.total_gb, 2)
    log.info(
        "GPU %s (%s): %.1f of %.1f GiB free; estimated peak %.1f GiB (weights %.1f, LoRA+optimizer %.2f, "
        "activations %.1f, logits %.1f)", gpu.name, gpu.uuid, gpu.memory_free_gb, gpu.memory_total_gb,
        estimate.total_gb, estimate.weights_gb, estimate.lora_gb, estimate.activations_gb, estimate.logits_gb,
    )
    if estimate.total_gb > gpu.memory_free_gb * HEADROOM:
        fits = what_fits(shape, plan, gpu.memory_free_gb)
        advice = ("Any one of these fits: " + "; ".join(fits) + ".") if fits else (
            "Nothing smaller fits either: use a GPU with more free memory or a smaller model.")
        raise GpuError(
            f"Not enough GPU memory: the run needs about {estimate.total_gb:.1f} GiB at its peak (weights "
            f"{estimate.weights_gb:.1f}, activations {estimate.activations_gb:.1f}, logits {estimate.logits_gb:.1f}) "
            f"but {gpu.name} ({gpu.uuid}) has {gpu.memory_free_gb:.1f} of {gpu.memory_total_gb:.1f} GiB free "
            f"(micro-batch {plan.micro_batch} x {plan.seq_len} tokens, "
            f"{'4-bit' if plan.load_in_4bit else '16-bit'} weights). {advice}"
        )
    return estimate

