"""TensorRT backend (GPU): one execution context per optimization profile, output buffers
allocated once at each profile's largest shape and reused, one CUDA stream for the engine and one
for copies: `prepare` copies the next batch's inputs to the GPU (pinned, on the copy stream) while
the engine runs the current one; `run` waits for that copy, then executes.
Implements the same `Backend` contract as ONNX Runtime; verify it with docs/gpu.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bei.backend import Backend, Batch
from bei.engine.profiles import Profile, select_profile


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, plan: Path, input_names: list[str], output_name: str, profiles: list[Profile]) -> None:
        import tensorrt as trt
        import torch

        self._torch = torch
        self.input_names = input_names
        self.output_name = output_name
        self.profiles = profiles
        self.stream = torch.cuda.Stream()
        self.copy_stream = torch.cuda.Stream()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        self.contexts: list[Any] = []
        self.outputs: list[Any] = []
        out_dtype = _torch_dtype(torch, self.engine.get_tensor_dtype(output_name))
        for index, profile in enumerate(profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            for name in input_names:
                high = (profile.batch[2],) if name == "prompt_length" else (profile.batch[2], profile.seq[2])
                context.set_input_shape(name, high)
            largest = tuple(context.get_tensor_shape(output_name))
            self.contexts.append(context)
            self.outputs.append(torch.empty(largest, dtype=out_dtype, device="cuda"))

    def prepare(self, batch: Batch) -> _Prepared:
        torch = self._torch
        with torch.cuda.stream(self.copy_stream):
            feeds = {k: torch.from_numpy(v).pin_memory().to("cuda", non_blocking=True) for k, v in batch.feeds(self.input_names).items()}
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        return _Prepared(feeds, copied, batch.input_ids.shape)

    def run(self, prepared: object) -> np.ndarray:
        assert isinstance(prepared, _Prepared)
        torch = self._torch
        rows, width = prepared.shape
        index = select_profile(self.profiles, rows, width)
        context = self.contexts[index]
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(prepared.copied)
            for name, tensor in prepared.feeds.items():
                tensor.record_stream(self.stream)
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            shape = tuple(context.get_tensor_shape(self.output_name))
            count = int(np.prod(shape))
            out = self.outputs[index].view(-1)[:count].view(shape)
            context.set_tensor_address(self.output_name, out.data_ptr())
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            result = out.float().cpu()
        self.stream.synchronize()
        return result.numpy()

    def infer(self, batch: Batch) -> np.ndarray:
        return self.run(self.prepare(batch))


@dataclass(frozen=True)
class _Prepared:
    feeds: dict[str, Any]  # input name -> CUDA tensor
    copied: Any  # torch.cuda.Event: the copies are done
    shape: tuple[int, ...]


def _torch_dtype(torch: Any, trt_dtype: Any) -> Any:
    import tensorrt as trt

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}[trt_dtype]
