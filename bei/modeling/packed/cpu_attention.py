"""Attention over a packed batch on CPUs with bf16 units: bei's own kernel (cpu_attention.cpp).

torch's CPU attention (`scaled_dot_product_attention`, a flash kernel) runs the small heads of
embedding models (head_dim 32 in all-MiniLM-L6-v2) at ~30 useful GFLOP/s per core once the packed
tokens are padded per row and transposed for it; cpu_attention.cpp reads the packed q / k / v in
place and runs both products on AVX512-BF16 (fp32 accumulation, fp32 softmax) at ~100. An engine
whose GEMMs already take bf16 inputs (precision bf16, or W8A8's bf16 layers) uses it; fp32 engines
keep torch's attention.

The kernel is compiled on first use with the host's C++ compiler (`CXX`, default g++; inductor needs
one on the CPU anyway) into `$XDG_CACHE_HOME/bei/kernels/` (default ~/.cache), once per source and
compiler, and loaded with ctypes. Where the CPU lacks AVX512-BF16, no compiler is found, the compile
fails, or `BEI_CPU_ATTENTION=0` is set, `kernel()` says why once and returns None: the engine runs
torch's attention instead (same result within bf16 rounding, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bei.hardware import cpu_features

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
ISA = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")  # what the kernel's instructions need
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma")
HEAD_DIMS = (32, 64, 128)
SWITCH = "BEI_CPU_ATTENTION"  # "0": torch's attention everywhere
COMPILE_TIMEOUT_S = 120
MIN_SPLIT_TOKENS = 64  # a call with fewer tokens runs on one thread whatever the intra-op count


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bei" / "kernels"


def unavailable(features: frozenset[str] | None = None) -> str | None:
    """Why the kernel cannot run here (None: it can, given a compiler)."""
    if os.environ.get(SWITCH, "").strip().lower() in {"0", "off", "no", "false"}:
        return f"{SWITCH}=0"
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return f"{platform.machine()} is not x86-64"
    missing = [f for f in ISA if f not in (cpu_features() if features is None else features)]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX") or "g++")


def _compiled(compiler: str) -> Path:
    """The shared library for this source and compiler, compiled now unless cached; written under a
    temporary name and renamed, so that a concurrent or failed compile leaves no half-written file."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=COMPILE_TIMEOUT_S).stdout
    digest = hashlib.sha256("\0".join((SOURCE.read_text(), version, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_attention-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True, check=True, timeout=COMPILE_TIMEOUT_S
        )
        os.replace(built, target)
    return target


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None (logged once, with the reason) where it cannot run here."""
    why = unavailable()
    compiler = _compiler() if why is None else None
    if why is None and compiler is None:
        why = f"no C++ compiler ({os.environ.get('CXX') or 'g++'}) on PATH"
    if why is None and compiler is not None:
        try:
            library = ctypes.CDLL(str(_compiled(compiler)))
        except subprocess.CalledProcessError as err:
            why = f"{compiler} failed: {(err.stderr or '').strip()[-500:]}"
        except subprocess.TimeoutExpired:
            why = f"{compiler} took over {COMPILE_TIMEOUT_S} s"
        except OSError as err:  # the cache not writable, or the library not loadable
            why = f"no kernel from {cache_dir()}: {err}"
        else:
            entry = library.bei_attention_bf16
            entry.restype = ctypes.c_int
            entry.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5 + [ctypes.c_float]
            return library
    log.info("CPU attention: torch's scaled_dot_product_attention (bei's bf16 kernel is off: %s)", why)
    return None


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="bei-attention")


def _spans(heads: int, parts: int) -> list[tuple[int, int]]:
    cuts = [round(heads * k / parts) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


@torch.library.custom_op("bei::packed_attention_bf16", mutates_args=())
def packed_attention_bf16(qkv: torch.Tensor, cu_seqlens: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """qkv bf16 [tokens, 3 * heads * dim] (q, k, v of each token) -> bf16 [tokens, heads * dim]; the
    heads run on this call's intra-op threads (ctypes releases the GIL)."""
    library = kernel()
    if library is None:
        raise RuntimeError("bei's CPU attention kernel is not available here (see the log)")
    qkv, cu = qkv.contiguous(), cu_seqlens.to(torch.int32).contiguous()
    tokens, dim = qkv.shape[0], qkv.shape[1] // (3 * heads)
    out = torch.empty(tokens, heads * dim, dtype=torch.bfloat16)
    rows = cu.shape[0] - 1

    def run(span: tuple[int, int]) -> int:
        return int(library.bei_attention_bf16(qkv.data_ptr(), out.data_ptr(), cu.data_ptr(), rows, heads, dim, span[0], span[1], scale))

    threads = min(torch.get_num_threads(), heads) if tokens >= MIN_SPLIT_TOKENS else 1
    spans = _spans(heads, threads)
    codes = [run(spans[0])] if len(spans) == 1 else list(_pool(len(spans)).map(run, spans))
    if any(codes):
        raise RuntimeError(f"bei's CPU attention kernel takes head dims {HEAD_DIMS}, not {dim}")
    return out


@packed_attention_bf16.register_fake
def _(qkv: torch.Tensor, cu_seqlens: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3)


def supports(head_dim: int) -> bool:
    """Whether an attention of this head size runs on the kernel here."""
    return head_dim in HEAD_DIMS and kernel() is not None
