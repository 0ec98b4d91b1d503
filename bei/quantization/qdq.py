"""The Q/DQ ONNX export of a module quantized by `bei.quantization.modelopt`, for TensorRT.

The ONNX graph: ModelOpt exports Q/DQ only through the TorchScript exporter; bei exports with the dynamo
exporter (as `bei.modeling.onnx_export`), each enabled quantizer traced as one placeholder node, then lowered to
- FP8:   weights stored as FLOAT8E4M3FN initializers -> DequantizeLinear; activations QuantizeLinear ->
         DequantizeLinear with a FLOAT8E4M3FN zero point (opset 20, standard ONNX; ONNX Runtime runs it too);
- NVFP4: the layout of ModelOpt's NVFP4 ONNX export that TensorRT consumes: weights as FLOAT4E2M1
         initializers with FLOAT8E4M3FN block scales and two DequantizeLinear (the second blocked,
         block_size 16, axis -1); activations `trt::TRT_FP4DynamicQuantize` -> DequantizeLinear (scales)
         -> DequantizeLinear (blocked); opset 23. TensorRT runs this graph; ONNX Runtime cannot (the
         dynamic FP4 quantize is a TensorRT op).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from bei.backend import Batch
from bei.errors import ExportError
from bei.modeling.module import EngineModule
from bei.modeling.quant_layers import NVFP4_BLOCK
from bei.quantization.modelopt import E2M1_MAX, E4M3_MAX, enabled_quantizers, install_cpu_kernels, tensor_quantizer_cls

QDOMAIN = "bei.quant"  # placeholder ops of the traced graph, lowered by `_lower_qdq`
TRT_DOMAIN = "trt"
FP8_OPSET = 20
FP4_OPSET = 23
LAYER_KEY = "bei.quant.layer"  # node metadata: the quantized layer a Q/DQ node belongs to

_ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
_NP_DTYPE: dict[int, Any] = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class _QSpec:
    kind: str  # "FP8QDQ" | "NVFP4QDQ"
    amax: float
    layer: str
    role: str  # "weight" | "input"
    block_size: int = 0


def _export_plan(module: torch.nn.Module) -> dict[int, _QSpec]:
    plan: dict[int, _QSpec] = {}
    for name, q in enabled_quantizers(module):
        layer, _, attr = name.rpartition(".")
        role = attr.removesuffix("_quantizer")
        amax = q.amax
        if amax is None or amax.numel() != 1 or role not in ("weight", "input"):
            raise ExportError(f"quantizer {name} cannot be exported: only calibrated per-tensor weight and input quantizers are supported")
        num_bits = tuple(q.num_bits) if isinstance(q.num_bits, (tuple, list)) else q.num_bits
        blocks = q.block_sizes or {}
        if num_bits == (4, 3) and not blocks:
            plan[id(q)] = _QSpec("FP8QDQ", float(amax), layer, role)
        elif num_bits == (2, 1) and blocks.get("type") == "dynamic" and tuple(blocks.get("scale_bits", ())) == (4, 3):
            plan[id(q)] = _QSpec("NVFP4QDQ", float(amax), layer, role, int(blocks.get(-1) or NVFP4_BLOCK))
        else:
            raise ExportError(f"quantizer {name} ({num_bits} bits, blocks {blocks}) has no Q/DQ export")
    return plan


@contextlib.contextmanager
def _placeholder_quantizers(plan: dict[int, _QSpec]) -> Iterator[None]:
    """While exporting, each planned quantizer traces as one `bei.quant` node holding its settings."""
    cls = tensor_quantizer_cls()
    original = cls.forward

    def forward(self: Any, inputs: torch.Tensor) -> torch.Tensor:
        spec = plan.get(id(self))
        if spec is None:
            return original(self, inputs)
        attrs: dict[str, Any] = {
            "amax": spec.amax,
            "layer": spec.layer,
            "role": spec.role,
            "dtype": _ONNX_DTYPE.get(inputs.dtype, TensorProto.FLOAT),
        }
        if spec.block_size:
            attrs["block_size"] = spec.block_size
        return torch.onnx.ops.symbolic(f"{QDOMAIN}::{spec.kind}", (inputs,), attrs, dtype=inputs.dtype, shape=inputs.shape, version=1)

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def export_qdq_onnx(quantized: EngineModule, sample: Batch, path: Path) -> dict[str, int]:
    """Write `quantized` as an ONNX graph with explicit Q/DQ nodes (see the module docstring); returns
    `count_qdq(path)`. `sample`: padded rows of unequal length, as for `bei.modeling.onnx_export.export_onnx`."""
    from bei.modeling.onnx_export import EXTERNAL_DATA_BYTES, export_onnx

    plan = _export_plan(quantized)
    if not plan:
        raise ExportError("the module has no enabled quantizer: quantize it first (quantize_module)")
    path = Path(path)
    install_cpu_kernels()
    with _placeholder_quantizers(plan):
        export_onnx(quantized, sample, path)
    model = onnx.load(str(path))
    try:
        model = _lower_qdq(model)
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ExportError(f"lowering the quantized graph to Q/DQ failed: {type(err).__name__}: {err}") from err
    for leftover in path.parent.glob(path.name + ".data"):
        leftover.unlink()
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model, str(path), save_as_external_data=large, all_tensors_to_one_file=True, location=path.name + ".data" if large else None
    )
    return count_qdq(path)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _raw_tensor(name: str, data_type: int, dims: Sequence[int], raw: bytes) -> TensorProto:
    return helper.make_tensor(name, data_type, list(dims), vals=raw, raw=True)


def _tag(node: onnx.NodeProto, layer: str) -> onnx.NodeProto:
    entry = node.metadata_props.add()
    entry.key, entry.value = LAYER_KEY, layer
    return node


def _lower_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the `bei.quant` placeholders with FP8 / NVFP4 Q/DQ subgraphs (weights quantized offline)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    uses.update(o.name for o in graph.output)
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    drop: set[str] = set()
    rename: dict[str, str] = {}
    shared: dict[tuple[str, str, float, int], str] = {}  # identical activation Q/DQ on one tensor: one copy
    kinds: set[str] = set()

    def scale_init(name: str, value: float, data_type: int) -> str:
        arr = np.array(value, dtype=_NP_DTYPE.get(data_type, np.float32))
        tensor = numpy_helper.from_array(arr, name)
        if data_type == TensorProto.BFLOAT16:
            tensor = helper.make_tensor(name, TensorProto.BFLOAT16, [], [value])
        new_inits.append(tensor)
        return name

    for node in graph.node:
        if any(i in rename for i in node.input):
            inputs = [rename.get(i, i) for i in node.input]
            del node.input[:]
            node.input.extend(inputs)
        if node.domain != QDOMAIN:
            new_nodes.append(node)
            continue
        a = _attrs(node)
        kind, amax, role = node.op_type, float(a["amax"]), a["role"].decode() if isinstance(a["role"], bytes) else a["role"]
        layer = a["layer"].decode() if isinstance(a["layer"], bytes) else a["layer"]
        dtype, block = int(a["dtype"]), int(a.get("block_size", NVFP4_BLOCK))
        x, y = node.input[0], node.output[0]
        base = f"{layer}.{role}"
        kinds.add(kind)
        key = (x, kind, amax, block)
        if x not in inits and key in shared:
            rename[y] = shared[key]
            continue
        shared[key] = y
        amax = amax if amax > 0 else 1.0
        if kind == "FP8QDQ":
            scale = scale_init(f"{base}_scale", amax / E4M3_MAX, dtype)
            if x in inits:
                w = torch.from_numpy(numpy_helper.to_array(inits[x]).astype(np.float32))
                w8 = (w / (amax / E4M3_MAX)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
                new_inits.append(_raw_tensor(f"{base}_fp8", TensorProto.FLOAT8E4M3FN, w8.shape, w8.view(torch.uint8).numpy().tobytes()))
                new_nodes.append(
                    _tag(helper.make_node("DequantizeLinear", [f"{base}_fp8", scale], [y], name=f"{base}/DequantizeLinear"), layer)
                )
                drop.add(x)
            else:
                zero = f"{base}_zero_point"
                new_inits.append(_raw_tensor(zero, TensorProto.FLOAT8E4M3FN, [], b"\x00"))
                new_nodes.append(
                    _tag(helper.make_node("QuantizeLinear", [x, scale, zero], [f"{base}_fp8"], name=f"{base}/QuantizeLinear"), layer)
                )
                new_nodes.append(
                    _tag(helper.make_node("DequantizeLinear", [f"{base}_fp8", scale, zero], [y], name=f"{base}/DequantizeLinear"), layer)
                )
        elif kind == "NVFP4QDQ":
            s2 = amax / (E2M1_MAX * E4M3_MAX)
            s2_name = scale_init(f"{base}_global_scale", s2, TensorProto.FLOAT)
            final = y
            if dtype != TensorProto.FLOAT:  # the FP32 scales make FP32 values: back to the graph's dtype
                y = f"{base}_dequantized"
            if x in inits:
                w_f4, s_f8 = _nvfp4_weight(numpy_helper.to_array(inits[x]), block, s2, layer)
                new_inits.append(_raw_tensor(f"{base}_fp4", TensorProto.FLOAT4E2M1, w_f4[0], w_f4[1]))
                new_inits.append(_raw_tensor(f"{base}_block_scale", TensorProto.FLOAT8E4M3FN, s_f8[0], s_f8[1]))
                drop.add(x)
            else:
                new_nodes.append(
                    _tag(
                        helper.make_node(
                            "TRT_FP4DynamicQuantize",
                            [x, s2_name],
                            [f"{base}_fp4", f"{base}_block_scale"],
                            name=f"{base}/TRT_FP4DynamicQuantize",
                            domain=TRT_DOMAIN,
                            axis=-1,
                            block_size=block,
                            scale_type=TensorProto.FLOAT8E4M3FN,
                        ),
                        layer,
                    )
                )
            # weights (FP4 initializers) and activations (dynamic FP4) dequantize the same way: two levels
            new_nodes.append(
                _tag(
                    helper.make_node(
                        "DequantizeLinear",
                        [f"{base}_block_scale", s2_name],
                        [f"{base}_block_scale_f32"],
                        name=f"{base}/DequantizeLinear_scale",
                    ),
                    layer,
                )
            )
            new_nodes.append(
                _tag(
                    helper.make_node(
                        "DequantizeLinear",
                        [f"{base}_fp4", f"{base}_block_scale_f32"],
                        [y],
                        name=f"{base}/DequantizeLinear",
                        axis=-1,
                        block_size=block,
                    ),
                    layer,
                )
            )
            if y != final:
                new_nodes.append(_tag(helper.make_node("Cast", [y], [final], name=f"{base}/Cast", to=dtype), layer))
        else:
            raise ExportError(f"unknown quantization placeholder {node.op_type}")
    for out in graph.output:
        out.name = rename.get(out.name, out.name)
    still_used = {name for node in new_nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name not in drop or t.name in still_used]
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + new_inits)
    # placeholders' outputs keep their value_info; drop entries of tensors that no longer exist
    produced = {o for node in new_nodes for o in node.output}
    keep_vi = [vi for vi in graph.value_info if vi.name in produced]
    graph.ClearField("value_info")
    graph.value_info.extend(keep_vi)

    opsets = [o for o in model.opset_import if o.domain != QDOMAIN]
    model.ClearField("opset_import")
    model.opset_import.extend(opsets)
    default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    default.version = max(default.version, FP4_OPSET if "NVFP4QDQ" in kinds else FP8_OPSET)
    if any(n.domain == TRT_DOMAIN for n in new_nodes):
        model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
    if "NVFP4QDQ" in kinds:
        model.ir_version = max(model.ir_version, 11)  # FLOAT4E2M1
    return model


def _nvfp4_weight(weight: np.ndarray, block: int, s2: float, layer: str) -> tuple[tuple[list[int], bytes], tuple[list[int], bytes]]:
    """(dims, packed FLOAT4E2M1 bytes) of the weight and (dims, FLOAT8E4M3FN bytes) of its block scales,
    as ModelOpt's NVFP4QTensor quantizes them (low nibble = even element)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    w = torch.from_numpy(weight.astype(np.float32))
    if w.shape[-1] % block:
        raise ExportError(f"{layer}: input width {w.shape[-1]} is not a multiple of the NVFP4 block size {block}")
    qt, block_scale, _ = NVFP4QTensor.quantize(w, block, weights_scaling_factor_2=torch.tensor(s2, dtype=torch.float32))
    packed = qt._quantized_data.to(torch.uint8).contiguous()
    scale_bytes = block_scale.to(torch.float8_e4m3fn).contiguous().view(torch.uint8).numpy().tobytes()
    return (list(w.shape), packed.numpy().tobytes()), (list(block_scale.shape), scale_bytes)


