"""bei's CPU attention kernel (bei/modeling/packed/cpu_attention.cpp): attention over the packed q / k / v
in bf16 on AVX512-BF16, for the CPU engines whose GEMMs take bf16. Checked against torch's attention on
the same bf16-rounded inputs in fp32, row by row and thread split by thread split; where this CPU lacks
AVX512-BF16 (or no compiler is found) the kernel must say why and the engines keep torch's attention."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from bei.modeling.detect import read_model_spec
from bei.modeling.packed import cpu_attention
from bei.modeling.packed.attention import varlen_attention
from bei.modeling.packed.bf16 import to_bf16
from bei.modeling.packed.blocks import Attention, use_cpu_attention
from bei.modeling.packed.layout import Packed
from bei.modeling.packed.model import build_packed_module

HERE = cpu_attention.kernel()
needs_kernel = pytest.mark.skipif(HERE is None, reason=f"no bf16 CPU attention here: {cpu_attention.unavailable() or 'no compiler'}")


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """kernel() compiled again into an empty cache (tmp_path/bei/kernels), then the session's back."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_attention.kernel.cache_clear()
    yield tmp_path / "bei" / "kernels"
    cpu_attention.kernel.cache_clear()


def _packed(lengths: list[int], ids: torch.Tensor | None = None) -> Packed:
    mask = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return Packed.from_padded(np.ones_like(mask) if ids is None else ids, mask)


def _reference(qkv: torch.Tensor, packed: Packed, heads: int) -> torch.Tensor:
    """torch's attention (fp32) on the same bf16 inputs."""
    q, k, v = qkv.float().view(qkv.shape[0], 3, heads, -1).unbind(1)
    return varlen_attention(q, k, v, packed).reshape(qkv.shape[0], -1)


def _run(qkv: torch.Tensor, packed: Packed, heads: int) -> torch.Tensor:
    dim = qkv.shape[1] // (3 * heads)
    return cpu_attention.packed_attention_bf16(qkv, packed.cu_seqlens, heads, dim**-0.5)


@needs_kernel
@pytest.mark.parametrize(("heads", "dim"), [(12, 32), (4, 64), (2, 128)])
def test_matches_torch_attention_on_every_row_length(heads: int, dim: int) -> None:
    lengths = [1, 2, 15, 16, 17, 33, 63, 64, 65, 130, 300]  # across the kernel's blocks of 16, 32 and 64 keys
    packed = _packed(lengths)
    torch.manual_seed(0)
    qkv = (torch.randn(packed.tokens, 3 * heads * dim) * 0.8).bfloat16()
    got, want = _run(qkv, packed, heads), _reference(qkv, packed, heads)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    floor = (want.bfloat16().float() - want).norm() / want.norm()  # rounding the output to bf16, nothing else
    for start, end in zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist(), strict=True):
        g, w = got[start:end].float(), want[start:end]
        assert (g - w).norm() / w.norm() < 2.5 * floor + 1e-3, (end - start, float((g - w).norm() / w.norm()), float(floor))


@needs_kernel
def test_each_row_sees_only_its_own_tokens_and_threads_do_not_change_it() -> None:
    heads, dim = 6, 32
    packed = _packed([40, 7, 90])
    torch.manual_seed(1)
    qkv = torch.randn(packed.tokens, 3 * heads * dim).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(qkv, packed, heads)
        torch.set_num_threads(3)  # heads split 2 / 2 / 2 over three threads
        split = _run(qkv, packed, heads)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, split)
    changed = qkv.clone()
    changed[40:47] = torch.randn(7, 3 * heads * dim).bfloat16()  # the middle row only
    again = _run(changed, packed, heads)
    assert torch.equal(again[:40], one[:40]) and torch.equal(again[47:], one[47:])
    assert not torch.equal(again[40:47], one[40:47])


