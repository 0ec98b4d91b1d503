"""Variable-length attention over a packed batch: each row attends only to its own tokens.

On CUDA in fp16/bf16 this is flash attention's varlen kernel (`torch.nn.attention.varlen`), which
reads `cu_seqlens` and computes no padding. Elsewhere (the CPU, fp32, logit soft-capping, a window
this torch's `varlen_attn` cannot take) the packed tokens are laid out padded, per row, and attended
with a mask: the same result, the fallback.

`window` follows flash attention: (left, right) = the farthest key before / after a query that it
sees, -1 for no limit; `causal` adds right = 0.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F

from bei.modeling.packed.layout import Packed

log = logging.getLogger(__name__)

FULL: tuple[int, int] = (-1, -1)


def _varlen_parameters() -> frozenset[str]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


# read once at import: a cached function called in the traced forward makes dynamo warn and retrace it
VARLEN_PARAMETERS = _varlen_parameters()


def flash_keywords(left: int, right: int, scale: float | None, gqa: bool, accepted: frozenset[str]) -> dict[str, object] | None:
    """The keywords of a `varlen_attn` whose signature has `accepted`, or None when it cannot say
    this window or scale. Older torch (2.11) has no `enable_gqa` (flash takes fewer kv heads
    natively there) and may take `is_causal` in place of `window_size`."""
    options: dict[str, object] = {}
    if "window_size" in accepted:
        options["window_size"] = (left, right)
    elif left == -1 and right in (-1, 0) and "is_causal" in accepted:
        options["is_causal"] = right == 0
    elif (left, right) != FULL:
        return None
    if scale is not None:
        if "scale" not in accepted:
            return None
        options["scale"] = scale
    if "enable_gqa" in accepted:
        options["enable_gqa"] = gqa
    return options


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packed: Packed,
    *,
    causal: bool = False,
    window: tuple[int, int] = FULL,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [tokens, heads, dim], k / v [tokens, kv_heads, dim] -> [tokens, heads, dim]."""
    left, right = window
    if causal:
        right = 0
    flash = bool(VARLEN_PARAMETERS) and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and softcap is None
    options = flash_keywords(left, right, scale, k.shape[1] != q.shape[1], VARLEN_PARAMETERS) if flash else None
    if q.is_cuda and options is None and not torch.compiler.is_compiling():
        _warn_fallback(q.dtype, softcap is not None, (left, right), scale is not None)
    if options is not None:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_len, packed.max_len, **options)  # type: ignore[arg-type]
        return out  # type: ignore[return-value]
    return _masked_attention(q, k, v, packed, left=left, right=right, scale=scale, softcap=softcap)


@functools.cache
def _warn_fallback(dtype: torch.dtype, softcap: bool, window: tuple[int, int], scale: bool) -> None:
    """Once per kind of layer (eager calls only: the CUDA backend runs one eager batch at load)."""
    if dtype not in (torch.float16, torch.bfloat16):
        why = f"{dtype} (flash takes fp16 / bf16)"
    elif softcap:
        why = "logit soft-capping"
    else:
        why = f"window {window}{' with a scale' if scale else ''}, which this torch's varlen_attn cannot take"
    log.warning("attention falls back from flash varlen_attn to padded masked attention on CUDA: %s; slower, same result", why)


def attention_mask(packed: Packed, left: int, right: int) -> torch.Tensor:
    """[rows, 1, max_len, max_len] bool: which key each query of the padded layout sees."""
    keys = packed.key_padding_mask()[:, None, None, :]
    if left < 0 and right < 0:
        return keys
    pos = torch.arange(packed.max_len, device=packed.device)
    distance = pos.view(-1, 1) - pos.view(1, -1)  # query - key
    allowed = torch.ones_like(distance, dtype=torch.bool)
    if left >= 0:
        allowed &= distance <= left
    if right >= 0:
        allowed &= -distance <= right
    return keys & allowed


def _masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packed: Packed,
    *,
    left: int,
    right: int,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    qp, kp, vp = (packed.unpack(t).transpose(1, 2) for t in (q, k, v))  # [rows, heads, len, dim]
    mask = attention_mask(packed, left, right)
    if softcap is None:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=kp.shape[1] != qp.shape[1])
    else:
        groups = qp.shape[1] // kp.shape[1]
        kp, vp = kp.repeat_interleave(groups, dim=1), vp.repeat_interleave(groups, dim=1)
        scores = (qp @ kp.transpose(-1, -2)) * (scale if scale is not None else qp.shape[-1] ** -0.5)
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(qp.dtype) @ vp
    return packed.pack(out.transpose(1, 2))
