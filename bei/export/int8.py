"""INT8 CPU engines: ONNX Runtime dynamic quantization of the fp32 engine graph, gated by accuracy.

Weights become int8 per output channel; activations are quantized per call (no calibration). A fused
`Attention` that takes the padding mask as `mask_index` (bei/export/onnxruntime.py) becomes `QAttention`,
so the Q/K/V projections are int8 too (about a quarter of the encoder's FLOPs). The quantized graph is compared with the fp32 graph on held-out inputs (`bei.export.quantize`'s accuracy
figures and gate). When quantizing every MatMul misses the gate, the MatMuls fed by a GELU (the MLP
down-projections, whose inputs are the most skewed) stay fp32 and it is tried again: on
all-MiniLM-L6-v2 and random-word texts that moves the worst cosine from 0.981 to 0.992, for 1.5x
less CPU instead of 1.7x (docs/benchmarks.md, before QAttention).
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bei.export.onnxruntime import run_graph
from bei.export.quantize import accuracy_of_outputs, require_accuracy
from bei.modeling.spec import ModelSpec
from bei.runtime.base import Batch

QTYPE = "int8"
# activations whose consumers keep fp32 weights in the second attempt
_SKEWED_ACTIVATIONS = frozenset({"Gelu", "BiasGelu", "FastGelu", "QuickGelu"})
_QUANTIZED_OPS = ["MatMul", "Attention"]
# what the quantizer writes for them (recorded in the manifest)
_INT8_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention")

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
    attempts: list[tuple[str, list[str]]] = [("every MatMul", [])]
    after_gelu = matmuls_after_gelu(fp32_graph)
    if after_gelu:
        attempts.append((f"every MatMul but the {len(after_gelu)} after a GELU", after_gelu))
    for number, (what, excluded) in enumerate(attempts, 1):
        _quantize(fp32_graph, target, excluded)
        accuracy = accuracy_of_outputs(reference, run_graph(target, spec, held_out), held_out, spec.task, qtype=QTYPE)
        note(f"int8 ({what}): {accuracy.summary()}")
        if accuracy.min_cosine >= min_accuracy or number == len(attempts):
            require_accuracy(accuracy, min_accuracy)  # raises when the last attempt misses the gate too
            ops = _op_counts(target)
            return {
                "type": QTYPE,
                "method": "onnxruntime dynamic quantization: int8 weights per output channel, activations per call",
                "fp32_nodes": excluded,
                "int8_nodes": {op: ops[op] for op in _INT8_OPS if ops.get(op)},
                "reference": "the fp32 engine",
                "min_accuracy": min_accuracy,
                "accuracy": accuracy.as_dict(),
            }
    raise AssertionError("no attempts")  # attempts is never empty


def _op_counts(graph: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def matmuls_after_gelu(graph: Path) -> list[str]:
    """Names of the MatMul nodes whose input is a GELU's output."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    gelu_outputs = {out for node in model.graph.node if node.op_type in _SKEWED_ACTIVATIONS for out in node.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input and n.input[0] in gelu_outputs]


def _quantize(source: Path, target: Path, excluded: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=_QUANTIZED_OPS,
            nodes_to_exclude=excluded,
            use_external_data_format=source.with_name(source.name + ".data").exists(),
        )