@needs_kernel
@pytest.mark.parametrize("model_type", ["bert", "nomic_bert"])  # learned positions; rotary (q and k rotated before the kernel)
def test_a_bf16_module_with_the_kernel_stays_with_transformers(tiny_checkpoint_factory: Callable[..., Path], model_type: str) -> None:
    fields = {"hidden_size": 64, "num_attention_heads": 2, "head_dim": 32, "intermediate_size": 128}
    spec = read_model_spec(tiny_checkpoint_factory(model_type, "embed", config_fields=fields))
    module = build_packed_module(spec).eval()
    torch.manual_seed(2)
    packed = _packed([5, 33, 70, 12], ids=torch.randint(5, 90, (4, 70)))
    with torch.no_grad():
        exact = module.body(packed)
        to_bf16(module)
        plain = module.body(packed)
        assert use_cpu_attention(module) == 2 and all(m.bf16_kernel for m in module.modules() if isinstance(m, Attention))
        kernel = module.body(packed)
    for got in (plain, kernel):
        cos = torch.nn.functional.cosine_similarity(got.float(), exact.float(), dim=-1)
        assert cos.min() >= 0.9995, cos.min()
    assert not torch.equal(kernel, plain)  # the kernel did run


def test_without_avx512_bf16_the_kernel_says_why(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert cpu_attention.unavailable(frozenset({"avx2", "fma", "avx512f"})) == ("this CPU lacks avx512bw, avx512vl, avx512dq, avx512_bf16")
    assert cpu_attention.unavailable(frozenset(cpu_attention.ISA)) in (None, f"{cpu_attention.SWITCH}=0")
    monkeypatch.setenv(cpu_attention.SWITCH, "0")
    cpu_attention.kernel.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="bei.modeling.packed.cpu_attention"):
            assert cpu_attention.kernel() is None
        assert "bei's bf16 kernel is off: BEI_CPU_ATTENTION=0" in caplog.text
    finally:
        cpu_attention.kernel.cache_clear()


def test_layers_stay_on_torch_attention_where_the_kernel_cannot_run(
    tiny_checkpoint_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off (no AVX512-BF16 here, or switched off) or a head size it does not take: torch's attention."""
    monkeypatch.setenv(cpu_attention.SWITCH, "0")
    cpu_attention.kernel.cache_clear()
    try:
        fields = {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}
        module = build_packed_module(read_model_spec(tiny_checkpoint_factory("bert", "embed", config_fields=fields)))
        assert use_cpu_attention(module) == 0 and not any(m.bf16_kernel for m in module.modules() if isinstance(m, Attention))
    finally:
        cpu_attention.kernel.cache_clear()
    if HERE is not None:  # head_dim 8 (the tiny models' default) is not one the kernel takes
        small = build_packed_module(read_model_spec(tiny_checkpoint_factory("bert", "embed")))
        assert use_cpu_attention(small) == 0


@needs_kernel
def test_compiled_once_per_source_and_a_failed_compile_leaves_nothing(
    fresh_kernel: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert cpu_attention.kernel() is not None
    built = list(fresh_kernel.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    cpu_attention.kernel.cache_clear()
    assert cpu_attention.kernel() is not None
    assert list(fresh_kernel.iterdir()) == built and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    # a compiler that fails: logged with its message, the cache keeps only the good library
    broken = fresh_kernel.parent / "broken-cxx"
    broken.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo broken 1; exit 0; fi\necho "no bf16 here" >&2; exit 1\n')
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    cpu_attention.kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="bei.modeling.packed.cpu_attention"):
        assert cpu_attention.kernel() is None
    assert f"{broken} failed: no bf16 here" in caplog.text
    assert list(fresh_kernel.iterdir()) == built


@needs_kernel
def test_a_cache_that_cannot_be_written_leaves_torch_attention(
    fresh_kernel: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = fresh_kernel.parent.parent / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    with caplog.at_level(logging.INFO, logger="bei.modeling.packed.cpu_attention"):
        assert cpu_attention.kernel() is None
    assert f"no kernel from {blocked}/bei/kernels" in caplog.text
