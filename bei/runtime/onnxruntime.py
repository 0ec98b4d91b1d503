"""ONNX Runtime backend (CPU): one session, called from the batcher's worker thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

from bei.runtime.base import Backend, Batch


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, graph: Path, input_names: list[str], threads: int | None = None) -> None:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        graph_inputs = {i.name for i in self.session.get_inputs()}
        # fusions may drop an input the graph no longer reads (e.g. token_type_ids of a 1-type model)
        self.input_names = [name for name in input_names if name in graph_inputs]

    def infer(self, batch: Batch) -> np.ndarray:
        output = self.session.run(None, batch.feeds(self.input_names))[0]
        return np.asarray(output)
