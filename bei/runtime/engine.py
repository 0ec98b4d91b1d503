"""Load an engine directory: manifest, compatibility check, backend, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bei.engine.compat import check_compatible
from bei.engine.manifest import Manifest, read_manifest
from bei.errors import EngineError
from bei.runtime.base import Backend
from bei.runtime.tokenizer import TokenizerRuntime


@dataclass
class LoadedEngine:
    folder: Path
    manifest: Manifest
    backend: Backend
    tokenizer: TokenizerRuntime

    @property
    def per_token_output(self) -> bool:
        return self.manifest.task == "ner"


def open_backend(folder: Path, manifest: Manifest, threads: int | None = None) -> Backend:
    if manifest.target.name == "onnxruntime-cpu":
        from bei.runtime.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(folder / manifest.graph_file, manifest.graph_inputs, threads=threads)
    if manifest.target.name == "tensorrt":
        from bei.export.profiles import Profile
        from bei.runtime.tensorrt import TensorRTBackend

        profiles = [Profile(batch=tuple(p["batch"]), seq=tuple(p["seq"])) for p in manifest.profiles]  # type: ignore[arg-type]
        return TensorRTBackend(folder / manifest.graph_file, manifest.graph_inputs, manifest.graph_output, profiles)
    if manifest.target.name == "torch":
        from bei.runtime.torch_backend import TorchBackend

        return TorchBackend.load(folder, manifest, threads=threads)
    raise EngineError(f"no backend for target {manifest.target.name!r}")


def load_engine(folder: Path, *, threads: int | None = None) -> LoadedEngine:
    manifest = read_manifest(folder)
    check_compatible(manifest)
    tokenizer = TokenizerRuntime(folder / "tokenizer.json", manifest.max_input_tokens, chat_template=manifest.chat_template)
    return LoadedEngine(folder=folder, manifest=manifest, backend=open_backend(folder, manifest, threads), tokenizer=tokenizer)