def count_qdq(path: Path) -> dict[str, int]:
    """Node and tensor counts of a Q/DQ graph, for the build plan: QuantizeLinear, DequantizeLinear,
    TRT_FP4DynamicQuantize nodes; fp8_weights / fp4_weights (quantized weight tensors); layers
    (quantized layers, see `qdq_layers`)."""
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    weights: Counter[int] = Counter()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.name.endswith(".weight/DequantizeLinear"):
            weights[dtypes.get(node.input[0], 0)] += 1
    return {
        "QuantizeLinear": ops.get("QuantizeLinear", 0),
        "DequantizeLinear": ops.get("DequantizeLinear", 0),
        "TRT_FP4DynamicQuantize": ops.get("TRT_FP4DynamicQuantize", 0),
        "fp8_weights": weights.get(TensorProto.FLOAT8E4M3FN, 0),
        "fp4_weights": weights.get(TensorProto.FLOAT4E2M1, 0),
        "layers": len(_layers(model)),
    }


def _layers(model: onnx.ModelProto) -> list[str]:
    return sorted({p.value for node in model.graph.node for p in node.metadata_props if p.key == LAYER_KEY})


def qdq_layers(path: Path) -> list[str]:
    """The layers (torch module names) that have Q/DQ nodes in the graph at `path`."""
    return _layers(onnx.load(str(path), load_external_data=False))
