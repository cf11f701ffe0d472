"""app/attention.py: flattened rows attend within their own row only, padded rows keep transformers' mask, and the
models it cannot serve keep SDPA. The CUDA kernel itself is compared with per-row SDPA in tests/test_gpu.py."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from app import attention


def _load(cfg, implementation):
    torch.manual_seed(0)
    cfg._attn_implementation = implementation
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def name():
    return attention.register()


def test_row_bounds_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = attention.row_bounds(pos, 9, "cpu")
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    assert attention.row_bounds(pos, 9, "cpu")[0] is cu  # computed once per step, not once per layer
    cu, longest = attention.row_bounds(None, 7, "cpu")
    assert cu.tolist() == [0, 7] and longest == 7


def test_flattened_rows_equal_each_row_alone(name):
    """Three rows flattened into one sequence give the logits each row gives alone (SDPA, no neighbours)."""
    reference, flat = _load(tiny_cfg(), "sdpa"), _load(tiny_cfg(), name)
    rows = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 3)]
    with torch.no_grad():
        alone = torch.cat([reference(input_ids=r[None]).logits[0] for r in rows])
        ids = torch.cat(rows)[None]
        positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
        together = flat(input_ids=ids, position_ids=positions).logits[0]
        leaky = reference(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[5:], alone[5:], atol=1e-3)  # the test can tell a row that sees its neighbour


def test_padded_rows_keep_the_mask(name):
    """A padded batch (evaluation, generation) goes through SDPA with transformers' mask: the same logits."""
    reference, model = _load(tiny_cfg(), "sdpa"), _load(tiny_cfg(), name)
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generation pads
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits)


def test_gradients_flow_per_row(name):
    """Backward through the flattened rows equals the sum of the rows' own backward passes."""
    rows = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(10 + n)) for n in (4, 6)]
    reference, flat = _load(tiny_cfg(), "sdpa").train(), _load(tiny_cfg(), name).train()
    for r in rows:
        reference(input_ids=r[None], labels=r[None]).loss.mul(len(r) - 1).backward()
    ids = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    labels = torch.cat([torch.cat([torch.tensor([-100]), r[1:]]) for r in rows])[None]
    flat(input_ids=ids, position_ids=positions, labels=labels).loss.mul(sum(len(r) - 1 for r in rows)).backward()
    for (n, a), (_, b) in zip(reference.named_parameters(), flat.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_models_with_windows_keep_sdpa():
    assert attention.supports(tiny_cfg())
    assert not attention.supports(tiny_cfg(use_sliding_window=True, sliding_window=16))
    gemma_like = tiny_cfg()
    gemma_like.layer_types = ["sliding_attention", "full_attention"]
    assert not attention.supports(gemma_like)


def tiny_cfg(**extra) -> Qwen2Config:
    return Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)


def _unsloth_dispatch(**overrides):
    """A stand-in for unsloth.utils.attention_dispatch (2026.10.9) as torch 2.11 leaves it: no varlen kernel."""
    from types import SimpleNamespace

    seen = []
    names = dict(_TORCH_VARLEN_ATTN=None, _LEAN_VARLEN=False, _NATIVE_BEATS_XFORMERS=False,
                 _native_beats_xformers=lambda caps, loaded: seen.append((caps, loaded)) or loaded,
                 _visible_capabilities=lambda: ((9, 0),), _varlen_attn_call=object())
    names.update(overrides)
    return SimpleNamespace(**names), seen


def test_unsloth_gets_the_varlen_kernel_on_torch_2_11():
    dispatch, seen = _unsloth_dispatch()
    assert attention.enable_unsloth_varlen(dispatch)
    assert dispatch._TORCH_VARLEN_ATTN is attention.varlen_attn and dispatch._LEAN_VARLEN is False
    assert dispatch._NATIVE_BEATS_XFORMERS and seen == [(((9, 0),), True)]  # unsloth's own rule, with varlen
    assert attention.enable_unsloth_varlen(dispatch) and dispatch._TORCH_VARLEN_ATTN is attention.varlen_attn


def test_unsloth_keeps_its_own_varlen_on_newer_torch():
    own = object()
    dispatch, seen = _unsloth_dispatch(_TORCH_VARLEN_ATTN=own, _LEAN_VARLEN=True)
    assert attention.enable_unsloth_varlen(dispatch)
    assert dispatch._TORCH_VARLEN_ATTN is own and dispatch._LEAN_VARLEN and seen == []


def test_an_unsloth_release_without_the_dispatch_names_keeps_padding(caplog):
    dispatch, _ = _unsloth_dispatch()
    del dispatch._native_beats_xformers
    assert not attention.enable_unsloth_varlen(dispatch)
    assert dispatch._TORCH_VARLEN_ATTN is None and "_native_beats_xformers" in caplog.text


def test_without_a_cuda_kernel_unsloth_is_not_touched(monkeypatch):
    monkeypatch.setattr(attention, "kernel_available", lambda: False)
    assert not attention.enable_unsloth_varlen()  # the CPU, or a GPU older than compute capability 8


def test_varlen_attn_refuses_what_the_kernel_cannot_do():
    q, kv = torch.zeros(4, 6, 8), torch.zeros(4, 4, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="enable_gqa"):
        attention.varlen_attn(q, kv, kv, cu, cu, 4, 4, enable_gqa=True)  # 6 heads over 4: not whole groups
    with pytest.raises(ValueError, match="enable_gqa"):
        attention.varlen_attn(q, q[:, :3], q[:, :3], cu, cu, 4, 4)
    with pytest.raises(NotImplementedError, match="return_aux"):
        attention.varlen_attn(q, q, q, cu, cu, 4, 4, return_aux=object())
