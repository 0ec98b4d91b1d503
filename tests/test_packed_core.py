"""The packed layout, pooling on it and variable-length attention (bei/modeling/packed/) against the
padded computations they replace: `bei.modeling.pooling.pool` (sentence-transformers' pooling) and
per-row scaled_dot_product_attention."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from bei.modeling.packed.attention import flash_keywords, varlen_attention
from bei.modeling.packed.layout import Packed, bucket
from bei.modeling.packed.pooling import pool_packed
from bei.modeling.pooling import PoolingConfig, PoolingMode, pool

LENGTHS = [5, 1, 9, 3, 9]


def padded_batch(left: bool, hidden: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    width = max(LENGTHS)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.int64)
    for row, n in enumerate(LENGTHS):
        mask[row, width - n :] = 1 if left else 0
        if not left:
            mask[row, :n] = 1
    ids = torch.randint(5, 50, mask.shape) * mask
    states = torch.randn(len(LENGTHS), width, hidden)
    return ids, mask, states


@pytest.mark.parametrize("left", [False, True])
def test_pack_unpack_repad_round_trip(left: bool) -> None:
    ids, mask, states = padded_batch(left)
    packed = Packed.from_padded(ids, mask)
    assert packed.tokens == sum(LENGTHS) and packed.max_len == max(LENGTHS)
    assert packed.cu_seqlens.tolist() == [0, *itertools.accumulate(LENGTHS)]
    flat = states[mask.bool()]
    assert torch.equal(packed.repad(flat, ids.shape[1], left), states * mask.unsqueeze(-1))
    assert torch.equal(packed.pack(packed.unpack(flat)), flat)
    assert torch.equal(packed.input_ids, ids[mask.bool()])
    assert packed.positions.tolist() == [i for n in LENGTHS for i in range(n)]


MODES = [[m] for m in PoolingMode if m is not PoolingMode.SPLADE_MAX] + [[PoolingMode.CLS, PoolingMode.MEAN]]


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("include_prompt", [True, False])
@pytest.mark.parametrize("modes", MODES, ids=lambda m: "+".join(x.value for x in m))
def test_pooling_matches_padded_pooling(modes: list[PoolingMode], include_prompt: bool, left: bool) -> None:
    ids, mask, states = padded_batch(left)
    prompt = torch.tensor([2, 0, 4, 1, 3])
    config = PoolingConfig(tuple(modes), include_prompt=include_prompt)
    expected = pool(config, states, mask, prompt)
    packed = Packed.from_padded(ids, mask, prompt_length=prompt)
    got = pool_packed(config, states[mask.bool()], packed)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_splade_pooling_matches_padded() -> None:
    ids, mask, states = padded_batch(False, hidden=30)
    config = PoolingConfig((PoolingMode.SPLADE_MAX,))
    got = pool_packed(config, states[mask.bool()], Packed.from_padded(ids, mask))
    torch.testing.assert_close(got, pool(config, states, mask), rtol=1e-6, atol=1e-6)


def per_row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, **kw: object) -> torch.Tensor:
    """Each row alone through SDPA (no padding at all): the definition varlen attention must meet."""
    outs = []
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist(), strict=False):
        qi, ki, vi = (t[start:end].transpose(0, 1) for t in (q, k, v))
        ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
        n = end - start
        d = torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)
        allowed = torch.ones(n, n, dtype=torch.bool)
        left, right = kw.get("window", (-1, -1))  # type: ignore[misc]
        if kw.get("causal"):
            right = 0
        if left >= 0:
            allowed &= d <= left
        if right >= 0:
            allowed &= -d <= right
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (2, 2)}, {"causal": True, "window": (3, -1)}], ids=str)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_attention_matches_each_row_alone(kw: dict[str, object], kv_heads: int) -> None:
    ids, mask, _ = padded_batch(False)
    packed = Packed.from_padded(ids, mask)
    torch.manual_seed(1)
    q = torch.randn(packed.tokens, 4, 8)
    k, v = torch.randn(packed.tokens, kv_heads, 8), torch.randn(packed.tokens, kv_heads, 8)
    got = varlen_attention(q, k, v, packed, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(got, per_row_attention(q, k, v, packed, **kw), rtol=1e-5, atol=1e-5)


def test_softcapped_attention_without_cap_effect_equals_plain() -> None:
    """A cap far above the scores changes nothing: the manual soft-capping path agrees with SDPA."""
    ids, mask, _ = padded_batch(True)
    packed = Packed.from_padded(ids, mask)
    torch.manual_seed(2)
    q, k, v = (torch.randn(packed.tokens, 2, 8) * 0.1 for _ in range(3))
    capped = varlen_attention(q, k, v, packed, causal=True, softcap=1e4)
    torch.testing.assert_close(capped, varlen_attention(q, k, v, packed, causal=True), rtol=1e-5, atol=1e-5)
    squeezed = varlen_attention(q * 50, k * 50, v, packed, causal=True, softcap=1.0)
    assert not torch.allclose(squeezed, varlen_attention(q * 50, k * 50, v, packed, causal=True), atol=1e-3)


@pytest.mark.parametrize("tokens", [1, 5, 15, 16, 31, 100])
def test_bucket_is_a_power_of_two_above(tokens: int) -> None:
    size = bucket(tokens)
    assert size > tokens and size >= 16 and size & (size - 1) == 0  # few distinct graphs


@pytest.mark.parametrize("left", [False, True])
def test_padding_to_a_static_shape_leaves_real_rows_unchanged(left: bool) -> None:
    """CUDA graphs replay fixed shapes: filler rows appended to the packed batch change no real output."""
    ids, mask, _ = padded_batch(left)
    prompt = torch.tensor([2, 0, 4, 1, 3])
    packed = Packed.from_padded(ids, mask, prompt_length=prompt)
    size = bucket(packed.tokens)
    big = packed.padded_to(size)
    assert big.tokens == size and big.rows == size and int(big.cu_seqlens[-1]) == size
    torch.manual_seed(3)
    q, k, v = (torch.randn(size, 2, 8) for _ in range(3))
    full = varlen_attention(q, k, v, big, causal=True)
    alone = varlen_attention(q[: packed.tokens], k[: packed.tokens], v[: packed.tokens], packed, causal=True)
    torch.testing.assert_close(full[: packed.tokens], alone)
    hidden = torch.randn(size, 6)
    for modes in MODES:
        config = PoolingConfig(tuple(modes), include_prompt=False)
        torch.testing.assert_close(pool_packed(config, hidden, big)[: packed.rows], pool_packed(config, hidden[: packed.tokens], packed))


def test_mean_pooling_accumulates_in_fp32() -> None:
    """fp16 hidden states: the per-row sums are fp32, so a long row's mean is as exact as fp32's, rounded once."""
    ids, mask, states = padded_batch(False)
    config = PoolingConfig((PoolingMode.MEAN,))
    half = states.half()
    got = pool_packed(config, half[mask.bool()], Packed.from_padded(ids, mask))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), pool(config, half.float(), mask), rtol=1e-3, atol=1e-3)


def test_flash_keywords_follow_this_torchs_varlen_signature() -> None:
    """torch 2.13's varlen_attn takes window_size / enable_gqa; 2.11's (the GPU machine) may take
    is_causal only: bei's call adapts, or falls back to masked attention where it cannot say the window."""
    new = frozenset({"scale", "window_size", "enable_gqa"})
    old = frozenset({"scale", "is_causal"})
    assert flash_keywords(-1, 0, None, True, new) == {"window_size": (-1, 0), "enable_gqa": True}
    assert flash_keywords(-1, 0, 0.5, True, old) == {"is_causal": True, "scale": 0.5}
    assert flash_keywords(-1, -1, None, False, old) == {"is_causal": False}
    assert flash_keywords(3, 0, None, False, old) is None  # a sliding window: the masked fallback
    assert flash_keywords(-1, -1, 0.5, False, frozenset({"is_causal"})) is None
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    assert flash_keywords(2, 2, 0.5, True, frozenset(inspect.signature(varlen_attn).parameters)) is not None
