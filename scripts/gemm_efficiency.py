#!/usr/bin/env python
"""How close the CPU bf16 engine's GEMMs come to this machine's bf16 matmul rate, in one run.

    python scripts/gemm_efficiency.py engines/all-minilm-l6-v2       # the default build (bf16 where the CPU has it)
    python scripts/gemm_efficiency.py ENGINE_DIR --tokens 256 --batch 32 --threads 1

1. The machine's limit: `torch.matmul` in bf16 on 2048^3 and on the engine's own GEMM shapes
   ([batch x tokens, in] x [in, out] of every Linear), GFLOP/s, median of timed runs.
2. The engine: `bei`'s backend (as `bei serve` loads it) on `--batch` inputs of `--tokens` tokens
   (long inputs, as the goal says), under torch's profiler, on `--threads` threads (default one);
   the Linear GEMMs' FLOPs over their time (oneDNN's `mkldnn::_linear_pointwise`, which bf16 layers
   call with packed weights, or `aten::linear` / `aten::addmm` / `aten::mm`), and the share of the
   forward they take.

It prints the GEMMs' rate as a fraction of each limit. Inputs are random ids of the model's vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "aten::matmul")


def matmul_rate(m: int, k: int, n: int, iters: int = 10) -> float:
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2.0 * m * k * n / statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine", type=Path)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    # one: with two or more, the engine runs a batch in lanes on threads of its own, which torch's
    # profiler does not see (it would report no GEMM at all); the rate per core is what compares anyway
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from bei.backend import Batch
    from bei.targets.loading import load_engine
    from bei.text.tokenizer import Encoded

    engine = load_engine(args.engine)
    module = getattr(engine.backend, "module", None)
    if module is None:
        print(f"{args.engine}: not a torch engine ({engine.manifest.target.name}); this measures the torch target", file=sys.stderr)
        return 2
    tokens = min(args.tokens, engine.manifest.max_input_tokens)
    linears = [(m.in_features, m.out_features) for m in module.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
    rows = args.batch * tokens
    print(f"engine {engine.manifest.name}: {engine.manifest.precision}, {len(linears)} Linear layers; {args.batch} x {tokens} tokens, "
          f"{args.threads} threads")  # fmt: skip

    peak_cube = matmul_rate(2048, 2048, 2048)
    shapes = sorted(set(linears))
    per_shape = {s: matmul_rate(rows, s[0], s[1]) for s in shapes}
    flops_per_call = sum(2.0 * rows * i * o for i, o in linears)
    limit_model = flops_per_call / sum(2.0 * rows * i * o / per_shape[(i, o)] for i, o in linears)
    print(f"bf16 matmul: {peak_cube / 1e9:.0f} GFLOP/s on 2048^3; {limit_model / 1e9:.0f} GFLOP/s on the engine's GEMM shapes "
          + ", ".join(f"{i}x{o} {r / 1e9:.0f}" for (i, o), r in per_shape.items()))  # fmt: skip

    rng = np.random.default_rng(0)
    vocab = int(engine.tokenizer.vocab_size) if hasattr(engine.tokenizer, "vocab_size") else 1000
    enc = [Encoded(ids=rng.integers(5, max(6, vocab - 1), tokens).tolist(), type_ids=[0] * tokens, offsets=[(0, 0)] * tokens,
                   special=[0] * tokens) for _ in range(args.batch)]  # fmt: skip
    batch = Batch.pad(enc, engine.tokenizer.pad_id, engine.manifest.padding_side)
    for _ in range(3):
        engine.backend.infer(batch)
    from torch.profiler import ProfilerActivity, profile

    calls = 5
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            engine.backend.infer(batch)
    wall = (time.perf_counter() - started) / calls
    gemm_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / calls
    rate = flops_per_call / (gemm_us / 1e6)
    share = gemm_us / 1e6 / wall
    print(f"engine: {wall * 1e3:.1f} ms per call (profiled), GEMMs {gemm_us / 1e3:.1f} ms ({share:.0%} of it): {rate / 1e9:.0f} "
          f"GFLOP/s = {rate / limit_model:.0%} of the bf16 rate on its shapes, {rate / peak_cube:.0%} of 2048^3")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
