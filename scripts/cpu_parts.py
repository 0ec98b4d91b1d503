#!/usr/bin/env python
"""How fast does a torch CPU engine run a batch when it is split into parts of N tokens?

    python scripts/cpu_parts.py engines/all-minilm-l6-v2-w8a8
    python scripts/cpu_parts.py engines/all-minilm-l6-v2 --parts 512,1024,2048,0

The torch backend runs a CPU batch in parts of about `CHUNK_TOKENS` tokens (`token_chunks`,
bei/targets/torch/backend.py). This times the engine's backend on the workload's texts, in batches of
`--batch`, once per part size (0: the whole batch as one call), on one thread, in thread CPU time,
interleaved rounds in one process, and prints texts/s per core for each: the figures behind
CHUNK_TOKENS (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import add_engine_arguments, engine_workload  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_arguments(p, rounds=5)
    p.add_argument("--parts", default="256,512,1024,2048,0", help="part sizes in tokens; 0: the whole batch")
    args = p.parse_args()

    from bei.backend import Batch
    from bei.targets.loading import load_engine
    from bei.targets.torch import backend as torch_backend

    torch.set_num_threads(1)  # one lane: the parts alone change
    engine = load_engine(args.engine)
    if not isinstance(engine.backend, torch_backend.TorchBackend):
        print(f"cpu_parts: {args.engine} is not a torch engine", file=sys.stderr)
        return 2
    tokenizer, manifest = engine.tokenizer, engine.manifest
    workload = engine_workload(args, manifest.max_input_tokens)
    encoded = [tokenizer.encode(text, truncate=True) for text in workload.texts]
    batches = [Batch.pad(encoded[i : i + args.batch], tokenizer.pad_id, manifest.padding_side) for i in range(0, len(encoded), args.batch)]
    sizes = [int(s) for s in args.parts.split(",")]
    prepared = {}
    for size in sizes:  # prepare (and compile every part's shape) with each part size in turn
        torch_backend.CHUNK_TOKENS = size or 10**9
        prepared[size] = [engine.backend.prepare(batch) for batch in batches]
        for one in prepared[size]:
            engine.backend.run(one)
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(args.rounds):
        for size in sizes:
            started = time.thread_time()
            for one in prepared[size]:
                engine.backend.run(one)
            rates[size].append(len(encoded) / (time.thread_time() - started))
    what = f"{len(encoded)} {args.workload} texts, batch {args.batch}"
    print(f"{args.engine.name} ({manifest.precision}); {what}; one thread, thread CPU time")
    for size in sizes:
        label = f"parts of {size} tokens" if size else "whole batch"
        print(f"{label:24s} {statistics.median(rates[size]):6.1f} texts/s per core  ({' '.join(f'{r:.1f}' for r in rates[size])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
