"""The torch backend: bei's packed modules (bei/modeling/packed/) on CUDA or the CPU.

A padded `Batch` is packed (no computation on padding), run, and per-token outputs (NER) are laid
out like the batch again. On CUDA the module runs under torch.compile, whose compiled code the build
saved per GPU type (`compile-cache.bin`, loaded before the first call so a cold start does not
recompile), and small batches replay CUDA graphs captured per token bucket; `load` runs a batch in
every bucket (`warm_up`) so that no request pays for a compile or a capture. On the CPU the module
runs eagerly (the CPU parity tests run this path).

`prepare` (pack + host-to-device copy) and `run` are separate so the batcher can prepare the next
batch while the current one runs.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bei.backend import Backend, Batch
from bei.engine.manifest import Manifest
from bei.errors import EngineError
from bei.kinds import PER_TOKEN_TASKS
from bei.modeling.packed.bf16 import to_bf16
from bei.modeling.packed.blocks import use_cpu_kernels
from bei.modeling.packed.fp8 import quantize_fp8
from bei.modeling.packed.int8 import int8_structure
from bei.modeling.packed.layout import Packed, bucket
from bei.modeling.packed.model import (
    PackedEngineModule,
    make_body,
    pad_token_id,
    read_config,
)
from bei.modeling.pooling import PoolingConfig, PoolingMode
from bei.modeling.spec import DenseLayer, ModelSpec

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
COMPILE_CACHE_FILE = "compile-cache.bin"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# batches of fewer tokens replay the CUDA graph of their token bucket (`bucket`; CUDA only)
GRAPH_MAX_TOKENS = 1024
GRAPH_CALLS_TO_RECORD = 3
# token counts that land in each graph bucket (16, 32, ... 1024: `bucket` pads t to the power of two
# above t), then one that takes the dynamic-shape graph: `warm_up` runs them all
WARM_TOKENS = (8, *(1 << n for n in range(4, GRAPH_MAX_TOKENS.bit_length() - 1)), 2 * GRAPH_MAX_TOKENS)


# On the CPU, a batch of pooled outputs runs in parts of whole rows of at most CHUNK_TOKENS tokens
# each: a part's activations (tokens x the MLP's width, int32 / fp32) then stay in the CPU's caches
# between the GEMM that writes them and the kernels that read them. On all-MiniLM-L6-v2's medium
# texts (one thread, 32 rows of ~128 tokens; scripts/cpu_parts.py), parts of ~1,000 tokens ran 2-5%
# faster than one call when the machine was quiet and 25-34% faster when its caches were shared
# with other work (docs/benchmarks.md)
CHUNK_TOKENS = 1024
# ... and, with two or more intra-op threads, as one lane per thread: each lane runs its share of the
# rows on one thread, side by side, instead of every GEMM and kernel forking over all the threads
# (OpenMP's barriers, and its spinning when the cores are shared, cost more than the kernels gain)
LANE_MIN_ROWS = 4


def token_chunks(lengths: np.ndarray, budget: int | None = None) -> list[np.ndarray]:
    """Row indices, shortest first, in about `sum(lengths) / budget` (default CHUNK_TOKENS) runs of
    whole rows of about equal tokens (one run of every row, in order, below one and a half budgets).
    Rows of like length share a run, so that attention (on the rows padded to the run's longest)
    pads little."""
    count = min(len(lengths), round(int(lengths.sum()) / (budget or CHUNK_TOKENS)))
    if count < 2:
        return [np.arange(len(lengths))]
    order = np.argsort(lengths, kind="stable")
    ends = np.concatenate(([0], np.cumsum(lengths[order])))  # tokens before each cut point
    shares = ends[-1] * np.arange(1, count) / count
    after = np.searchsorted(ends, shares)  # the first cut point at or past each share, or the one before it
    cuts = np.where(ends[after] - shares <= shares - ends[after - 1], after, after - 1)
    return [run for run in np.split(order, np.unique(cuts)) if len(run)]


def _one_thread() -> None:
    """A lane's thread: one intra-op thread. torch reads the process-wide count into a thread the
    first time the thread asks (`get_num_threads`), so ask first, then set this thread's own."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def lanes_of(lengths: np.ndarray, lanes: int) -> list[np.ndarray]:
    """Row indices in up to `lanes` lanes of at least LANE_MIN_ROWS rows, dealt shortest first so
    that each lane holds about the same tokens and the same spread of lengths; one lane of every
    row when the batch is too small to share."""
    count = min(lanes, len(lengths) // LANE_MIN_ROWS)
    if count < 2:
        return [np.arange(len(lengths))]
    by_length = np.argsort(lengths, kind="stable")
    return [np.sort(by_length[k::count]) for k in range(count)]


@dataclass(frozen=True)
class Prepared:
    packed: Packed  # the batch's real tokens (with `parts`, the first part's: `run` reads `parts`)
    feed: Packed  # what the module runs: `packed`, or `packed` padded to its token bucket
    width: int
    left_padded: bool
    parts: tuple[Packed, ...] = ()  # the CPU: the rows in parts of CHUNK_TOKENS (`token_chunks`), run one after another
    order: np.ndarray | None = None  # the parts' rows -> the batch's order
    lanes: tuple[int, ...] = ()  # with parts: how many parts each lane runs (`lanes_of`), lanes side by side

    @property
    def graphed(self) -> bool:
        return self.feed is not self.packed


def spec_from_manifest(folder: Path, manifest: Manifest, config: dict[str, Any]) -> ModelSpec:
    """The ModelSpec a packed module needs, from the engine's manifest and its config.json."""
    pooling = (
        PoolingConfig(tuple(PoolingMode(m) for m in manifest.pooling.modes), manifest.pooling.include_prompt) if manifest.pooling else None
    )
    dense = tuple(DenseLayer(folder, d.in_features, d.out_features, d.bias, d.activation) for d in manifest.dense_layers)
    return ModelSpec(
        path=folder,
        architecture=manifest.architecture,
        model_type=manifest.model_type,
        base_model=manifest.base_model,
        task=manifest.task,
        hidden_size=int(config.get("hidden_size") or config.get("dim") or 0),
        num_heads=int(config.get("num_attention_heads") or config.get("n_heads") or 0),
        max_seq_len=manifest.max_input_tokens,
        pooling=pooling,
        normalize=manifest.normalize,
        dense=dense,
        labels=tuple(manifest.labels),
        uses_token_type_ids="token_type_ids" in manifest.graph_inputs,
        padding_side=manifest.padding_side,
        colbert_dim=manifest.colbert_dim or 0,
    )


def runs_compiled(device: str, precision: str) -> bool:
    """CUDA engines, and the CPU's bf16 and int8 engines, run under torch.compile: on the CPU, inductor
    fuses the bf16 casts, int8 quantizing, bias, GELU and residual adds around each GEMM (over HTTP,
    96.8 against 60.5 emb/s eager on all-MiniLM-L6-v2 in bf16: docs/benchmarks.md); the fp32 CPU
    engine stays eager."""
    return device == "cuda" or precision in ("bf16", "int8")


class TorchBackend(Backend):
    name = "torch"
    pads = False  # packed: the engine computes real tokens only

    def __init__(
        self,
        module: PackedEngineModule,
        input_names: list[str],
        *,
        compiled: bool = False,
        static_shapes: bool | None = None,
        pad_id: int = 0,
        lanes: int | None = None,
    ) -> None:
        """`compiled`: torch.compile (dynamic shapes), and on CUDA CUDA graphs for small batches.
        `static_shapes` (default: compiled on CUDA): small batches are padded to their token bucket
        (`Packed.padded_to`, filler tokens `pad_id`); the CPU tests turn it on alone to check that
        padding changes no output. `lanes` (the CPU; default one per intra-op thread): how many lanes
        a batch of enough rows runs in side by side, on one thread each (`lanes_of`)."""
        self.module = module.eval()
        self.input_names = input_names
        self.device = next(module.parameters()).device
        self.per_token = module.spec.task in PER_TOKEN_TASKS
        self.compiled = compiled
        self.pad_id = pad_id
        self.forward: Any = module
        static = (compiled and self.device.type == "cuda") if static_shapes is None else static_shapes
        # the CPU: this many intra-op threads per call, and as many lanes (`lanes_of`), one thread each
        # (not with static shapes: a batch then runs whole, padded to its bucket)
        self.threads = torch.get_num_threads()
        lanes_here = self.device.type == "cpu" and not self.per_token and not static
        self.lanes = (self.threads if lanes is None else lanes) if lanes_here else 1
        self._lane_pool = ThreadPoolExecutor(self.lanes, "bei-lane", initializer=_one_thread) if self.lanes > 1 else None
        self.graphed: Any = module if static else None
        if compiled:
            from torch import _dynamo

            # one graph per token bucket, plus the dynamic-shape graph: more than dynamo's default 8
            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
            # float attributes (eps, attention scale) are constants: dynamo traces once instead of
            # tracing them as symbols and restarting the analysis
            _dynamo.config.specialize_float = True
            # no inductor `freezing` on the CPU: `options={"freezing": True}` never froze (the weights stayed
            # graph inputs), and freezing for real (the global config) packs the bf16 weights for oneDNN
            # but measured no faster (54.5 against 54.9 texts/s per core on all-minilm-l6-v2); the bf16
            # layers pack their weights themselves and fuse bias and activation (bei/modeling/packed/onednn.py)
            self.forward = torch.compile(module, dynamic=True)
            if static:  # torch.compile captures and replays one CUDA graph per bucket
                self.graphed = torch.compile(module, mode="reduce-overhead", dynamic=False)

    @classmethod
    def load(cls, folder: Path, manifest: Manifest, threads: int | None = None) -> TorchBackend:
        from safetensors.torch import load_model

        device, dtype = manifest.target.device, DTYPES[manifest.target.dtype or "float32"]
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"engine {manifest.name!r} runs on CUDA and torch sees no GPU here")
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        config = read_config(folder)
        spec = spec_from_manifest(folder, manifest, config)
        module = PackedEngineModule(spec, make_body(spec, config), load_heads=False).to(dtype)
        fp8 = (manifest.quantization or {}).get("layers") if manifest.precision == "fp8" else None
        if fp8:
            quantize_fp8(module, fp8)
        if manifest.precision == "bf16" and device == "cpu":  # bf16 GEMMs in an fp32 module, as built
            to_bf16(module)
        if manifest.precision == "int8" and device == "cpu":  # W8A8 layers, bf16 GEMMs for the others, as built
            quantization = manifest.quantization or {}
            int8_structure(module, quantization.get("layers", []), bf16_edges=bool(quantization.get("bf16_edges")))
            to_bf16(module, quantization.get("bf16_layers", []))
        if manifest.precision in ("bf16", "int8") and device == "cpu":  # bei's bf16 attention where it runs here
            attention, fused = use_cpu_kernels(module)
            log.info(
                "%s: attention in %d layers on bei's bf16 CPU kernel, the activation of %d MLPs in their GEMM",
                manifest.name,
                attention,
                fused,
            )
        missing, unexpected = load_model(module, folder / WEIGHTS_FILE, strict=False)
        if missing or unexpected:
            raise EngineError(f"{folder / WEIGHTS_FILE} does not fit the module: missing {missing[:5]}, unexpected {unexpected[:5]}")
        module = module.to(device)
        if not runs_compiled(device, manifest.precision):
            return cls(module, manifest.graph_inputs, pad_id=pad_token_id(config))
        load_compile_cache(folder, manifest)
        return cls.compiled_and_warm(module, manifest.graph_inputs, pad_token_id(config), spec.max_seq_len, manifest.padding_side)

    @classmethod
    def compiled_and_warm(
        cls, module: PackedEngineModule, input_names: list[str], pad_id: int, max_seq_len: int, padding_side: str
    ) -> TorchBackend:
        """Compile (from the cache where one was loaded) and capture every graph now, not on a
        request. On the CPU a compile that fails (no C++ compiler for inductor, say) leaves the
        engine eager, with a warning; on CUDA it is an error."""
        backend = cls(module, input_names, compiled=True, pad_id=pad_id)
        try:
            backend.warm_up(max_seq_len, padding_side)
        except Exception as err:
            if backend.device.type == "cuda":
                raise
            log.warning("torch.compile failed on the CPU (%s: %s): the engine runs eagerly", type(err).__name__, err)
            torch._dynamo.reset()
            return cls(module, input_names, pad_id=pad_id)
        return backend

    def prepare(self, batch: Batch) -> Prepared:
        types = batch.token_type_ids if "token_type_ids" in self.input_names else None
        prompt = batch.prompt_length if "prompt_length" in self.input_names else None
        width = int(batch.input_ids.shape[1])
        lanes: list[list[np.ndarray]] = []  # the CPU: per lane, its rows in parts (`token_chunks`)
        if self.device.type == "cpu" and not self.per_token:
            lanes = [[lane[g] for g in token_chunks(batch.lengths[lane])] for lane in lanes_of(batch.lengths, self.lanes)]
        groups = [group for lane in lanes for group in lane]
        if len(groups) > 1:
            parts = tuple(
                Packed.from_padded(batch.input_ids[g], batch.attention_mask[g], None if types is None else types[g],
                                   None if prompt is None else prompt[g], device=self.device)
                for g in groups
            )  # fmt: skip
            per_lane = tuple(len(lane) for lane in lanes) if len(lanes) > 1 else ()
            return Prepared(parts[0], parts[0], width, batch.left_padded, parts, np.argsort(np.concatenate(groups)), per_lane)
        packed = Packed.from_padded(batch.input_ids, batch.attention_mask, types, prompt, device=self.device)
        if self.graphed is not None and packed.tokens < GRAPH_MAX_TOKENS:
            feed = packed.padded_to(bucket(packed.tokens), self.pad_id)
            return Prepared(packed, feed, width, batch.left_padded)
        return Prepared(packed, packed, width, batch.left_padded)

    def run(self, prepared: object) -> np.ndarray:
        assert isinstance(prepared, Prepared)
        if self.device.type == "cpu" and torch.get_num_threads() != self.threads:  # a thread new to torch starts
            torch.set_num_threads(self.threads)  # with the count the lanes' threads set last (`_one_thread`)
        with torch.inference_mode():
            packed = prepared.packed
            if prepared.parts:
                assert prepared.order is not None
                out = torch.cat(self._run_parts(prepared))[torch.from_numpy(prepared.order)]
            elif prepared.graphed:
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.graphed(prepared.feed)
                out = out[: packed.tokens] if self.per_token else out[: packed.rows]  # filler rows dropped
            else:
                out = self.forward(packed)
            if self.per_token:
                out = packed.repad(out, prepared.width, prepared.left_padded)
            return out.float().cpu().numpy()

    def _run_parts(self, prepared: Prepared) -> list[torch.Tensor]:
        """The parts' outputs in order: one after another, or each lane's parts on its own thread."""
        if not prepared.lanes or self._lane_pool is None:
            return [self.forward(part) for part in prepared.parts]
        bounds = np.cumsum((0, *prepared.lanes))
        lanes = [prepared.parts[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return [out for outs in self._lane_pool.map(self._run_lane, lanes) for out in outs]

    def _run_lane(self, parts: tuple[Packed, ...]) -> list[torch.Tensor]:
        with torch.inference_mode():  # thread-local, as the graphs compiled under it expect
            return [self.forward(part) for part in parts]

    def infer(self, batch: Batch) -> np.ndarray:
        return self.run(self.prepare(batch))

    def warm_up(self, max_seq_len: int, padding_side: str = "right") -> list[int]:
        """Run a batch of each of WARM_TOKENS tokens (rows of at most 128 tokens, of pad ids): every
        CUDA-graph bucket, then the dynamic-shape graph, and, where one row can be longer than the
        graphs take, a single such row, so that compiling and graph capture happen here. Returns the
        buckets the graphed batches ran in."""
        from bei.text.tokenizer import Encoded

        def batch(rows: int, width: int) -> Batch:
            row = Encoded(ids=[self.pad_id] * width, type_ids=[0] * width, offsets=[(0, 0)] * width, special=[0] * width)
            return Batch.pad([row] * rows, self.pad_id, padding_side)

        if self.device.type == "cuda":  # one eager batch: what attention takes is logged once (not under torch.compile)
            with torch.inference_mode():
                self.module(self.prepare(batch(2, 8)).packed)
        shapes = [(max(1, tokens // min(max_seq_len, 128)), tokens) for tokens in WARM_TOKENS]
        if max_seq_len > GRAPH_MAX_TOKENS:  # one row past the graphs: dynamo specializes a batch of 1 apart
            shapes.append((1, min(max_seq_len, 2 * GRAPH_MAX_TOKENS)))
        ran = []
        for rows, tokens in shapes:
            prepared = self.prepare(batch(rows, max(1, tokens // rows)))
            # CUDA-graph trees run a new shape eagerly once, record it on the next call, replay after:
            # three calls, so the recording happens here, alone, and not while the batcher's other
            # thread copies the next batch in (that invalidates a capture)
            if prepared.lanes:  # compile on this thread first: the lanes then only run what is compiled
                self.run(replace(prepared, lanes=()))
            for _ in range(GRAPH_CALLS_TO_RECORD if prepared.graphed and self.compiled else 1):
                self.run(prepared)
            if prepared.graphed:
                ran.append(prepared.feed.tokens)
        return ran


def save_compile_cache(folder: Path) -> int:
    """torch.compile's cache artifacts of this process (what the build compiled), for `bei serve`."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return 0
    data, _info = artifacts
    (folder / COMPILE_CACHE_FILE).write_bytes(data)
    return len(data)


def load_compile_cache(folder: Path, manifest: Manifest) -> bool:
    path = folder / COMPILE_CACHE_FILE
    built_with = manifest.target.versions.get("torch")
    if not path.exists():
        return False
    if built_with != torch.__version__:
        log.warning("%s was compiled by torch %s, this is %s: compiling again", path, built_with, torch.__version__)
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return True
