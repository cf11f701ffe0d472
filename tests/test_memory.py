"""The memory model reads each architecture as its model class defines it (app/memory.py): structural checks on
small configs of five families, built on the meta device (no weights, no memory, no network).

Each expectation is written out from the family's published architecture, not from the code under test:
head_dim that is not hidden/heads (Gemma, Qwen3), rectangular q/o projections, Qwen2's q/k/v biases, tied
embeddings counted once, fused MoE experts in the weights but not among LoRA's targets.
"""

from __future__ import annotations

import pytest

from app.memory import Shape, build_skeleton

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=512)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shape_of(config: dict) -> Shape:
    skeleton = build_skeleton(config)
    assert skeleton is not None, f"transformers cannot build {config['model_type']} from its config"
    return Shape.from_model(skeleton, config)


def dense_expectations(shape: Shape, *, hidden, heads, kv_heads, head_dim, inter, layers, vocab, tied, qkv_bias):
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
                 "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    for name, (a, b) in per_layer.items():
        assert shape.linears[name] == ((a, b, layers),), name
    linear = layers * (sum(a * b for a, b in per_layer.values()) + (q + 2 * kv if qkv_bias else 0))
    assert shape.linear_params == linear
    assert shape.embedding_params == vocab * hidden * (1 if tied else 2)
    assert shape.tied is tied and shape.head_dim == head_dim and shape.kv_width == kv
    assert shape.lora_params(8, TARGETS) == layers * sum(8 * (a + b) for a, b in per_layer.values())


@pytest.mark.parametrize("family,extra,qkv_bias,tied", [
    ("llama", {"tie_word_embeddings": False}, False, False),
    ("mistral", {"tie_word_embeddings": False, "sliding_window": None}, False, False),
    ("qwen2", {"tie_word_embeddings": True}, True, True),
])
def test_dense_families_where_head_dim_is_hidden_over_heads(family, extra, qkv_bias, tied):
    shape = shape_of({"model_type": family, **SMALL, **extra})
    dense_expectations(shape, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=160, layers=2, vocab=256, tied=tied,
                       qkv_bias=qkv_bias)


@pytest.mark.parametrize("family", ["gemma", "qwen3"])
def test_families_whose_head_dim_is_set_apart_from_hidden(family):
    """Gemma-7B (hidden 3072, 16 heads of 256) and Qwen3-0.6B (hidden 1024, 16 heads of 128): q and o are not
    square; hidden // heads would undercount them."""
    config = {"model_type": family, **SMALL, "head_dim": 32, "tie_word_embeddings": True}
    shape = shape_of(config)
    dense_expectations(shape, hidden=64, heads=4, kv_heads=2, head_dim=32, inter=160, layers=2, vocab=256, tied=True,
                       qkv_bias=False)
    assert shape.linears["q_proj"] == ((64, 128, 2),) and shape.linears["o_proj"] == ((128, 64, 2),)
    # The config's numbers alone give the same projections (the fallback for remote-code models).
    assert Shape.from_config(config).linears["q_proj"] == ((64, 128, 2),)


def test_an_moe_model_counts_every_expert_in_the_weights_and_the_active_ones_in_the_activations():
    config = {"model_type": "qwen2_moe", **SMALL, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "tie_word_embeddings": False}
    shape = shape_of(config)
    hidden, layers = 64, 2
    experts = layers * 4 * (hidden * 2 * 32 + 32 * hidden)  # fused gate_up (2 x 32) and down per expert
    attention = layers * (2 * hidden * 64 + 2 * hidden * 32 + 64 + 2 * 32)  # q, o; k, v (kv width 32); biases
    shared = layers * (3 * hidden * 64 + hidden)  # the shared expert's MLP and its gate
    router = layers * 4 * hidden
    embeddings = 2 * 256 * hidden
    norms = layers * 2 * hidden + hidden
    assert shape.params == experts + attention + shared + router + embeddings + norms
    # Fused experts are 3-D parameters, not nn.Linear: NF4 leaves them in 16 bits and LoRA cannot target them
    # by name; the shared expert's projections are Linear layers.
    assert shape.linears["gate_proj"] == ((hidden, 64, layers),)
    assert shape.linear_params < shape.params - experts
    assert shape.intermediate == 2 * 32 + 64  # a token passes through 2 experts of 32 and the shared 64


def test_the_estimate_grows_with_the_real_head_dim():
    """The same hidden size with heads twice as wide: more weights, more LoRA, more kv activations."""
    from app.backends.unsloth import UnslothBackend
    from app.memory import Batch, Workload, estimate_peak

    narrow = shape_of({"model_type": "qwen3", **SMALL, "head_dim": 16})
    wide = shape_of({"model_type": "qwen3", **SMALL, "head_dim": 32})
    work = Workload(batch=Batch(rows=2, tokens=512, longest=256, flat=False), load_in_4bit=False, r=16,
                    target_modules=TARGETS, optimizer_8bit=True, checkpointing=False)
    small, big = (estimate_peak(s, UnslothBackend.memory, work) for s in (narrow, wide))
    assert big.weights_gb > small.weights_gb and big.lora_gb > small.lora_gb
