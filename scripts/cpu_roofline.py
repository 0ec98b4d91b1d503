#!/usr/bin/env python
"""How fast can an engine for this model go on this CPU, against sentence-transformers in bf16?

    python scripts/cpu_roofline.py                                   # engines/all-minilm-l6-v2, medium texts
    python scripts/cpu_roofline.py engines/all-minilm-l6-v2 --int8-sensitivity

Everything runs on one thread and is timed in that thread's CPU time (`time.thread_time`), so the
figures hold on a machine that other work shares; throughput on N cores is roughly N times these,
less what threading loses. In one run it measures:

1. the kernels: bf16 and int8 GEMMs (oneDNN) on the model's own Linear shapes, and attention
   (`scaled_dot_product_attention`, fp32 and bf16, rows padded to the batch's longest; and bei's
   bf16 kernel on the packed rows where it runs, bei/modeling/packed/cpu_attention.py) on the
   workload's shape, in GFLOP/s;
2. texts/s per core of the engine (tokenizing included, as `bei serve` does it), of
   sentence-transformers with bf16 weights and of sentence-transformers fp32 (`encode`, which
   tokenizes too), on the same texts, in interleaved rounds;
3. the ceilings: an engine whose GEMMs ran at the measured bf16 rate and that spent nothing else
   (GEMM-bound), and one that also paid attention at the faster measured attention rate, each as a
   ratio to sentence-transformers bf16. Layer norms, activations, pooling and tokenizing come on
   top of the second, so it is an upper bound for any engine built from these kernels;
4. with `--int8-sensitivity`: the min cosine against sentence-transformers fp32 when one kind of
   Linear layer (or all) takes int8 weights (per channel) and int8 activations (per token,
   asymmetric), simulated in fp32: what an int8 engine (twice the GEMM rate) would cost in accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import add_engine_arguments, cosine, engine_workload  # noqa: E402

# the Linear kinds of a BERT layer, by the suffix of their sentence-transformers / transformers name
LAYER_KINDS: dict[str, Callable[[str], bool]] = {
    "q/k/v": lambda n: n.endswith(("query", "key", "value")),
    "attention out": lambda n: n.endswith("attention.output.dense"),
    "mlp up": lambda n: n.endswith("intermediate.dense"),
    "mlp down": lambda n: n.endswith("output.dense") and "attention" not in n,
    "all": lambda n: True,
}


def cpu_seconds(run: Callable[[], Any], repeat: int = 10) -> float:
    """Median thread CPU seconds of one `run()`, after two untimed calls."""
    run()
    run()
    times = []
    for _ in range(repeat):
        started = time.thread_time()
        run()
        times.append(time.thread_time() - started)
    return statistics.median(times)


def gemm_rates(rows: int, shapes: list[tuple[int, int]]) -> dict[str, float]:
    """GFLOP/s of [rows, in] x [in, out] over `shapes` (each once), bf16 and int8 (`torch._int_mm`)."""
    flops = sum(2.0 * rows * i * o for i, o in shapes)
    bf16 = [(torch.randn(rows, i, dtype=torch.bfloat16), torch.randn(o, i, dtype=torch.bfloat16)) for i, o in set(shapes)]
    codes = lambda *shape: torch.randint(-127, 127, shape, dtype=torch.int8)  # noqa: E731
    int8 = [(codes(rows, i), codes(i, o)) for i, o in set(shapes)]
    seconds_bf16 = {a.shape[1:] + w.shape[:1]: cpu_seconds(lambda a=a, w=w: F.linear(a, w)) for a, w in bf16}
    seconds_int8 = {a.shape[1:] + w.shape[1:]: cpu_seconds(lambda a=a, w=w: torch._int_mm(a, w)) for a, w in int8}
    return {
        "bf16": flops / sum(seconds_bf16[torch.Size(s)] for s in shapes) / 1e9,
        "int8": flops / sum(seconds_int8[torch.Size(s)] for s in shapes) / 1e9,
    }


def attention_rates(lengths: np.ndarray, heads: int, head_dim: int) -> dict[str, float]:
    """Useful GFLOP/s (QK^T and PV over each row's real tokens) of SDPA on rows padded to the longest."""
    rows, longest = len(lengths), int(lengths.max())
    flops = 4.0 * heads * head_dim * float((lengths.astype(np.float64) ** 2).sum())
    mask = (torch.arange(longest)[None, :] < torch.from_numpy(lengths)[:, None])[:, None, None, :]
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        q, k, v = (torch.randn(rows, heads, longest, head_dim, dtype=dtype) for _ in range(3))
        rates[name] = flops / cpu_seconds(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) / 1e9
    from bei.modeling.packed import cpu_attention

    if cpu_attention.kernel() is not None and head_dim in cpu_attention.HEAD_DIMS:  # bei's kernel, on the packed rows
        cu = torch.zeros(rows + 1, dtype=torch.int32)
        cu[1:] = torch.from_numpy(np.cumsum(lengths))
        qkv = torch.randn(int(cu[-1]), 3 * heads * head_dim, dtype=torch.bfloat16)
        kernel = torch.ops.bei.packed_attention_bf16
        rates["bei bf16"] = flops / cpu_seconds(lambda: kernel(qkv, cu, heads, head_dim**-0.5)) / 1e9
    return rates


class FakeW8A8(torch.nn.Module):
    """int8 weights per output channel, int8 activations per token (asymmetric), computed in fp32."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        self.weight = torch.round(w / scale).clamp(-127, 127) * scale
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        scale = ((high - low) / 255).clamp(min=1e-8)
        zero = torch.round(-low / scale)
        xq = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
        return F.linear(xq, self.weight, self.bias)


def int8_sensitivity(model_dir: str, texts: list[str], reference: np.ndarray) -> dict[str, float]:
    from sentence_transformers import SentenceTransformer

    result = {}
    for kind, chosen in LAYER_KINDS.items():
        model = SentenceTransformer(model_dir, device="cpu")
        for name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear) and "encoder" in f"{name}.{child_name}" and chosen(f"{name}.{child_name}"):
                    setattr(parent, child_name, FakeW8A8(child))
        result[kind] = cosine(model.encode(texts, batch_size=32), reference)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_arguments(p, rounds=3)
    p.add_argument("--int8-sensitivity", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)

    from sentence_transformers import SentenceTransformer

    from bei.backend import Batch
    from bei.checkpoint import resolve_checkpoint
    from bei.targets.loading import load_engine

    engine = load_engine(args.engine)
    manifest, tokenizer = engine.manifest, engine.tokenizer
    model_dir = str(resolve_checkpoint(manifest.source.source, manifest.source.repo, revision=manifest.source.revision).path)
    config = __import__("json").loads((args.engine / "config.json").read_text())
    hidden, heads, inner, layers = (config[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers"))

    workload = engine_workload(args, manifest.max_input_tokens)
    texts, lengths = workload.texts, np.array(workload.tokens)
    print(f"{manifest.name} ({manifest.precision}, {manifest.target.name}); {len(texts)} {args.workload} texts, "
          f"{lengths.mean():.0f} tokens on average; batch {args.batch}; one thread, thread CPU time")  # fmt: skip

    shapes = [(hidden, 3 * hidden), (hidden, hidden), (hidden, inner), (inner, hidden)]
    gemm = gemm_rates(args.batch * int(lengths.mean()), shapes)
    attention = attention_rates(lengths[: args.batch], heads, hidden // heads)
    print(f"kernels: GEMM bf16 {gemm['bf16']:.0f}, int8 {gemm['int8']:.0f} GOP/s on the model's shapes; "
          f"attention {', '.join(f'{k} {v:.0f}' for k, v in attention.items())} useful GFLOP/s")  # fmt: skip

    st_bf16 = SentenceTransformer(model_dir, device="cpu", model_kwargs={"torch_dtype": torch.bfloat16})
    st_fp32 = SentenceTransformer(model_dir, device="cpu")

    def run_engine() -> np.ndarray:
        out = []
        for start in range(0, len(texts), args.batch):
            encoded = [tokenizer.encode(t, truncate=True) for t in texts[start : start + args.batch]]
            out.append(engine.backend.infer(Batch.pad(encoded, tokenizer.pad_id, manifest.padding_side)))
        return np.concatenate(out)

    peers: dict[str, Callable[[], np.ndarray]] = {
        "engine": run_engine,
        "sentence-transformers bf16": lambda: st_bf16.encode(texts, batch_size=args.batch),
        "sentence-transformers fp32": lambda: st_fp32.encode(texts, batch_size=args.batch),
    }
    outputs = {name: run() for name, run in peers.items()}  # untimed: warm-up
    speeds: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(args.rounds):
        for name, run in peers.items():
            started = time.thread_time()
            run()
            speeds[name].append(len(texts) / (time.thread_time() - started))
    per_core = {name: statistics.median(v) for name, v in speeds.items()}
    reference = outputs["sentence-transformers fp32"]
    st = per_core["sentence-transformers bf16"]
    for name, rate in per_core.items():
        print(f"{name:28s} {rate:6.1f} texts/s per core = {rate / st:.2f}x ST bf16, min cosine vs ST fp32 "
              f"{cosine(outputs[name], reference):.5f}")  # fmt: skip

    gemm_flops = float(lengths.mean()) * layers * sum(2.0 * i * o for i, o in shapes)
    attention_flops = 4.0 * heads * (hidden // heads) * layers * float((lengths.astype(np.float64) ** 2).mean())
    gemm_bound = 1e9 * gemm["bf16"] / gemm_flops
    with_attention = 1 / (gemm_flops / gemm["bf16"] / 1e9 + attention_flops / max(attention.values()) / 1e9)
    int8_bound = 1e9 * gemm["int8"] / gemm_flops
    print(f"per text: {gemm_flops / 1e9:.2f} GFLOP of GEMMs, {attention_flops / 1e9:.3f} GFLOP of attention")
    print(f"ceiling, bf16 GEMMs only:            {gemm_bound:6.1f} texts/s per core = {gemm_bound / st:.2f}x ST bf16")
    print(f"ceiling, bf16 GEMMs + attention:     {with_attention:6.1f} texts/s per core = {with_attention / st:.2f}x ST bf16")
    print(f"ceiling, int8 GEMMs only:            {int8_bound:6.1f} texts/s per core = {int8_bound / st:.2f}x ST bf16")
    print(f"the engine reaches {per_core['engine'] / with_attention:.0%} of the bf16 GEMM + attention ceiling")
    if args.int8_sensitivity:
        for kind, value in int8_sensitivity(model_dir, texts, reference).items():
            print(f"int8 (W8 per channel, A8 per token) on {kind:14s}: min cosine vs ST fp32 {value:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
