"""INT8 CPU engines: ONNX Runtime dynamic quantization of the fp32 engine graph, gated by accuracy.

Weights become int8 per output channel; activations are quantized per call (no calibration). A fused
`Attention` that takes the padding mask as `mask_index` (bei/targets/onnxruntime/fusions.py) becomes `QAttention`,
so the Q/K/V projections are int8 too (about a quarter of the encoder's FLOPs).

ONNX Runtime's own dynamic quantization gives a MatMul's input one scale for the whole tensor, which a
few outlier tokens or channels stretch: on all-MiniLM-L6-v2 that costs a worst cosine of 0.988 against
the fp32 engine. bei quantizes the inputs of chosen MatMuls per row (per token) instead: scale = the
row's max |x| / 127, uint8 around a zero point of 128 (VNNI's u8 x s8 kernels; ORT's MatMulInteger
takes one zero point for A, the scales are per row), then MatMulInteger and the two scales applied to
its int32 output. Attempts, fastest first, until one passes the gate against the fp32 graph on
held-out inputs: the fastest at or above cosine AIM (0.995, or the config's `min_accuracy` if higher),
else the fastest that passes `min_accuracy`:

1. per-row inputs for the MatMuls fed by a GELU (the MLP down-projections, the most skewed
   activations), per-tensor for the rest;
2. per-row inputs for every MatMul.

On all-MiniLM-L6-v2: 1.9x and 1.7x the fp32 engine, min cosine 0.992 and 0.996 (docs/benchmarks.md),
so the second is kept.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bei.accuracy import Accuracy, accuracy_of_outputs, require_accuracy
from bei.backend import Batch
from bei.modeling.spec import ModelSpec
from bei.targets.onnxruntime.fusions import run_graph

QTYPE = "int8"
# activations whose consumers get per-row scales in the first attempt
_SKEWED_ACTIVATIONS = frozenset({"Gelu", "BiasGelu", "FastGelu", "QuickGelu"})
_QUANTIZED_OPS = ["MatMul", "Attention"]
# what the quantizer writes for them (recorded in the manifest)
_INT8_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention")
_ZERO_POINT = 128  # uint8 activations, symmetric around it
# the accuracy the attempts aim for (the fastest attempt at or above it is kept); below it, the fastest
# that passes the config's min_accuracy
AIM = 0.995

log = logging.getLogger("bei.export")


def quantize_int8(
    spec: ModelSpec,
    fp32_graph: Path,
    target: Path,
    held_out: Batch,
    min_accuracy: float = 0.99,
    note: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the int8 graph to `target`; returns the manifest's `quantization` entry.

    Raises ExportError (through `require_accuracy`) when no attempt reaches `min_accuracy`.
    """
    note = note or log.info
    reference = run_graph(fp32_graph, spec, held_out)
    attempts = _attempts(fp32_graph)
    aim = max(min_accuracy, AIM)
    tried: list[tuple[str, list[str], Accuracy]] = []
    kept: tuple[str, list[str], Accuracy] | None = None
    for what, per_row in attempts:
        _quantize(fp32_graph, target, per_row)
        accuracy = accuracy_of_outputs(reference, run_graph(target, spec, held_out), held_out, spec.task, qtype=QTYPE)
        note(f"int8 ({what}): {accuracy.summary()}")
        tried.append((what, per_row, accuracy))
        if accuracy.min_cosine >= aim:
            kept = tried[-1]
            break
    if kept is None:  # none reached the aim: the fastest that passes the gate (the last, failing, if none does)
        kept = next((t for t in tried if t[2].min_cosine >= min_accuracy), tried[-1])
        if kept is not tried[-1]:  # the graph on disk is the last attempt's
            _quantize(fp32_graph, target, kept[1])
            note(f"int8 ({kept[0]}): kept, the fastest attempt that passes min_accuracy {min_accuracy}")
    _, per_row, accuracy = kept
    require_accuracy(accuracy, min_accuracy)  # raises when no attempt passes the gate
    ops = _op_counts(target)
    return {
        "type": QTYPE,
        "method": "int8 weights per output channel; activations quantized per call, per row (token) "
        "for the MatMuls in per_row_nodes, per tensor elsewhere (onnxruntime dynamic quantization)",
        "per_row_nodes": per_row,
        "int8_nodes": {op: ops[op] for op in _INT8_OPS if ops.get(op)},
        "reference": "the fp32 engine",
        "min_accuracy": min_accuracy,
        "aim": aim,
        "accuracy": accuracy.as_dict(),
    }


def _attempts(graph: Path) -> list[tuple[str, list[str]]]:
    """(description, MatMuls with per-row input scales), fastest first."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)  # read once: node names and weight shapes
    every = weighted_matmuls(model)
    after_gelu = matmuls_after_gelu(model)
    first: tuple[str, list[str]] = ("per-tensor scales", [])
    if after_gelu:
        first = (f"per-token scales for the {len(after_gelu)} MatMuls after a GELU", after_gelu)
    attempts = [first]
    if every and set(every) != set(first[1]):
        attempts.append((f"per-token scales for all {len(every)} MatMuls", every))
    return attempts


def _op_counts(graph: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def weighted_matmuls(model: Any) -> list[str]:
    """Names of the MatMul nodes of `model` (an onnx ModelProto) whose second input is a 2-D weight
    (an initializer)."""
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in weights]


def matmuls_after_gelu(model: Any) -> list[str]:
    """Names of the weighted MatMul nodes of `model` whose input is a GELU's output."""
    gelu_outputs = {out for node in model.graph.node if node.op_type in _SKEWED_ACTIVATIONS for out in node.output}
    weighted = set(weighted_matmuls(model))
    return [n.name for n in model.graph.node if n.name in weighted and n.input[0] in gelu_outputs]


