"""Interleaved A/B timing of ONNX graphs and ONNX Runtime session settings, in one process.

On a machine shared with other work absolute times are noise; variants timed in alternating rounds
in the same process share it, so compare the ratios (and the CPU time, which moves less than wall
time under contention).

    python scripts/ab_onnx.py --batch 32 --seq 128 --rounds 15 \
        old=engines/old/model.onnx new=engines/all-minilm-l6-v2/model.onnx \
        new-spin=engines/all-minilm-l6-v2/model.onnx:spinning=1 new-1t=engines/all-minilm-l6-v2/model.onnx:threads=1

A variant is `label=graph[:key=value,...]` with keys `threads` (intra-op threads, default 2) and
`spinning` (0/1, default 0), as `bei serve` sets them (bei/targets/onnxruntime/backend.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime

from bei.targets.onnxruntime.backend import session_options


@dataclass
class Variant:
    label: str
    session: onnxruntime.InferenceSession
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def parse_variant(text: str) -> Variant:
    label, _, rest = text.partition("=")
    graph, _, opts = rest.partition(":")
    settings = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
    options = session_options(threads=int(settings.get("threads", 2)), spinning=settings.get("spinning", "0") == "1")
    return Variant(label, onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"]))


def feeds_for(batch: int, seq: int) -> dict[str, np.ndarray]:
    """Random token ids, rows of seq/2..seq real tokens (one full row), right padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(batch, seq)).astype(np.int64)
    lengths = rng.integers(max(1, seq // 2), seq + 1, size=batch)
    lengths[0] = seq
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def time_once(variant: Variant, feeds: dict[str, np.ndarray]) -> tuple[float, float]:
    names = {i.name for i in variant.session.get_inputs()}
    inputs = {k: v for k, v in feeds.items() if k in names}
    cpu, wall = time.process_time(), time.perf_counter()
    variant.session.run(None, inputs)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="label=graph.onnx[:threads=N,spinning=0|1]; the first is the baseline")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    feeds = feeds_for(args.batch, args.seq)
    for variant in variants:  # warm-up
        time_once(variant, feeds)
    for round_ in range(args.rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            wall, cpu = time_once(variant, feeds)
            variant.wall.append(wall)
            variant.cpu.append(cpu)
    base = variants[0]
    for v in variants:
        wall, best, cpu = statistics.median(v.wall), min(v.wall), statistics.median(v.cpu)
        print(
            f"{v.label:>14} {args.batch}x{args.seq}: wall median {wall * 1000:8.1f} ms "
            f"({statistics.median(base.wall) / wall:.3f}x)  min {best * 1000:8.1f} ms ({min(base.wall) / best:.3f}x)  "
            f"CPU median {cpu * 1000:8.1f} ms ({statistics.median(base.cpu) / cpu:.3f}x)"
        )


if __name__ == "__main__":
    main()
