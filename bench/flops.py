"""Model FLOPs per trained token and the cards' bf16 peaks: what MFU is measured against.

MFU = tokens/s x flops_per_token / peak. flops_per_token counts the useful work of one LoRA training step per
input token (all tokens of the packed rows, trained or not, since all of them are forwarded):

    4 x N_matmul     frozen linear weights (every decoder projection + the LM head): forward 2N, the input
                     gradient 2N, no weight gradient. The embedding lookup is no matmul and is not counted.
    6 x N_lora       the adapters A and B: forward 2N, input gradient 2N, weight gradient 2N
    12 x L x h x c   attention scores and values (QK^T and AV: 2 x 2 x h x c forward, twice that backward) per
                     layer, c = the mean attended length per token (block-diagonal causal packing: a document
                     of n tokens has mean context (n + 1) / 2, averaged weighted by tokens; bench/data.py)

Gradient-checkpointing recomputation is NOT counted (that would be hardware FLOPs utilisation), so a path that
recomputes less scores higher, as it should.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from app.memory import Shape, read_shape
from app.settings import ALL_PROJECTIONS

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, matched as substrings of
# torch.cuda.get_device_name() in this order (the first match wins: PCIe/NVL before the plain SXM name).
DATASHEET_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),  # same GH100 compute as the H100 SXM, more and faster memory
    ("H100", 989.0),  # H100 SXM5 (nvidia-smi: "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
]


def datasheet_tflops(device_name: str | None) -> float | None:
    """The datasheet dense bf16 peak of a card, or None when the card is not in the list."""
    if not device_name:
        return None
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


@dataclass(frozen=True)
class FlopsPerToken:
    n_matmul: int  # frozen linear weights: decoder projections + LM head
    n_lora: int  # adapter weights
    attention: float  # 12 x layers x hidden x ctx_mean
    ctx_mean: float

    @property
    def total(self) -> float:
        return 4 * self.n_matmul + 6 * self.n_lora + self.attention

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def flops_per_token(shape: Shape, r: int, ctx_mean: float,
                    target_modules: tuple[str, ...] = tuple(ALL_PROJECTIONS)) -> FlopsPerToken:
    # The LM head is a matmul whatever the tying (tied: the embedding matrix is reused as the head's weight).
    n_matmul = shape.linear_params + shape.vocab * shape.hidden
    attention = 12 * shape.layers * shape.hidden * ctx_mean
    return FlopsPerToken(n_matmul=n_matmul, n_lora=shape.lora_params(r, target_modules), attention=attention,
                         ctx_mean=ctx_mean)


def model_flops(model_dir: Path, r: int, ctx_mean: float) -> FlopsPerToken | None:
    """flops_per_token from a model folder's config.json (None when it cannot be read)."""
    shape = read_shape(Path(model_dir))
    return flops_per_token(shape, r, ctx_mean) if shape else None


def mfu(tokens_per_second: float | None, flops: FlopsPerToken | None, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.41 = 41%), or None when a part is unknown."""
    if not tokens_per_second or flops is None or not peak_tflops:
        return None
    return tokens_per_second * flops.total / (peak_tflops * 1e12)
