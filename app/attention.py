"""Padding-free attention for the hf backend: the rows of a flattened micro-batch in one FlashAttention-2 call.

TRL's padding-free collation (unpacked rows flattened, or BFD-packed rows) hands the model one sequence with
per-row positions and no attention mask. transformers' own SDPA path then builds a block-diagonal mask over the
whole flattened micro-batch (quadratic in its tokens, kept by every layer for backward) and runs the masked
kernel; its flash paths need the flash-attn package, which the pinned set does not hold. This module registers
one more attention implementation through transformers' public `AttentionInterface` / `AttentionMaskInterface`:
the row bounds are read from the position ids, and torch's own FlashAttention-2 kernel attends within each row,
no mask, no padding. torch 2.12 makes the same kernel public as `torch.nn.attention.varlen.varlen_attn` (a thin
custom op over the two aten ops used here); the pinned torch 2.11 has the ops but not the wrapper.

A padding mask (evaluation of padded rows, generation) or a KV cache goes to transformers' SDPA function with
transformers' mask; flattened rows on a CPU or with dropout go to it one row at a time: the same result, only
slower. Models with sliding windows or soft-capping keep "sdpa" (`supports()`).
"""

from __future__ import annotations

import torch

NAME = "ft_varlen"
_HALF = (torch.float16, torch.bfloat16)


def kernel_available() -> bool:
    """torch's FlashAttention-2 varlen kernel: a CUDA device of compute capability 8.0 or newer."""
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


def supports(config) -> bool:
    """Whether every layer of this model attends plainly causally (no window, no soft-capping, no sinks)."""
    text = getattr(config, "get_text_config", lambda: config)()
    return not (getattr(text, "use_sliding_window", False) or getattr(text, "sliding_window_pattern", None)
                or getattr(text, "attn_logit_softcapping", None) or getattr(text, "layer_types", None)
                and any(t != "full_attention" for t in text.layer_types))


class _FlashVarlen(torch.autograd.Function):
    """Causal attention within each row of (tokens, heads, dim) tensors bounded by `cu` (int32, rows + 1)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, longest: int, scale: float | None):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, longest, longest, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.longest, ctx.scale = longest, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.longest, ctx.longest, 0.0, True, rng, unused,
            scale=ctx.scale)
        return dq, dk, dv, None, None, None


_bounds_cache: list = [None, None, 0]  # the position ids of the last call, their row starts, the longest row


def row_bounds(position_ids: torch.Tensor | None, length: int, device) -> tuple[torch.Tensor, int]:
    """Cumulative row starts (int32, rows + 1) and the longest row, from positions that restart at 0 per row.
    Every layer gets the same position ids in a step: computed once per step (one host sync), not per layer."""
    if position_ids is None:
        return torch.tensor([0, length], dtype=torch.int32, device=device), length
    if _bounds_cache[0] is position_ids:
        return _bounds_cache[1], _bounds_cache[2]
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    _bounds_cache[:] = [position_ids, cu, longest]
    return cu, longest


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              sliding_window: int | None = None, softcap: float | None = None, position_ids=None, **kwargs):
    """transformers' attention-function contract: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    flattened = attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if not flattened:  # a padding mask (evaluation, generation) or a KV cache: SDPA with transformers' mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if sliding_window or softcap:
        raise NotImplementedError(f"{NAME} was registered for a model with sliding windows or soft-capping, which "
                                  "it does not implement (app.attention.supports() says which models it serves)")
    cu, longest = row_bounds(position_ids, query.shape[2], query.device)
    if dropout and module.training or not (query.is_cuda and kernel_available()):
        rows = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                       dropout=dropout, scaling=scaling, is_causal=True)[0]
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
        return torch.cat(rows, dim=1), None
    dtype = query.dtype if query.dtype in _HALF else (value.dtype if value.dtype in _HALF else torch.bfloat16)
    q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))
    out = _FlashVarlen.apply(q, k, v, cu, longest, scaling)
    return out.to(query.dtype).unsqueeze(0), None


def _mask(*args, attention_mask=None, **kwargs):
    """No mask where there is no padding (row bounds come from the position ids); SDPA's mask where there is."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """The implementation's name for `attn_implementation`, registered with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME
