"""Export an `EngineModule` to ONNX with dynamic batch and sequence axes."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from bei.backend import Batch
from bei.errors import ExportError
from bei.modeling.module import OUTPUT_NAMES, EngineModule, input_names

# Graphs over this size keep their weights in a side file (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1 << 30


def _per_token(name: str) -> bool:
    return name != "prompt_length"


def export_onnx(module: EngineModule, sample: Batch, path: Path) -> None:
    """Write `path` (and `path.data` for large models). `sample` must hold padded rows of unequal
    length so that no padding-dependent branch is specialised away."""
    names = input_names(module.spec)
    feeds = {name: torch.from_numpy(array) for name, array in sample.feeds(names).items()}
    batch, seq = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    dynamic_shapes = {name: ({0: batch, 1: seq} if _per_token(name) else {0: batch}) for name in names}
    output = OUTPUT_NAMES[module.spec.task]
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), torch.no_grad():
            warnings.simplefilter("ignore")
            logging.getLogger("torch").setLevel(logging.ERROR)
            program = torch.onnx.export(
                module,
                args=(),
                kwargs=feeds,
                input_names=names,
                output_names=[output],
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; all mean the same to a user
        raise ExportError(f"ONNX export of {module.spec.architecture} failed: {err}\n{log.getvalue()[-2000:]}") from err
    if program is None:
        raise ExportError("ONNX export produced no program")
    model = program.model_proto
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=path.name + ".data" if large else None,
    )
