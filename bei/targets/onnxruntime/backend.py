"""ONNX Runtime backend (CPU): one session, called from the batcher's worker thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

from bei.backend import Backend, Batch


def session_options(threads: int | None = None, spinning: bool = False) -> onnxruntime.SessionOptions:
    """All graph optimizations; `threads` intra-op threads (default: ORT's, one per core).

    `spinning` off by default: ORT's pool threads otherwise busy-wait between work items, taking
    the cores from the event loop, the tokenizer and the next batch's preparation. Measured over
    HTTP on 2 cores shared with other work (docs/benchmarks.md): 1.66-1.73x on single requests,
    1.14x on batches of 32 medium inputs.
    """
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, graph: Path, input_names: list[str], threads: int | None = None, spinning: bool = False) -> None:
        options = session_options(threads, spinning)
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        graph_inputs = {i.name for i in self.session.get_inputs()}
        # fusions may drop an input the graph no longer reads (e.g. token_type_ids of a 1-type model)
        self.input_names = [name for name in input_names if name in graph_inputs]

    def infer(self, batch: Batch) -> np.ndarray:
        output = self.session.run(None, batch.feeds(self.input_names))[0]
        return np.asarray(output)