def _quantize(source: Path, target: Path, per_row: list[str]) -> None:
    """ORT's dynamic quantization of every MatMul and Attention but `per_row`, which then get
    per-row input scales (`quantize_per_row`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = source.with_name(source.name + ".data").exists()
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staged = Path(scratch) / target.name
        with contextlib.redirect_stdout(io.StringIO()), _quiet_root_records():
            quantize_dynamic(
                source,
                staged,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=_QUANTIZED_OPS,
                nodes_to_exclude=per_row,
                use_external_data_format=external,
            )
        model = onnx.load(str(staged))
        quantize_per_row(model, per_row)
        data = target.name + ".data" if external else None
        onnx.save_model(model, str(target), save_as_external_data=external, all_tensors_to_one_file=True, location=data)


class _BelowLevel(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


@contextlib.contextmanager
def _quiet_root_records(level: int = logging.ERROR) -> Iterator[None]:
    """While in the block, drop the records below `level` logged on the root logger itself.

    onnxruntime.quantization logs through the module functions (`logging.warning(...)`: "consider
    pre-processing", per-tensor notes). A filter on the root logger sees only the records made there,
    not those that named loggers (bei's among them) pass up to its handlers, so they are untouched; the
    root logger's level stays as it was. `logging.warning` on a root logger without handlers also
    installs one (`basicConfig`): that one is removed again on the way out.
    """
    root = logging.getLogger()
    had_handlers = bool(root.handlers)
    quiet = _BelowLevel(level)
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        if not had_handlers:
            for handler in list(root.handlers):
                root.removeHandler(handler)
                handler.close()


def quantize_per_row(model: Any, names: list[str]) -> int:
    """Replace the MatMuls named `names` (x @ W, W an initializer) by int8 weights per output column
    and uint8 inputs with one scale per row: x2 = x reshaped to [rows, K]; s = max|x2| per row / 127;
    q = QuantizeLinear(x2, s, 128) per row; y = MatMulInteger(q, Wq, 128) * s * w_scale, reshaped
    back. Returns the number of MatMuls replaced."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    wanted = set(names)
    weights = {t.name: t for t in graph.initializer}
    constants: list[Any] = []

    def constant(name: str, value: np.ndarray) -> str:
        constants.append(numpy_helper.from_array(value, name))
        return name

    shared = {
        "rows": constant("bei_pr_rows", np.array([-1], np.int64)),
        "axis1": constant("bei_pr_axis1", np.array([1], np.int64)),
        "tiny": constant("bei_pr_tiny", np.array(1e-12, np.float32)),
        "127": constant("bei_pr_127", np.array(127.0, np.float32)),
        "zp": constant("bei_pr_zp", np.array(_ZERO_POINT, np.uint8)),
        "start": constant("bei_pr_start", np.array([0], np.int64)),
        "last": constant("bei_pr_last", np.array([-1], np.int64)),
    }
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)

    def reduce_max(x: str, out: str) -> Any:  # over each row; axes became an input in opset 18
        if opset >= 18:
            return helper.make_node("ReduceMax", [x, shared["axis1"]], [out], keepdims=1)
        return helper.make_node("ReduceMax", [x], [out], axes=[1], keepdims=1)

    nodes: list[Any] = []
    replaced = 0
    for node in graph.node:
        if node.name not in wanted or node.op_type != "MatMul" or node.input[1] not in weights:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        k, n = w.shape
        w_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0).astype(np.float32)
        w_int8 = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        p = f"{node.name}_per_row"
        x, y = node.input[0], node.output[0]
        nodes += [
            helper.make_node("Shape", [x], [f"{p}_shape"]),
            helper.make_node("Reshape", [x, constant(f"{p}_k", np.array([-1, k], np.int64))], [f"{p}_x2"]),
            helper.make_node("Abs", [f"{p}_x2"], [f"{p}_abs"]),
            reduce_max(f"{p}_abs", f"{p}_max"),
            helper.make_node("Max", [f"{p}_max", shared["tiny"]], [f"{p}_max1"]),
            helper.make_node("Div", [f"{p}_max1", shared["127"]], [f"{p}_scale"]),  # [rows, 1]
            helper.make_node("Reshape", [f"{p}_scale", shared["rows"]], [f"{p}_scale1"]),  # [rows]
            helper.make_node("Shape", [f"{p}_scale1"], [f"{p}_nrows"]),
            helper.make_node("Expand", [shared["zp"], f"{p}_nrows"], [f"{p}_zps"]),
            helper.make_node("QuantizeLinear", [f"{p}_x2", f"{p}_scale1", f"{p}_zps"], [f"{p}_q"], axis=0),
            helper.make_node("MatMulInteger", [f"{p}_q", constant(f"{p}_w", w_int8), shared["zp"]], [f"{p}_int"]),
            helper.make_node("Cast", [f"{p}_int"], [f"{p}_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}_float", f"{p}_scale"], [f"{p}_rows_scaled"]),
            helper.make_node("Mul", [f"{p}_rows_scaled", constant(f"{p}_w_scale", w_scale)], [f"{p}_y2"]),
            helper.make_node("Slice", [f"{p}_shape", shared["start"], shared["last"]], [f"{p}_lead"]),
            helper.make_node("Concat", [f"{p}_lead", constant(f"{p}_n", np.array([n], np.int64))], [f"{p}_out_shape"], axis=0),
            helper.make_node("Reshape", [f"{p}_y2", f"{p}_out_shape"], [y]),
        ]
        replaced += 1
    if not replaced:
        return 0
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used] + [t for t in constants if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return replaced
