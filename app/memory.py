"""The peak-memory model: GiB of GPU memory a LoRA run needs, from the architecture and the batch, before any
weight is loaded.

The architecture is read from config.json through transformers' own model class, built on the meta device
(no memory, no weights): every projection's real shape (head_dim that differs from hidden/heads, rectangular
q/o projections, biases, tied embeddings, fused or per-expert MoE weights) comes from the code that will run,
not from arithmetic that holds for one family. Where a model class cannot be built from its config alone
(remote code), the config's numbers are used instead (`Shape.from_config`).

How a backend spends activation memory is its `Profile` (app/backends/*: fitted to measured peaks); the
batch is the worst micro-batch the trainer will build (app/plan.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.errors import JobError

log = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # MLP width a token passes through: dense width, or active experts x expert width + shared
    vocab: int
    tied: bool
    params: int  # all parameters
    embedding_params: int  # input embeddings + LM head (once when tied)
    linear_params: int  # parameters of nn.Linear layers inside the decoder (what NF4 quantizes)
    # (in_features, out_features, how many in the whole model) per Linear name: what LoRA adapts
    linears: dict[str, tuple[tuple[int, int, int], ...]] = field(default_factory=dict)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def lora_params(self, r: int, target_modules: tuple[str, ...] | list[str]) -> int:
        """LoRA A and B of every Linear whose name (last dotted part) is a target: r x (in + out) each."""
        return sum(r * (a + b) * count for name in target_modules for a, b, count in self.linears.get(name, ()))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        """From config.json's numbers alone (a model class transformers cannot build without remote code)."""
        config = config.get("text_config", config)
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        layers, vocab = config["num_hidden_layers"], config["vocab_size"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        dense = config.get("intermediate_size") or 4 * hidden
        experts = config.get("num_local_experts") or config.get("num_experts") or 0
        active = config.get("num_experts_per_tok") or 0
        expert_width = config.get("moe_intermediate_size") or dense
        shared = config.get("shared_expert_intermediate_size") or 0
        bias = bool(config.get("attention_bias", False)) or config.get("model_type") in ("qwen2", "qwen2_moe")
        q, kv = heads * head_dim, kv_heads * head_dim
        mlp = ({"gate_proj": (hidden, expert_width, experts), "up_proj": (hidden, expert_width, experts),
                "down_proj": (expert_width, hidden, experts)} if experts else
               {"gate_proj": (hidden, dense, 1), "up_proj": (hidden, dense, 1), "down_proj": (dense, hidden, 1)})
        per_layer = {"q_proj": (hidden, q, 1), "k_proj": (hidden, kv, 1), "v_proj": (hidden, kv, 1),
                     "o_proj": (q, hidden, 1), **mlp}
        linears = {name: ((a, b, count * layers),) for name, (a, b, count) in per_layer.items()}
        linear = sum(a * b * count for (a, b, count), in linears.values())
        linear += layers * (q + 2 * kv) * bias
        tied = bool(config.get("tie_word_embeddings", False))
        embeddings = vocab * hidden * (1 if tied else 2)
        return cls(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   intermediate=(active * expert_width + shared) if experts else dense, vocab=vocab, tied=tied,
                   params=linear + embeddings + layers * 2 * hidden + hidden, embedding_params=embeddings,
                   linear_params=linear, linears=linears)

    @classmethod
    def from_model(cls, skeleton, config: dict[str, Any]) -> Shape:
        """From a model built on the meta device: every parameter as the model class defines it."""
        import torch

        numbers = cls.from_config(config)
        linears: dict[str, dict[tuple[int, int], int]] = {}
        linear_params = 0
        for name, module in skeleton.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not skeleton.get_output_embeddings():
                key = (module.in_features, module.out_features)
                counts = linears.setdefault(name.rsplit(".", 1)[-1], {})
                counts[key] = counts.get(key, 0) + 1
                linear_params += sum(p.numel() for p in module.parameters(recurse=False))
        embeddings = {id(p): p.numel() for m in (skeleton.get_input_embeddings(), skeleton.get_output_embeddings())
                      if m is not None for p in m.parameters()}
        params = {id(p): p.numel() for p in skeleton.parameters()}
        return replace(
            numbers, params=sum(params.values()), embedding_params=sum(embeddings.values()),
            linear_params=linear_params, tied=len(embeddings) == 1,
            linears={name: tuple((a, b, n) for (a, b), n in counts.items()) for name, counts in linears.items()},
        )


def build_skeleton(config: dict[str, Any]):
    """The model class of config.json, built on the meta device (no memory); None when that needs remote code
    or real tensors."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        model_type = config.get("model_type")
        hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except JobError:  # SIGTERM while building it (Interrupted) stops the job
        raise
    except Exception as err:  # remote code, a multimodal class, an init that needs real tensors
        log.info("architecture not built from config.json (%s: %s): using its numbers", type(err).__name__, err)
        return None


def read_config(model_path: Path) -> dict[str, Any] | None:
    path = Path(model_path) / "config.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("no memory estimate: cannot read %s (%s)", path, err)
        return None


def read_shape(model_path: Path, skeleton=None) -> Shape | None:
    """The Shape of a model folder's config.json (from `skeleton` when given, else built here)."""
    config = read_config(model_path)
    if config is None:
        return None
    try:
        skeleton = skeleton if skeleton is not None else build_skeleton(config)
        return Shape.from_model(skeleton, config) if skeleton is not None else Shape.from_config(config)
    except (KeyError, TypeError) as err:
        log.warning("no memory estimate: %s/config.json lacks %s", model_path, err)
        return None


@dataclass(frozen=True)
class Profile:
    """How a backend spends activation memory, fitted to peaks measured on a GPU (the backends say where)."""

    layer_bytes: tuple[float, float, float]  # saved bytes per token per layer = a*hidden + b*kv + c*intermediate
    scale_4bit: float  # activations of a 4-bit base relative to a 16-bit one
    checkpoint_keeps_inputs: bool  # checkpointed layer inputs stay on the GPU (False: offloaded to the CPU)
    recompute_fraction: float  # share of one layer's activations alive during checkpointed backward
    logits_bytes: float  # bytes per token per vocabulary entry alive at the peak
    logits_tokens_cap: int | None  # a chunked/fused cross-entropy holds at most this many tokens' logits
    fp32_embeddings_4bit: bool  # PEFT's prepare_model_for_kbit_training upcasts embeddings/LM head to fp32
    # ... and with them the residual stream: layer inputs kept by checkpointing are fp32 on a 4-bit base
    mask_bytes: float = 0.0  # per layer, per element of the attention mask SDPA is given
    varlen_attention: bool = False  # rows flattened into one sequence cost no dense mask (per-row kernels)


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the model computes it."""

    rows: int  # sequences in it
    tokens: int  # tokens the layers compute on (padding included when padded)
    longest: int  # tokens of its longest row
    flat: bool  # padding-free: the rows flattened into one sequence with per-row positions

    @classmethod
    def worst(cls, lengths: list[int], rows: int, flat: bool) -> Batch:
        """The largest micro-batch of `rows` rows that these row lengths can form."""
        top = sorted(lengths, reverse=True)[:rows]
        rows = len(top)
        return cls(rows=rows, tokens=sum(top) if flat else rows * top[0], longest=top[0], flat=flat)

    @classmethod
    def drawn(cls, lengths: list[int], rows: int, flat: bool, seed: int, epochs: int) -> Batch:
        """The largest micro-batch of `rows` rows that one process's trainer draws in `epochs` passes: its sampler
        (accelerate's SeedableRandomSampler, data_seed = FT_SEED) orders pass e as torch.randperm(len(lengths))
        from a generator seeded with seed + e and cuts that order into micro-batches of `rows`, the last one
        shorter. tests/test_plan.py holds this against the job's own trainer."""
        import torch

        worst = None
        for epoch in range(epochs):
            order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            for start in range(0, len(order), rows):
                chosen = [lengths[i] for i in order[start:start + rows]]
                batch = cls(rows=len(chosen), tokens=sum(chosen) if flat else len(chosen) * max(chosen),
                            longest=max(chosen), flat=flat)
                if worst is None or (batch.tokens, batch.mask_elements) > (worst.tokens, worst.mask_elements):
                    worst = batch
        return worst

    @property
    def mask_elements(self) -> int:
        """Elements of the attention mask SDPA gets: block-diagonal over the flattened batch, or one per row."""
        return self.tokens**2 if self.flat else self.rows * self.longest**2


@dataclass(frozen=True)
class Workload:
    """What the estimate depends on besides the shape and the backend."""

    batch: Batch
    load_in_4bit: bool
    r: int
    target_modules: tuple[str, ...]
    optimizer_8bit: bool
    checkpointing: bool


@dataclass(frozen=True)
class Estimate:
    weights_gb: float
    lora_gb: float
    activations_gb: float
    logits_gb: float
    overhead_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.lora_gb + self.activations_gb + self.logits_gb + self.overhead_gb


def estimate_peak(shape: Shape, profile: Profile, work: Workload) -> Estimate:
    """Peak training memory (torch.cuda.max_memory_allocated) in GiB.

    weights      16-bit: 2 bytes/param; NF4: 0.5 byte + double-quantised absmax (~0.127 bit) per Linear
                 weight, the rest (embeddings, LM head, norms, fused expert tensors) in 16 bits (embeddings
                 in 32 after PEFT's k-bit preparation)
    LoRA         r x (in + out) per adapted Linear, fp32: weight 4 + grad 4 + Adam 8 (8-bit Adam: 2)
    activations  not checkpointed: every layer's saved tensors (Profile.layer_bytes per token per layer,
                 plus Profile.mask_bytes per attention-mask element, Batch.mask_elements); checkpointed: each
                 layer's input (tokens x hidden x 2 bytes, 4 in an fp32 residual stream, none when offloaded
                 to the CPU) + the part of one layer that is recomputed at a time
    logits       the LM head's output over the vocabulary that is alive at once (chunked or fused CE)
    """
    batch = work.batch
    if work.load_in_4bit:
        embedding_bytes = 4 if profile.fp32_embeddings_4bit else 2
        rest = shape.params - shape.linear_params - shape.embedding_params
        weights = shape.linear_params * (0.5 + 0.127 / 8) + shape.embedding_params * embedding_bytes + rest * 2
    else:
        weights = shape.params * 2
    lora = shape.lora_params(work.r, work.target_modules) * (4 + 4 + (2 if work.optimizer_8bit else 8))
    a, b, c = profile.layer_bytes
    per_token = (a * shape.hidden + b * shape.kv_width + c * shape.intermediate) * (
        profile.scale_4bit if work.load_in_4bit else 1)
    per_layer = batch.tokens * per_token + profile.mask_bytes * batch.mask_elements
    if work.checkpointing:
        residual_bytes = 4 if work.load_in_4bit and profile.fp32_embeddings_4bit else 2
        kept = batch.tokens * shape.layers * residual_bytes * shape.hidden if profile.checkpoint_keeps_inputs else 0
        activations = kept + profile.recompute_fraction * per_layer
    else:
        activations = shape.layers * per_layer
    logits = min(batch.tokens, profile.logits_tokens_cap or batch.tokens) * shape.vocab * profile.logits_bytes
    overhead = 0.05 * GIB + 0.02 * weights  # cuBLAS/attention workspaces and allocator rounding
    return Estimate(weights_gb=weights / GIB, lora_gb=lora / GIB, activations_gb=activations / GIB,
                    logits_gb=logits / GIB, overhead_gb=overhead / GIB)
