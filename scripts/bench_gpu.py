#!/usr/bin/env python
"""The torch target against transformers on one GPU, in one run, with the limit measured in that run.

    python scripts/bench_gpu.py --out bench_gpu.json                  # the full run (H100 / H200)
    python scripts/bench_gpu.py --layers 8 --out bench_gpu.json       # Mistral-7B shapes, 8 of 32 layers
    python scripts/bench_gpu.py --device cpu --tiny                   # the same code paths, tiny shapes
    python scripts/bench_gpu.py --build-engine DIR [--engine-model bert-base]   # a random checkpoint, built
    python scripts/bench_gpu.py --http ENGINE_DIR                     # `bei serve` over 127.0.0.1

What it measures (random weights; every figure on the same device in the same process):

- `peak`: 8192^3 matrix products: bf16 and fp16 `torch.matmul`, fp8 e4m3 `torch._scaled_mm` with
  row-wise scales (fp32 [M, 1] x [1, N], bf16 out), in TFLOP/s. These are the limits below.
- `mistral-7b`: hidden 4096, 32 layers (`--layers`), 32 heads, 8 kv heads, intermediate 14336, vocab
  32000; 32 inputs of 500 tokens, tokens/s of: transformers `MistralModel` (SDPA, bf16) eager and under
  `torch.compile` (default mode); bei's packed module (`make_body` + `PackedEngineModule`, task embed,
  lasttoken pooling, the transformers model's weights) eager, and compiled as `TorchBackend` compiles it
  (`torch.compile(dynamic=True)`); the same after `quantize_fp8` (row-wise dynamic activation scales,
  per-channel weight scales), compiled.
- `bert-base`, `bert-large` (fp16): 32 inputs of 500 tokens; mixed inputs of 16-512 tokens (2,048,
  uniform lengths, fixed seed: real tokens/s; transformers in length-sorted padded batches of 64, bei
  packed in the inputs' own order, batches of <= 16,384 tokens); 5-token requests one at a time
  (latency and requests/s, each end to end: host arrays in, pooled vectors on the host) through
  transformers eager, bei's `TorchBackend` eager, and `TorchBackend` compiled (its CUDA-graph buckets);
  for bert-base also 64 such requests as one batch: transformers, bei's CUDA graph of the 512-token
  bucket, and bei's dynamic-shape graph on the unpadded batch.

Fraction of the limit = FLOPs done / time / the peak matmul rate of the row's precision, with
FLOPs of one input of n tokens = 2 x (Linear weights of the model) x n + 4 x n^2 x hidden x layers
(the QK^T and PV products at full n x n, no causal halving; embeddings, norms, activations and
pooling not counted). For 500 tokens that is, per token, 2 x linear params + 4 x 500 x hidden x layers.

`--http ENGINE_DIR` builds nothing: it starts `bei serve ENGINE_DIR` on 127.0.0.1 and drives it with
`bei.client.AsyncClient` (in `--client-processes` processes), one 5-token text per request, at
concurrency 1, 8 and 64: requests/s, p50 / p99 latency, and the server's cold start (spawn to healthy).

Output: a table on stdout (each row printed when measured, the table at the end) and, with `--out`, a
JSON file rewritten after every row; every row carries the command line that produced it. A failing
measurement is a row with its error, and the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import inspect
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent  # bei: installed, or this checkout on PYTHONPATH (scripts/gpu-check sets it)

COMMAND = shlex.join(["python", "scripts/bench_gpu.py", *sys.argv[1:]])

MISTRAL_7B: dict[str, Any] = {
    "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
    "hidden_act": "silu", "tie_word_embeddings": False,
}  # fmt: skip
BERT_BASE: dict[str, Any] = {
    "model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
    "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
}  # fmt: skip
BERT_LARGE = {**BERT_BASE, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
# tiny shapes: every width a multiple of 16 (FP8), so the same code paths run
TINY_MISTRAL = {**MISTRAL_7B, "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}  # fmt: skip
TINY_BERTS = {
    "bert-base": {**BERT_BASE, "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 128},
    "bert-large": {**BERT_BASE, "vocab_size": 1000, "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                   "intermediate_size": 192},
}  # fmt: skip


@dataclass(frozen=True)
class Shapes:
    mistral: dict[str, Any]
    berts: dict[str, dict[str, Any]]
    batch: int = 32  # inputs of `seq` tokens per call (Mistral and the BERTs' fixed workload)
    seq: int = 500
    mixed_count: int = 2048
    mixed_min: int = 16
    mixed_max: int = 512
    padded_batch: int = 64  # transformers' batches on mixed inputs
    max_batch_tokens: int = 16384  # bei's batches on mixed inputs
    small_tokens: int = 5
    small_requests: int = 200
    small_batch: int = 64  # short requests batched together (bert-base): the 512-token CUDA-graph bucket
    peak_n: int = 8192
    warmup: int = 1  # untimed calls after the first (which, compiled, is timed apart as compile_s)
    iters: int = 5


FULL = Shapes(mistral=MISTRAL_7B, berts={"bert-base": BERT_BASE, "bert-large": BERT_LARGE})
TINY = Shapes(mistral=TINY_MISTRAL, berts=TINY_BERTS, batch=4, seq=64, mixed_count=24, mixed_min=4, mixed_max=96,
              padded_batch=16, max_batch_tokens=1024, small_requests=10, small_batch=8, peak_n=256, warmup=1, iters=2)  # fmt: skip


# --- rows ----------------------------------------------------------------------------------------
@dataclass
class Row:
    section: str
    what: str
    workload: str
    value: float | None = None
    unit: str = ""
    limit_fraction: float | None = None  # of the measured matmul peak of the row's precision
    ms: float | None = None  # median time of one timed call
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    command: str = COMMAND


class Report:
    """Rows as they come: printed at once, the JSON file rewritten after each."""

    def __init__(self, out: Path | None, environment: dict[str, Any]) -> None:
        self.out, self.environment = out, environment
        self.rows: list[Row] = []
        self.started = datetime.now(UTC).isoformat(timespec="seconds")

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"[{row.section}] {row.what} / {row.workload}: {_value(row)} {_fraction(row)} {_notes(row)}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        if self.out is None:
            return
        data = {"command": COMMAND, "started": self.started, "environment": self.environment, "rows": [asdict(r) for r in self.rows]}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.out)

    def table(self) -> str:
        header = ("section", "what", "workload", "value", "of limit", "ms/call", "notes")
        lines = [
            (r.section, r.what, r.workload, _value(r), _fraction(r), f"{r.ms:.2f}" if r.ms is not None else "", _notes(r))
            for r in self.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths[:-1]) + " | {}"
        sep = "-+-".join("-" * w for w in widths[:-1]) + "-+-" + "-" * 5
        return "\n".join([fmt.format(*header), sep, *(fmt.format(*line) for line in lines)])


def _value(row: Row) -> str:
    if row.error:
        return "ERROR"
    if row.value is None:
        return ""
    v = row.value
    text = f"{v / 1e6:.3f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:.1f}" if v >= 10 else f"{v:.3g}"
    return f"{text} {row.unit}"


def _fraction(row: Row) -> str:
    return f"{row.limit_fraction:.0%}" if row.limit_fraction is not None else ""


def _notes(row: Row) -> str:
    if row.error:
        return row.error[:160]
    keys = ("tflops", "limit_tok_s", "compile_s", "cosine", "p50_ms", "p99_ms", "graphs", "padding", "tokens", "note")
    parts = []
    for key in keys:
        if key in row.extra and row.extra[key] is not None:
            v = row.extra[key]
            parts.append(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}")
    return ", ".join(parts)


def guarded(report: Report, section: str, what: str, workload: str) -> Callable[[Callable[[], Row]], Row]:
    """Run one measurement; an exception becomes an error row (the one-shot GPU run goes on)."""

    def run(measure: Callable[[], Row]) -> Row:
        try:
            return report.add(measure())
        except Exception as err:  # noqa: BLE001 - reported as the row's error
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            return report.add(Row(section, what, workload, error=f"{type(err).__name__}: {err}", extra={"traceback": tb[-4000:]}))
        finally:
            release(dynamo=False)  # compiled code stays for the section's next workload

    return run


# --- environment and compatibility ------------------------------------------------------------
def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "device": device, "host": platform.node(),
    }  # fmt: skip
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))  # fmt: skip
    if os.environ.get("BEI_COMMIT"):  # the GPU machine's copy of the tree has no .git: the caller passes it
        env["bei_commit"] = os.environ["BEI_COMMIT"]
        return env
    try:
        env["bei_commit"] = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        env["bei_commit"] = None
    return env


def varlen_compat(env: dict[str, Any]) -> None:
    """Record this torch's `varlen_attn` keywords: bei adapts its call to them
    (bei/modeling/packed/attention.py `flash_options`), or takes the masked fallback."""
    try:
        from torch.nn.attention import varlen
    except ImportError as err:
        env["varlen_attn"] = f"missing: {err}"
        return
    env["varlen_attn_parameters"] = sorted(inspect.signature(varlen.varlen_attn).parameters)


def use_compile_backend(name: str) -> None:
    """`--compile-backend` other than inductor: every torch.compile of this process (bei's included)
    uses it; the mode (reduce-overhead) is inductor's and is dropped."""
    import torch

    if name == "inductor":
        return
    original = torch.compile

    def compile_with(model: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("mode", None)
        kwargs["backend"] = name
        return original(model, **kwargs)

    torch.compile = compile_with  # type: ignore[assignment]


def release(dynamo: bool = True) -> None:
    """Free what the last measurement left (and, between sections, torch.compile's caches)."""
    import torch

    if dynamo:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# --- timing ------------------------------------------------------------------------------------
class Clock:
    """Median time of a call: CUDA events around each call on the GPU, perf_counter on the CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.cuda = torch, device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def first(self, fn: Callable[[], Any]) -> float:
        """Seconds of one call, synchronized: the first call of a compiled function (its compile time)."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def median(self, fn: Callable[[], Any], warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times: list[float] = []
        if self.cuda:
            events = [(self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            self.sync()
            times = [start.elapsed_time(end) / 1e3 for start, end in events]
        else:
            for _ in range(iters):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return float(np.median(times))


# --- FLOPs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    linear_params: int
    hidden: int
    layers: int

    def of(self, lengths: np.ndarray | list[int]) -> float:
        n = np.asarray(lengths, dtype=np.float64)
        return float(np.sum(2.0 * self.linear_params * n + 4.0 * n * n * self.hidden * self.layers))

    def per_token(self, seq: int) -> float:
        return 2.0 * self.linear_params + 4.0 * seq * self.hidden * self.layers


def linear_params(module: Any) -> int:
    import torch

    from bei.modeling.packed.fp8 import Fp8Linear

    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear | Fp8Linear))


# --- models ------------------------------------------------------------------------------------
@contextlib.contextmanager
def building(device: str, dtype: Any) -> Iterator[None]:
    """Modules made directly on `device` in `dtype` (random init on the GPU: seconds, not minutes)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def hf_model(config: dict[str, Any], device: str, dtype: Any) -> Any:
    """transformers' base model of `config` (SDPA), random weights."""
    import transformers

    fields: dict[str, Any] = {**{k: v for k, v in config.items() if k != "model_type"}, "attn_implementation": "sdpa"}
    model: Any
    with building(device, dtype):
        if config["model_type"] == "mistral":  # no KV cache: an embedding server keeps none
            model = transformers.MistralModel(transformers.MistralConfig(**fields, use_cache=False))
        else:
            model = transformers.BertModel(transformers.BertConfig(**fields), add_pooling_layer=False)
    return model.to(device=device, dtype=dtype).eval()


def bei_spec(config: dict[str, Any]) -> Any:
    from bei.kinds import Task
    from bei.modeling.pooling import PoolingConfig, PoolingMode
    from bei.modeling.spec import ModelSpec

    causal = config["model_type"] == "mistral"
    return ModelSpec(
        path=ROOT, architecture="MistralModel" if causal else "BertModel", model_type=config["model_type"],
        base_model="encoder" if causal else "encoder_bert", task=Task.EMBED, hidden_size=config["hidden_size"],
        num_heads=config["num_attention_heads"], max_seq_len=config["max_position_embeddings"],
        pooling=PoolingConfig((PoolingMode.LAST_TOKEN if causal else PoolingMode.MEAN,)),
        uses_token_type_ids=not causal, padding_side="left" if causal else "right",
    )  # fmt: skip


def bei_module(config: dict[str, Any], reference: Any, device: str, dtype: Any) -> Any:
    """bei's packed module of `config` with the transformers model's weights (so outputs compare)."""
    from bei.modeling.packed.model import PackedEngineModule, make_body

    spec = bei_spec(config)
    body: Any
    with building(device, dtype):
        body = make_body(spec, dict(config))
    missing, unexpected = body.load_state_dict(body.convert_hf_state(reference.state_dict()), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"transformers weights do not fit bei's module: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return PackedEngineModule(spec, body, load_heads=False).to(device=device, dtype=dtype).eval()


def pooled(hidden: Any, mask: Any, mode: str) -> Any:
    """transformers' last hidden state pooled as bei pools (right padding)."""
    import torch

    if mode == "last":
        ends = mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), ends]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def cosine_check(fn: Callable[[], list[Any]], against: Any, **extra: Any) -> Callable[[], dict[str, Any]]:
    """A row's check (run after its timing, inside its guard): the min cosine of `fn`'s outputs to `against`."""
    import torch

    return lambda: {"cosine": min_cosine(torch.cat(fn()), against), **extra}


def min_cosine(a: Any, b: Any) -> float:
    import torch

    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return float(cos.min()) if torch.isfinite(cos).all() else float("nan")


# --- inputs ------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Random token ids per input (fixed seed), and the batches each runner gets."""

    ids: list[np.ndarray]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    @classmethod
    def random(cls, lengths: np.ndarray, vocab: int, seed: int) -> Inputs:
        rng = np.random.default_rng(seed)
        return cls([rng.integers(5, vocab, int(n), dtype=np.int64) for n in lengths])

    def padded(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(self.ids[i]) for i in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, i in enumerate(rows):
            ids[r, : len(self.ids[i])], mask[r, : len(self.ids[i])] = self.ids[i], 1
        return ids, mask

    def sorted_groups(self, size: int) -> list[list[int]]:
        """Length-sorted groups of `size` (transformers' padded batches)."""
        order = np.argsort(self.lengths, kind="stable").tolist()
        return [order[i : i + size] for i in range(0, len(order), size)]

    def token_groups(self, budget: int) -> list[list[int]]:
        """Consecutive inputs, in their own order, up to `budget` tokens per group (bei's packed batches)."""
        groups: list[list[int]] = [[]]
        used = 0
        for i, n in enumerate(self.lengths.tolist()):
            if groups[-1] and used + n > budget:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += n
        return groups


def hf_feeds(inputs: Inputs, groups: list[list[int]], device: str) -> list[tuple[Any, Any]]:
    import torch

    return [tuple(torch.from_numpy(a).to(device) for a in inputs.padded(g)) for g in groups]  # type: ignore[misc]


def packed_feeds(inputs: Inputs, groups: list[list[int]], device: str, types: bool) -> list[Any]:
    from bei.modeling.packed.layout import Packed

    feeds = []
    for g in groups:
        ids, mask = inputs.padded(g)
        feeds.append(Packed.from_padded(ids, mask, np.zeros_like(ids) if types else None, device=device))
    return feeds


# --- measurements ------------------------------------------------------------------------------
@dataclass
class Context:
    args: argparse.Namespace
    shapes: Shapes
    clock: Clock
    report: Report
    peaks: dict[str, float]  # precision -> FLOP/s
    device: str


@dataclass(frozen=True)
class Workload:
    """What one timed call processes: real tokens per input, and the model's FLOPs."""

    section: str
    label: str
    lengths: np.ndarray
    flops: Flops

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def run_all(fn: Callable[[Any], Any], feeds: list[Any]) -> list[Any]:
    """One timed call: every batch of the workload."""
    return [fn(feed) for feed in feeds]


def hf_pooled(model: Any, mode: str, feed: tuple[Any, Any]) -> Any:
    ids, mask = feed
    return pooled(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask, mode)


def throughput_row(
    ctx: Context,
    work: Workload,
    what: str,
    fn: Callable[[], Any],
    precision: str,
    compiled: bool,
    extra: dict[str, Any],
    check: Callable[[], dict[str, Any]] | None = None,
) -> Row:
    """tokens/s of `fn`, median of timed calls after warm-up; compiled: the first call is timed apart;
    `check` (the cosine against transformers) runs after the timing and adds to the row's extra."""
    extra = dict(extra)
    before = graphs_compiled()
    if compiled:
        extra["compile_s"] = ctx.clock.first(fn)
    seconds = ctx.clock.median(fn, ctx.shapes.warmup, ctx.shapes.iters)
    if compiled:
        extra["graphs"] = graphs_compiled() - before  # > 1: graph breaks or recompiles
    if check is not None:
        extra.update(check())
    flops = work.flops.of(work.lengths)
    ctx.report.environment.setdefault("linear_params", {})[work.section] = work.flops.linear_params
    peak = ctx.peaks.get(precision)
    extra.update(tflops=flops / seconds / 1e12, tokens=work.tokens)
    if len(set(work.lengths.tolist())) == 1 and peak:
        extra["limit_tok_s"] = peak / work.flops.per_token(int(work.lengths[0]))
    return Row(
        work.section, what, work.label, work.tokens / seconds, "tok/s", flops / seconds / peak if peak else None, seconds * 1e3, extra
    )


def throughput(ctx: Context, work: Workload, what: str, fn: Callable[[], Any], precision: str, *, compiled: bool = False,
               extra: dict[str, Any] | None = None, check: Callable[[], dict[str, Any]] | None = None) -> Row:  # fmt: skip
    return guarded(ctx.report, work.section, what, work.label)(
        partial(throughput_row, ctx, work, what, fn, precision, compiled, extra or {}, check)
    )


def measure_peaks(ctx: Context) -> None:
    import torch

    from bei.modeling.packed.fp8 import cpu_rowwise_scaled_mm

    n, dev = ctx.shapes.peak_n, ctx.device
    flops = 2.0 * n**3
    gen = torch.Generator(device=dev).manual_seed(ctx.args.seed)
    iters = 10 if dev == "cuda" else 3

    def matmul(dtype: Any) -> Row:
        name = str(dtype).removeprefix("torch.")
        a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
        seconds = ctx.clock.median(partial(torch.matmul, a, b), 3, iters)
        ctx.peaks[name] = flops / seconds
        return Row("peak", f"torch.matmul {name}", f"{n}^3", flops / seconds / 1e12, "TFLOP/s", ms=seconds * 1e3, extra={"precision": name})

    def scaled_mm() -> Row:
        e4m3 = torch.float8_e4m3fn
        a = torch.randn(n, n, device=dev, generator=gen).to(e4m3)
        b = torch.randn(n, n, device=dev, generator=gen).to(e4m3)  # [N, K] row-major: b.t() is column-major
        rowwise = dev == "cuda" or cpu_rowwise_scaled_mm()  # some CPU kernels take per-tensor scales only (2.11)
        scale_a = torch.rand(n if rowwise else 1, 1, device=dev, generator=gen) + 0.5
        scale_b = torch.rand(1, n if rowwise else 1, device=dev, generator=gen) + 0.5
        seconds = ctx.clock.median(
            partial(torch._scaled_mm, a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16), 3, iters
        )
        ctx.peaks["fp8"] = flops / seconds
        what = f"torch._scaled_mm fp8 e4m3, {'row-wise' if rowwise else 'per-tensor'} scales"
        return Row("peak", what, f"{n}^3", flops / seconds / 1e12, "TFLOP/s", ms=seconds * 1e3,
                   extra={"precision": "fp8"})  # fmt: skip

    for dtype in (torch.bfloat16, torch.float16):
        guarded(ctx.report, "peak", f"torch.matmul {dtype}", f"{n}^3")(partial(matmul, dtype))
    guarded(ctx.report, "peak", "torch._scaled_mm fp8", f"{n}^3")(scaled_mm)


def bei_rows(ctx: Context, work: Workload, module: Any, backend: Any, feeds: list[Any], reference: Any, label: str, precision: str,
             eager: bool = True) -> None:  # fmt: skip
    """bei's packed module on `feeds`: eager, and compiled as `backend` (a TorchBackend) compiles it."""

    eager_fn, compiled_fn = partial(run_all, module, feeds), partial(run_all, backend.forward, feeds)
    if eager:
        throughput(ctx, work, f"bei packed eager {label}", eager_fn, precision, check=cosine_check(eager_fn, reference, batches=len(feeds)))
    throughput(ctx, work, f"bei packed compiled {label}", compiled_fn, precision, compiled=True,
               check=cosine_check(compiled_fn, reference, batches=len(feeds)),
               extra={"note": "TorchBackend.forward: torch.compile(dynamic=True)"})  # fmt: skip


def bench_mistral(ctx: Context) -> None:
    import torch

    from bei.modeling.module import input_names
    from bei.modeling.packed.fp8 import quantize_fp8
    from bei.targets.torch.backend import TorchBackend

    s = ctx.shapes
    layers = ctx.args.layers or s.mistral["num_hidden_layers"]
    config = {**s.mistral, "num_hidden_layers": layers}
    section = "mistral-7b" if layers == MISTRAL_7B["num_hidden_layers"] and not ctx.args.tiny else f"mistral-7b ({layers} layers)"
    inputs = Inputs.random(np.full(s.batch, s.seq), config["vocab_size"], ctx.args.seed)
    everything = [list(range(s.batch))]
    with torch.inference_mode():
        module, reference, work = mistral_transformers(ctx, config, section, inputs)
        release()
        names = input_names(module.spec)
        feeds = packed_feeds(inputs, everything, ctx.device, types=False)
        bei_rows(ctx, work, module, TorchBackend(module, names, compiled=True), feeds, reference, "bf16", "bfloat16")
        release()  # the FP8 module compiles afresh
        layers_fp8 = quantize_fp8(module)
        print(f"[{section}] quantize_fp8: {len(layers_fp8)} Linear layers in FP8", flush=True)
        bei_rows(
            ctx, work, module, TorchBackend(module, names, compiled=True), feeds, reference, "fp8 (row-wise dynamic)", "fp8", eager=False
        )


def mistral_transformers(ctx: Context, config: dict[str, Any], section: str, inputs: Inputs) -> tuple[Any, Any, Workload]:
    """transformers' rows; returns bei's module with the same weights, transformers' output, the workload."""
    import torch

    feeds = hf_feeds(inputs, [list(range(len(inputs.ids)))], ctx.device)
    # the reference is transformers in fp32 (random weights amplify bf16 rounding over many layers, so
    # transformers' own bf16 output is a noisy yardstick: its row reports its cosine too)
    hf = hf_model(config, ctx.device, torch.float32)
    reference = torch.cat(run_all(partial(hf_pooled, hf, "last"), feeds)).float()
    hf = hf.to(torch.bfloat16)
    module = bei_module(config, hf, ctx.device, torch.bfloat16)
    work = Workload(section, f"{len(inputs.ids)} x {inputs.lengths[0]} tok", inputs.lengths,
                    Flops(linear_params(module.body), config["hidden_size"], config["num_hidden_layers"]))  # fmt: skip

    eager = partial(run_all, partial(hf_pooled, hf, "last"), feeds)
    throughput(
        ctx, work, "transformers eager SDPA bf16", eager, "bfloat16", check=cosine_check(eager, reference, reference="transformers fp32")
    )
    compiled = partial(run_all, partial(hf_pooled, torch.compile(hf), "last"), feeds)
    throughput(
        ctx,
        work,
        "transformers torch.compile bf16",
        compiled,
        "bfloat16",
        compiled=True,
        check=cosine_check(compiled, reference, reference="transformers fp32"),
    )
    return module, reference, work


def bench_bert(ctx: Context, name: str, config: dict[str, Any]) -> None:
    import torch

    from bei.modeling.module import input_names
    from bei.targets.torch.backend import TorchBackend

    s = ctx.shapes
    mixed = np.random.default_rng(ctx.args.seed).integers(s.mixed_min, s.mixed_max + 1, s.mixed_count)
    workloads = [
        (f"{s.batch} x {s.seq} tok", Inputs.random(np.full(s.batch, s.seq), config["vocab_size"], ctx.args.seed), True),
        (f"{s.mixed_count} mixed {s.mixed_min}-{s.mixed_max} tok", Inputs.random(mixed, config["vocab_size"], ctx.args.seed + 1), False),
    ]
    with torch.inference_mode():
        hf = hf_model(config, ctx.device, torch.float16)
        module = bei_module(config, hf, ctx.device, torch.float16)
        flops = Flops(linear_params(module.body), config["hidden_size"], config["num_hidden_layers"])
        backend = TorchBackend(module, input_names(module.spec), compiled=True)  # one for all workloads, as `bei serve`
        for label, inputs, fixed in workloads:
            bert_throughput(ctx, Workload(name, label, inputs.lengths, flops), hf, module, backend, inputs, fixed)
        bert_requests(ctx, name, config, hf, TorchBackend(module, input_names(module.spec)), backend, batched=name == "bert-base")


def bert_throughput(ctx: Context, work: Workload, hf: Any, module: Any, backend: Any, inputs: Inputs, fixed: bool) -> None:
    """transformers (one batch, or length-sorted padded batches) against bei packed (one batch, or
    batches of consecutive inputs up to the token budget)."""
    import torch

    s, everything = ctx.shapes, [list(range(len(inputs.ids)))]
    hf_groups = everything if fixed else inputs.sorted_groups(s.padded_batch)
    hf_in = hf_feeds(inputs, hf_groups, ctx.device)
    bei_in = packed_feeds(inputs, everything if fixed else inputs.token_groups(s.max_batch_tokens), ctx.device, types=True)
    run_hf = partial(run_all, partial(hf_pooled, hf, "mean"), hf_in)
    order = np.argsort([i for group in hf_groups for i in group])  # transformers' rows back to the inputs' order
    reference = torch.cat(run_hf())[torch.as_tensor(order, device=ctx.device)]
    padding = sum(int(ids.numel()) for ids, _ in hf_in) / work.tokens - 1
    what = "transformers eager SDPA fp16" + ("" if fixed else f", length-sorted padded batches of {s.padded_batch}")
    throughput(ctx, work, what, run_hf, "float16", extra={"padding": padding, "batches": len(hf_in)})
    bei_rows(ctx, work, module, backend, bei_in, reference, "fp16", "float16")


def hf_request(model: Any, device: str, feed: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    import torch

    ids, mask = (torch.from_numpy(a).to(device) for a in feed)
    return hf_pooled(model, "mean", (ids, mask)).float().cpu().numpy()


def bei_request(backend: Any, feed: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    from bei.backend import Batch

    ids, mask = feed
    return backend.infer(Batch(ids, mask, np.zeros_like(ids), np.zeros(len(ids), np.int64), mask.sum(1)))


def bei_dynamic_request(backend: Any, device: str, feed: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The batch through the dynamic-shape graph, unpadded (what batches over GRAPH_MAX_TOKENS get)."""
    from bei.modeling.packed.layout import Packed

    ids, mask = feed
    return backend.forward(Packed.from_padded(ids, mask, np.zeros_like(ids), device=device)).float().cpu().numpy()


def bert_requests(ctx: Context, name: str, config: dict[str, Any], hf: Any, eager: Any, compiled: Any, batched: bool) -> None:
    """Short requests, host arrays in and pooled vectors out, one after another: single ones, and
    (`batched`) `small_batch` at once, as the batcher makes of that many concurrent requests: 64 x 5
    tokens go to the CUDA graph of the 512-token bucket (rows = tokens: 512 rows, most of them empty)."""
    s = ctx.shapes
    small = Inputs.random(np.full(max(16, s.small_batch), s.small_tokens), config["vocab_size"], ctx.args.seed + 2)
    singles = [small.padded([i]) for i in range(16)]
    label = f"{s.small_tokens}-token requests, batch 1"
    variants = [
        (label, "req/s", singles, "transformers eager SDPA fp16", partial(hf_request, hf, ctx.device), False),
        (label, "req/s", singles, "bei TorchBackend eager fp16", partial(bei_request, eager), False),
        (label, "req/s", singles, "bei TorchBackend compiled fp16 (CUDA-graph buckets)", partial(bei_request, compiled), True),
    ]
    if batched:
        batch = f"{s.small_batch} x {s.small_tokens}-token batch"
        feeds = [small.padded(list(range(s.small_batch)))]
        variants += [
            (batch, "batch/s", feeds, "transformers eager SDPA fp16", partial(hf_request, hf, ctx.device), False),
            (batch, "batch/s", feeds, "bei TorchBackend compiled fp16, CUDA graph of its token bucket",
             partial(bei_request, compiled), True),
            (batch, "batch/s", feeds, "bei TorchBackend compiled fp16, dynamic shapes, no graph",
             partial(bei_dynamic_request, compiled, ctx.device), True),
        ]  # fmt: skip
    for workload, unit, feed, what, call, graphed in variants:
        guarded(ctx.report, name, what, workload)(partial(latency_row, ctx, name, what, workload, call, feed, graphed, unit))


def latency_row(ctx: Context, section: str, what: str, workload: str, call: Callable[[Any], Any], feeds: list[Any], compiled: bool,
                unit: str = "req/s") -> Row:  # fmt: skip
    """Requests one after another, each timed on the host from arrays in to results out."""
    extra: dict[str, Any] = {}
    before = graphs_compiled()
    if compiled:
        extra["compile_s"] = ctx.clock.first(partial(call, feeds[0]))
    for i in range(max(3, ctx.shapes.small_requests // 10)):  # CUDA-graph trees record on the 2nd or 3rd call
        call(feeds[i % len(feeds)])
    latencies = []
    began = time.perf_counter()
    for i in range(ctx.shapes.small_requests):
        t = time.perf_counter()
        call(feeds[i % len(feeds)])
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - began
    if compiled:
        extra["graphs"] = graphs_compiled() - before
    extra.update(
        p50_ms=float(np.percentile(latencies, 50) * 1e3), p99_ms=float(np.percentile(latencies, 99) * 1e3), requests=len(latencies)
    )
    return Row(section, what, workload, len(latencies) / total, unit, None, float(np.median(latencies) * 1e3), extra)


# --- HTTP: bei serve driven by bei's client ----------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def texts_of(tokenizer_file: Path, target: int, count: int, seed: int) -> tuple[list[str], float]:
    """`count` texts of `target` tokens (special tokens included) as the engine's tokenizer counts them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_truncation()
    tok.no_padding()
    overhead = len(tok.encode("").ids)
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)
    words = [w for w in words if len(tok.encode(w).ids) == overhead + 1][:2000] or ["hello"]
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for _ in range(count):
        for _attempt in range(20):
            text = " ".join(rng.choice(words, max(1, target - overhead)).tolist())
            if len(tok.encode(text).ids) == target:
                break
        texts.append(text)
    return texts, float(np.mean([len(e.ids) for e in tok.encode_batch(texts)]))


class Server:
    """`bei serve ENGINE_DIR` in a subprocess on 127.0.0.1; its log in `log_path`."""

    def __init__(self, engine_dir: Path, log_path: Path, serve_args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "bei.cli", "serve", str(engine_dir), "--host", "127.0.0.1", "--port", str(self.port),
                     "--log-level", "warning", *serve_args]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> float:
        """Seconds from spawn to GET /health 200 (the cold start)."""
        import httpx

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        started = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"bei serve exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(self.url + "/health", timeout=2)
                if health.status_code == 200:
                    return time.perf_counter() - started
                if "failed to load" in health.text:
                    raise RuntimeError(f"bei serve: {health.text[:500]}; log: {self.log_tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"bei serve not healthy after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])[-1500:]
        return "(no log)"

    def stop(self) -> None:
        from scripts.bench import stop_process

        stop_process(self.process)


def drive(url: str, texts: list[str], concurrency: int, seconds: float, start_at: float) -> tuple[int, float, list[float]]:
    """One client process: `concurrency` workers posting one text per request to /embed from `start_at`
    (time.time()) for `seconds`; returns (requests, elapsed, latencies)."""
    from bei.client import AsyncClient, RetryPolicy

    async def run() -> tuple[int, float, list[float]]:
        latencies: list[float] = []
        async with AsyncClient(url, max_concurrency=concurrency, timeout=120.0, retry=RetryPolicy(attempts=0)) as client:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            began = time.perf_counter()

            async def worker(k: int) -> None:
                i = k
                while True:  # at least one request each; one in flight at the end still counts
                    sent = time.perf_counter()
                    answer = await client.post("/embed", {"inputs": [texts[i % len(texts)]], "truncate": True})
                    latencies.append(time.perf_counter() - sent)
                    if len(answer) != 1:
                        raise RuntimeError(f"{len(answer)} vectors for 1 input")
                    i += concurrency
                    if time.perf_counter() - began >= seconds:
                        return

            await asyncio.gather(*(worker(k) for k in range(concurrency)))
            return len(latencies), time.perf_counter() - began, latencies

    return asyncio.run(run())


def drive_processes(url: str, texts: list[str], concurrency: int, seconds: float, processes: int) -> tuple[float, list[float]]:
    """`concurrency` requests in flight, split over `processes` client processes: (requests/s, latencies)."""
    import multiprocessing

    procs = max(1, min(processes, concurrency))
    shares = [concurrency // procs + (1 if k < concurrency % procs else 0) for k in range(procs)]
    start_at = time.time() + 1.0 + 0.1 * procs
    if procs == 1:
        results = [drive(url, texts, concurrency, seconds, start_at)]
    else:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            results = pool.starmap(drive, [(url, texts, c, seconds, start_at) for c in shares])
    count = sum(r[0] for r in results)
    elapsed = max(r[1] for r in results)
    return count / elapsed, [lat for r in results for lat in r[2]]


def bench_http(args: argparse.Namespace, report: Report) -> None:
    engine_dir = Path(args.http).resolve()
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    target = manifest.get("target") or {}
    section = f"http {manifest.get('name', engine_dir.name)} ({target.get('name', '?')}, {target.get('device', '?')})"
    torch_version = (target.get("versions") or {}).get("torch", "?")
    built = f"{manifest.get('precision', '?')}, {target.get('gpu') or target.get('device', '?')}, torch {torch_version}"
    texts, mean_tokens = texts_of(engine_dir / "tokenizer.json", args.http_tokens, 256, args.seed)
    log_path = Path(args.out).with_suffix(".serve.log") if args.out else Path("bench_gpu.serve.log")
    server = Server(engine_dir, log_path, shlex.split(args.serve_args))

    def attempt(what: str, workload: str, measure: Callable[[], Row]) -> None:
        try:
            report.add(measure())
        except Exception as err:  # noqa: BLE001 - reported as the row's error
            report.add(Row(section, what, workload, error=f"{type(err).__name__}: {err}; server: {server.log_tail()}"))

    def first_request() -> Row:
        started = time.perf_counter()
        drive(server.url, texts[:1], 1, 0.0, 0.0)  # what the first caller waits (compiles, graph captures)
        return Row(section, "first request after /health 200", f"{mean_tokens:.1f} tokens", time.perf_counter() - started, "s")

    def load(concurrency: int, workload: str) -> Row:
        drive_processes(server.url, texts, concurrency, args.http_warmup, args.client_processes)  # new batch shapes compile here
        rate, latencies = drive_processes(server.url, texts, concurrency, args.http_seconds, args.client_processes)
        extra = {"p50_ms": float(np.percentile(latencies, 50) * 1e3), "p99_ms": float(np.percentile(latencies, 99) * 1e3),
                 "requests": len(latencies), "client_processes": max(1, min(args.client_processes, concurrency))}  # fmt: skip
        return Row(
            section, "bei serve + bei.client.AsyncClient", workload, rate, "req/s", ms=float(np.median(latencies) * 1e3), extra=extra
        )

    try:
        cold = server.start(args.start_timeout)
        report.add(Row(section, "bei serve cold start (spawn to /health 200)", "", cold, "s", extra={"note": built}))
        attempt("first request after /health 200", f"{mean_tokens:.1f} tokens", first_request)
        for c in [int(x) for x in args.concurrency.split(",")]:
            workload = f"{mean_tokens:.1f}-token requests, concurrency {c}"
            attempt("bei serve + bei.client.AsyncClient", workload, partial(load, c, workload))
    except Exception as err:  # noqa: BLE001 - the server did not start: one error row
        report.add(Row(section, "bei serve cold start (spawn to /health 200)", "", error=f"{type(err).__name__}: {err}"))
    finally:
        server.stop()
    print(f"server log: {log_path}", flush=True)


# --- a random checkpoint, built (for --http on a machine with no model) -------------------------
def build_engine_dir(folder: Path, model: str) -> Path:
    """A random BERT checkpoint (the tests' tiny tokenizer; `bert-base`: BERT-base sizes) built by
    `bei build --target torch` (CUDA when there is a GPU); returns the engine directory."""
    import transformers

    from bei.build import build_engine
    from bei.config import parse_config
    from bei.progress import Progress
    from bei.testing.inproc_server import base_model_for, config_for
    from bei.testing.tiny_models import make_checkpoint

    checkpoint = make_checkpoint(folder / "checkpoints" / model, "bert", "embed", pooling="mean", max_seq_length=128)
    if model == "bert-base":
        config = json.loads((checkpoint / "config.json").read_text())
        sizes = {
            k: BERT_BASE[k]
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")
        }
        config.update(sizes, initializer_range=0.02)
        transformers.BertModel(transformers.BertConfig(**config)).save_pretrained(str(checkpoint), safe_serialization=True)
        pooling_file = checkpoint / "1_Pooling" / "config.json"
        pooling = json.loads(pooling_file.read_text())
        pooling["word_embedding_dimension"] = BERT_BASE["hidden_size"]
        pooling_file.write_text(json.dumps(pooling))
    started = time.perf_counter()
    result = build_engine(
        parse_config(config_for(model, checkpoint, base_model_for("bert"))),
        config_dir=folder, engines_root=folder / "engines" / model, target="torch", progress=Progress([]),
    )  # fmt: skip
    print(f"built {result.engine_dir} in {time.perf_counter() - started:.1f} s", flush=True)
    return result.engine_dir


# --- main ---------------------------------------------------------------------------------------
SECTIONS = ("peak", "bert-base", "mistral", "bert-large")  # in this order: the quick, telling ones first


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when torch sees a GPU")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (for a CPU check of every code path)")
    p.add_argument("--layers", type=int, default=None, help="Mistral layers (default: all 32; tiny: 2)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend for every compile (default inductor; "
                   "--device cpu --tiny: aot_eager, since inductor's C++ compiles take minutes on a small CPU)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON file of the rows (rewritten after each)")
    p.add_argument("--peaks-from", type=Path, default=None, help="the matmul peaks of an earlier run's JSON (its `peak` rows), "
                   "for the limit fractions of a run without the peak section")  # fmt: skip
    p.add_argument(
        "--http",
        metavar="ENGINE_DIR",
        nargs="?",
        const="",
        default=None,
        help="only: `bei serve ENGINE_DIR` driven over 127.0.0.1 (no ENGINE_DIR: the one --build-engine built)",
    )
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--http-tokens", type=int, default=5, help="tokens per request text, special tokens included")
    p.add_argument("--http-seconds", type=float, default=8.0, help="timed seconds per concurrency")
    p.add_argument("--http-warmup", type=float, default=4.0, help="untimed seconds per concurrency before (bucket compiles)")
    p.add_argument("--client-processes", type=int, default=4, help="client processes sharing the concurrency")
    p.add_argument("--serve-args", default="", help="extra `bei serve` arguments, one string")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument(
        "--build-engine", metavar="DIR", type=Path, default=None, help="only: build a random BERT engine under DIR (then --http it)"
    )
    p.add_argument("--engine-model", choices=("tiny", "bert-base"), default="bert-base")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_engine is not None:
        engine = build_engine_dir(args.build_engine.resolve(), args.engine_model)
        print(f"ENGINE_DIR={engine}", flush=True)
        if args.http is None:
            return 0
        args.http = args.http or str(engine)
    if args.http == "":
        raise SystemExit("--http needs ENGINE_DIR (or --build-engine DIR)")
    if args.http is not None:
        report = Report(args.out, {"python": platform.python_version(), "host": platform.node(), "mode": "http"})
        bench_http(args, report)
        print("\n" + report.table())
        return 0 if not any(r.error for r in report.rows) else 1

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.compile_backend or ("aot_eager" if device == "cpu" and args.tiny else "inductor")
    use_compile_backend(backend)
    shapes = TINY if args.tiny else FULL
    if device == "cpu" and not args.tiny:
        print("NOTE: full shapes on the CPU take hours; use --tiny", flush=True)
    env = {**environment(device), "compile_backend": backend, "shapes": asdict(shapes)}
    varlen_compat(env)
    report = Report(args.out, env)
    print(json.dumps({k: v for k, v in env.items() if k != "shapes"}, default=str), flush=True)
    ctx = Context(args, shapes, Clock(device), report, peaks_from(args.peaks_from), device)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    runs: dict[str, Callable[[], None]] = {
        "peak": partial(measure_peaks, ctx),
        "mistral": partial(bench_mistral, ctx),
        **{name: partial(bench_bert, ctx, name, config) for name, config in shapes.berts.items()},
    }
    for name in SECTIONS:
        if name in sections:
            section_guard(report, name, runs[name])
    env["wall_s"] = round(time.perf_counter() - started, 1)
    report.save()
    print(f"\n{COMMAND}  ({env['wall_s']} s, {env.get('gpu', device)}, torch {env['torch']}, compile backend {backend})")
    print(report.table())
    params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in env.get("linear_params", {}).items())
    print(f"of limit = FLOPs / time / measured matmul peak of the row's precision (fp8 rows: the fp8 peak); FLOPs of an input of "
          f"n tokens = 2 x P x n + 4 x n^2 x hidden x layers, P = Linear weights ({params})", flush=True)  # fmt: skip
    return 0 if not any(r.error for r in report.rows) else 1


def peaks_from(path: Path | None) -> dict[str, float]:
    """precision -> FLOP/s from the `peak` rows of an earlier run's JSON (none: {})."""
    if path is None or not path.exists():
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    return {
        r["extra"]["precision"]: r["value"] * 1e12
        for r in rows
        if r.get("section") == "peak" and r.get("value") and "precision" in r.get("extra", {})
    }


def section_guard(report: Report, section: str, run: Callable[[], None]) -> None:
    """A section that fails outside a measurement (building its models, say) is one error row."""
    try:
        run()
    except Exception as err:  # noqa: BLE001 - reported as a row
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        report.add(Row(section, "(section setup)", "", error=f"{type(err).__name__}: {err}", extra={"traceback": tb[-4000:]}))
    finally:
        release()


if __name__ == "__main__":
    sys.exit(main())
