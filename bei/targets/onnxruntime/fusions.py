"""The CPU target: transformer fusions applied offline to the exported graph, kept only where they agree.

Candidates are tried in order, and the first whose graph agrees with the exported (unfused) graph on
a probe batch is written:

1. onnxscript's ORT fusions (`optimize_for_ort`): Attention / MultiHeadAttention, SkipLayerNorm,
   BiasGelu, RMSNorm, RotaryEmbedding, on any architecture the exporter produced;
2. onnxruntime.transformers' BERT fusions (SkipLayerNorm, BiasGelu; no Attention on dynamo graphs),
   for the BERT family only;
3. the exported graph as it is (ONNX Runtime still applies its generic optimizations at load).

A fused `Attention` whose additive bias is computed from the padding mask then takes ONNX Runtime's
2-D `mask_index` instead (`use_mask_index`): the bias subgraph goes, and the int8 quantizer
(bei/targets/onnxruntime/int8.py) can turn the node into `QAttention`.

An optimization never fails a build: a candidate that raises or disagrees is skipped with a note.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from bei.accuracy import Agreement, compare
from bei.backend import Batch
from bei.modeling.module import input_names
from bei.modeling.spec import ModelSpec
from bei.targets.onnxruntime.backend import OnnxRuntimeBackend

# model types whose graphs onnxruntime.transformers' BERT fusions understand
_BERT_FUSIONS = {"bert", "roberta", "xlm-roberta", "distilbert"}

# op types written by the fusions: what `bei build` reports as "fused"
FUSED_OPS = frozenset(
    {
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "EmbedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "SimplifiedLayerNormalization",
        "LayerNormalization",
        "BiasGelu",
        "FastGelu",
        "Gelu",
        "RotaryEmbedding",
    }
)

# a fused graph must agree with the exported one this closely (a tenth of the build's fp32 budget
# against transformers, bei/build.py), or it is not used
FUSED_MIN_COSINE = 0.999999
FUSED_MAX_ABS_DIFF = 2e-4

# the padding mask as fused Attention's `mask_index` (rewrite_mask_index)
MASK_INPUT = "attention_mask"
MASK_INDEX = "bei_mask_index"

Note = Callable[[str], None]
log = logging.getLogger("bei.export")


@dataclass(frozen=True)
class Candidate:
    name: str
    fuse: Callable[[ModelSpec, Path, Path], None]  # (spec, exported graph, target graph)


def versions() -> dict[str, str]:
    import onnx

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


def optimize(spec: ModelSpec, source: Path, target: Path, note: Note | None = None) -> dict[str, int]:
    """Write `target`: the first candidate graph that agrees with `source`; returns its fused-op counts."""
    note = note or log.warning
    probe = probe_batch(spec)
    expected = run_graph(source, spec, probe)
    for candidate in candidates(spec):
        try:
            candidate.fuse(spec, source, target)
            agreement = compare(expected, run_graph(target, spec, probe))
        except Exception as err:  # noqa: BLE001 - any failure of an optional step means: do without it
            note(f"{candidate.name} skipped: {type(err).__name__}: {str(err)[:300]}")
            continue
        if _agrees(agreement):
            use_mask_index(spec, target, expected, probe, note)
            return fused_op_counts(target)
        note(
            f"{candidate.name} not used: its graph differs from the exported one "
            f"(cosine {agreement.min_cosine:.7f}, max abs diff {agreement.max_abs_diff:.1e})"
        )
    copy_graph(source, target)
    return {}


def _agrees(agreement: Agreement) -> bool:
    return agreement.min_cosine >= FUSED_MIN_COSINE and agreement.max_abs_diff <= FUSED_MAX_ABS_DIFF


def use_mask_index(spec: ModelSpec, graph: Path, expected: np.ndarray, probe: Batch, note: Note) -> int:
    """Rewrite `graph` in place with `rewrite_mask_index`, kept only where it still agrees with
    `expected` on `probe` (a padded batch); returns the number of Attention nodes rewritten."""
    import onnx

    if not rewrite_mask_index(onnx.load(str(graph), load_external_data=False)):
        return 0  # decided on the structure alone: a large decoder's weights are not read
    model = onnx.load(str(graph))
    rewritten = rewrite_mask_index(model)
    with tempfile.TemporaryDirectory(dir=graph.parent) as scratch:
        staging = Path(scratch)
        data = _data_file(graph, graph)
        onnx.save_model(model, str(staging / graph.name), save_as_external_data=data is not None,
                        all_tensors_to_one_file=True, location=data)  # fmt: skip
        try:
            agreement = compare(expected, run_graph(staging / graph.name, spec, probe))
        except Exception as err:  # noqa: BLE001 - an optional step: do without it
            note(f"Attention mask_index skipped: {type(err).__name__}: {str(err)[:300]}")
            return 0
        if not _agrees(agreement):
            note(f"Attention mask_index not used: cosine {agreement.min_cosine:.7f}, max abs diff {agreement.max_abs_diff:.1e}")
            return 0
        for written in staging.iterdir():
            written.replace(graph.parent / written.name)
        return rewritten


def rewrite_mask_index(model: Any) -> int:
    """Give each fused `Attention` node that takes an additive attention bias (input 5) and no
    mask or past the graph's `attention_mask` as a 2-D int32 `mask_index` (input 3) instead, drop a
    `qkv_hidden_sizes` of three equal sizes (the quantizer's `QAttention` has neither), and remove
    the nodes that only computed the bias. Exact where the bias is the padding mask's (BERT family),
    which the caller checks; returns the number of nodes rewritten."""
    import onnx

    graph = model.graph
    if MASK_INPUT not in {i.name for i in graph.input}:
        return 0
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            continue
        inputs = list(node.input) + [""] * (6 - len(node.input))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if not inputs[5] or inputs[3] or inputs[4] or len(inputs) > 6 or attrs.get("unidirectional", 0):
            continue
        inputs[3], inputs[5] = MASK_INDEX, ""
        del node.input[:]
        node.input.extend(inputs[:4])  # input, weights, bias, mask_index
        sizes = attrs.get("qkv_hidden_sizes")
        if sizes is not None and len(set(sizes)) == 1:
            kept = [a for a in node.attribute if a.name != "qkv_hidden_sizes"]
            del node.attribute[:]
            node.attribute.extend(kept)
        rewritten += 1
    if rewritten:
        cast = onnx.helper.make_node("Cast", [MASK_INPUT], [MASK_INDEX], name="bei_mask_index", to=onnx.TensorProto.INT32)
        graph.node.insert(0, cast)
        _remove_dead_nodes(graph)
    return rewritten


def _remove_dead_nodes(graph: Any) -> None:
    """Drop the nodes (and initializers) no graph output depends on; a graph with subgraphs is left."""
    import onnx

    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def candidates(spec: ModelSpec) -> list[Candidate]:
    found = [Candidate("onnxscript ORT fusions", onnxscript_fusions)]
    if spec.model_type in _BERT_FUSIONS:
        found.append(Candidate("onnxruntime.transformers BERT fusions", bert_fusions))
    return found


def onnxscript_fusions(spec: ModelSpec, source: Path, target: Path) -> None:
    import onnx_ir as ir
    from onnxscript.optimizer import fold_constants
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with _quiet():
        model = ir.load(str(source))
        model, _ = optimize_for_ort(model)
        # Attention takes Q, K and V's weights as one Concat of three initializers: fold it into one,
        # so that the graph holds the weights once and int8 quantization (bei/targets/onnxruntime/int8.py) sees them
        fold_constants(model, should_fold=lambda node: True if node.op_type == "Concat" else None)
        ir.save(model, str(target), external_data=_data_file(source, target))


def bert_fusions(spec: ModelSpec, source: Path, target: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        optimized = optimize_model(
            str(source),
            model_type="bert",
            num_heads=spec.num_heads,
            hidden_size=spec.hidden_size,
            opt_level=0,
        )
        optimized.save_model_to_file(str(target), use_external_data_format=_data_file(source, target) is not None)


def copy_graph(source: Path, target: Path) -> None:
    import onnx

    data = _data_file(source, target)
    onnx.save_model(
        onnx.load(str(source)),
        str(target),
        save_as_external_data=data is not None,
        all_tensors_to_one_file=True,
        location=data,
    )


def fused_op_counts(graph: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    counts = collections.Counter(node.op_type for node in model.graph.node if node.op_type in FUSED_OPS)
    return dict(sorted(counts.items()))


def probe_batch(spec: ModelSpec, rows: int = 4, width: int = 24) -> Batch:
    """Rows of unequal length (padding on the model's side), token ids every vocabulary holds."""
    rng = np.random.default_rng(0)
    lengths = np.array([width, width - 7, 3, width - 1][:rows], dtype=np.int64)
    columns = np.arange(width)[None, :]
    left = spec.padding_side == "left"
    mask = (columns >= width - lengths[:, None]) if left else (columns < lengths[:, None])
    ids = np.where(mask, rng.integers(5, 100, size=(rows, width)), 0).astype(np.int64)
    return Batch(
        input_ids=ids,
        attention_mask=mask.astype(np.int64),
        token_type_ids=np.zeros_like(ids),
        prompt_length=np.array([1, 0, 1, 2][:rows], dtype=np.int64),
        lengths=lengths,
        left_padded=left,
    )


def run_graph(graph: Path, spec: ModelSpec, batch: Batch) -> np.ndarray:
    backend = OnnxRuntimeBackend(graph, input_names(spec))
    try:
        return backend.infer(batch)
    finally:
        backend.close()


def _data_file(source: Path, target: Path) -> str | None:
    """The external-data file name for `target` when `source` keeps its weights in one."""
    return target.name + ".data" if source.with_name(source.name + ".data").exists() else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
