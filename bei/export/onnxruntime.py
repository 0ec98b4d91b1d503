"""The CPU target: ONNX Runtime's transformer fusions applied offline to the exported graph."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnxruntime

from bei.modeling.spec import ModelSpec

TARGET_NAME = "onnxruntime-cpu"

# model types whose graphs onnxruntime.transformers' BERT fusions understand
_BERT_FUSIONS = {"bert", "roberta", "xlm-roberta", "distilbert"}


def versions() -> dict[str, str]:
    import onnx

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


def optimize(spec: ModelSpec, source: Path, target: Path) -> dict[str, int]:
    """Fuse attention / layer norm / GELU where the graph allows; returns the fused-op counts.

    Graphs the fusions do not know are copied as they are: ONNX Runtime still applies its own
    generic optimizations when the session loads.
    """
    if spec.model_type not in _BERT_FUSIONS:
        _copy(source, target)
        return {}
    from onnxruntime.transformers.optimizer import optimize_model

    quiet = io.StringIO()
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(quiet):
        optimized = optimize_model(
            str(source),
            model_type="bert",
            num_heads=spec.num_heads,
            hidden_size=spec.hidden_size,
            opt_level=0,
        )
    counts = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    optimized.save_model_to_file(str(target))
    return counts


def _copy(source: Path, target: Path) -> None:
    import onnx

    onnx.save_model(onnx.load(str(source)), str(target))
