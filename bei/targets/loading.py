"""Load an engine directory: manifest, compatibility check, the target's backend, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bei.backend import Backend
from bei.engine.manifest import Manifest, read_manifest
from bei.kinds import Task
from bei.targets import registry
from bei.text.tokenizer import TokenizerRuntime


@dataclass
class LoadedEngine:
    folder: Path
    manifest: Manifest
    backend: Backend
    tokenizer: TokenizerRuntime

    @property
    def per_token_output(self) -> bool:
        return self.manifest.task is Task.NER


def open_backend(folder: Path, manifest: Manifest, threads: int | None = None) -> Backend:
    return registry.get(manifest.target.name).open(folder, manifest, threads)


def load_engine(folder: Path, *, threads: int | None = None) -> LoadedEngine:
    manifest = read_manifest(folder)
    registry.check_compatible(manifest)
    tokenizer = TokenizerRuntime(folder / "tokenizer.json", manifest.max_input_tokens, chat_template=manifest.chat_template)
    return LoadedEngine(folder=folder, manifest=manifest, backend=open_backend(folder, manifest, threads), tokenizer=tokenizer)
