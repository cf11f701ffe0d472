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

The unsloth backend gets the same kernel through `enable_unsloth_varlen()`: unsloth 2026.10.9 runs flattened rows
through torch's `varlen_attn` where torch has it (2.12+) and, on torch 2.11, through one SDPA call per row per layer,
which leaves the step launch-bound (1.0 s against 0.53 s padded, the code run on an H200, 2026-12-01). `varlen_attn()`
below is that function's contract on torch 2.11's kernel, handed to unsloth's dispatcher in place of the missing one.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

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
    """Attention within each row of (tokens, heads, dim) tensors bounded by `cu_q`/`cu_k` (int32, rows + 1): causal
    by default, or a (left, right) window as FlashAttention-2 takes it. K/V may have fewer heads (GQA)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None, causal: bool = True,
                window: tuple[int, int] | None = None):
        sizes = {"window_size_left": window[0], "window_size_right": window[1]} if window else {}
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale, **sizes)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng, unused)
        ctx.sizes, ctx.longest, ctx.scale, ctx.causal = sizes, (max_q, max_k), scale, causal
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu_q, cu_k, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.longest, 0.0, ctx.causal, rng, unused,
            scale=ctx.scale, **ctx.sizes)
        return dq, dk, dv, None, None, None, None, None, None, None


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q: int, max_k: int, *, scale: float | None = None,
                window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False, return_aux=None):
    """torch 2.12's `torch.nn.attention.varlen.varlen_attn` (the call unsloth's dispatcher makes) on torch 2.11's
    FlashAttention-2 kernel: (tokens, heads, dim) in and out; window (-1, 0) is causal, (W, 0) causal within W
    tokens, (-1, -1) bidirectional."""
    if return_aux is not None:
        raise NotImplementedError("varlen_attn: return_aux (the log-sum-exp) is not provided on torch 2.11")
    if query.shape[1] != key.shape[1] and not (enable_gqa and query.shape[1] % key.shape[1] == 0):
        raise ValueError(f"varlen_attn: {query.shape[1]} query heads and {key.shape[1]} key heads need enable_gqa "
                         "and a whole number of query heads per key head")
    left, right = window_size
    causal = right == 0
    window = None if (left, right) in ((-1, 0), (-1, -1)) else (left, right)
    cu_k = cu_seq_q if cu_seq_k is None else cu_seq_k
    return _FlashVarlen.apply(query, key, value, cu_seq_q, cu_k, max_q, max_k, scale, causal, window)


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
    out = _FlashVarlen.apply(q, k, v, cu, cu, longest, longest, scaling)
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


# What enable_unsloth_varlen() reads and sets in unsloth.utils.attention_dispatch (unsloth 2026.10.9): no public hook
# chooses the attention kernel of flattened rows. A release without one of them keeps unsloth's own choice (padded
# rows by default, see the unsloth backend), with a warning; tests/test_attention.py holds the contract.
UNSLOTH_DISPATCH = ("_TORCH_VARLEN_ATTN", "_LEAN_VARLEN", "_NATIVE_BEATS_XFORMERS", "_native_beats_xformers",
                    "_visible_capabilities", "_varlen_attn_call")


def enable_unsloth_varlen(dispatch=None) -> bool:
    """Whether unsloth now runs flattened rows (padding-free batches, packing) through one varlen kernel call per
    layer: unsloth's own (torch 2.12+) or `varlen_attn` above (torch 2.11, a CUDA GPU of compute capability 8+).
    Idempotent; `dispatch` is unsloth.utils.attention_dispatch (a stand-in in the tests)."""
    if dispatch is None:
        if not kernel_available():
            return False
        try:
            from unsloth.utils import attention_dispatch as dispatch
        except ImportError:
            return False
    if missing := [name for name in UNSLOTH_DISPATCH if not hasattr(dispatch, name)]:
        log.warning("this unsloth release has no %s in unsloth.utils.attention_dispatch: unpacked rows stay padded "
                    "(FT_PADDING_FREE=true still flattens them, through unsloth's own attention)", ", ".join(missing))
        return False
    if dispatch._TORCH_VARLEN_ATTN is None:
        dispatch._TORCH_VARLEN_ATTN = varlen_attn
        dispatch._LEAN_VARLEN = False  # unsloth's lean path checks torch 2.12's cuDNN rules; varlen_attn is lean already
    elif dispatch._TORCH_VARLEN_ATTN is not varlen_attn:
        return True  # torch 2.12+: unsloth's own kernel choice
    # torch's kernels over xformers' block-diagonal one for flattened rows, as unsloth decides once it has varlen
    dispatch._NATIVE_BEATS_XFORMERS = dispatch._native_beats_xformers(dispatch._visible_capabilities(), True)
    return True
