"""Load an engine directory: manifest, compatibility check, file check, the target's backend, tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bei.backend import Backend
from bei.engine.integrity import TOKENIZER_FILE, engine_path, verify_engine
from bei.engine.manifest import Manifest, read_manifest
from bei.kinds import PER_TOKEN_TASKS
from bei.targets import registry
from bei.text.tokenizer import TokenizerRuntime

log = logging.getLogger("bei")


@dataclass
class LoadedEngine:
    folder: Path
    manifest: Manifest
    backend: Backend
    tokenizer: TokenizerRuntime

    @property
    def per_token_output(self) -> bool:
        return self.manifest.task in PER_TOKEN_TASKS


def open_backend(folder: Path, manifest: Manifest, threads: int | None = None) -> Backend:
    return registry.get(manifest.target.name).open(folder, manifest, threads)


def open_manifest(folder: Path) -> Manifest:
    """The manifest of an engine that may serve here: valid, built for this machine, its files as built
    (EngineError naming the file otherwise). Engines without recorded hashes pass with a warning."""
    manifest = read_manifest(folder)
    registry.check_compatible(manifest)
    warning = verify_engine(folder, manifest)
    if warning:
        log.warning(warning)
    return manifest


def load_engine(folder: Path, *, threads: int | None = None, manifest: Manifest | None = None) -> LoadedEngine:
    """Load an engine; `manifest`: one `open_manifest` already checked (its files are not hashed again)."""
    manifest = manifest or open_manifest(folder)
    tokenizer = TokenizerRuntime(engine_path(folder, TOKENIZER_FILE), manifest.max_input_tokens, chat_template=manifest.chat_template)
    return LoadedEngine(folder=folder, manifest=manifest, backend=open_backend(folder, manifest, threads), tokenizer=tokenizer)
