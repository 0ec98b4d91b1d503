"""An engine's files, checked before it serves: every file confined to the engine folder, and the same
bytes as at build (sha256 recorded in the manifest by `bei build`, `engine_files`), the manifest itself
unedited (`manifest_sha256`). A truncated graph, a swapped tokenizer.json or an edited task never serve:
the check fails with a message naming the file, and `bei serve` exits before it listens.
"""

from __future__ import annotations

import json
from pathlib import Path

from bei.checkpoint import sha256_file
from bei.engine.manifest import DIGEST_FIELD, MANIFEST_FILE, Manifest, manifest_digest
from bei.errors import EngineError

TOKENIZER_FILE = "tokenizer.json"
REBUILD = "rebuild the engine with `bei build` (or `bei serve --config`)"


def hash_engine_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but its manifest.json, by relative posix path."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST_FILE
    }


def engine_path(folder: Path, name: str) -> Path:
    """`folder/name`, refused when it leads outside the engine folder (`..`, absolute, a symlink out)."""
    root = folder.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise EngineError(f"{folder}: {name} points outside the engine folder; {REBUILD}")
    return path


def verify_engine(folder: Path, manifest: Manifest) -> str | None:
    """Raise EngineError naming the first file that is missing, outside the folder or not as built.
    Returns a warning for an engine built before bei recorded file hashes (it is checked less)."""
    for name in (manifest.graph_file, TOKENIZER_FILE):
        if not engine_path(folder, name).is_file():
            raise EngineError(f"{folder}: {name} is missing; {REBUILD}")
    if not manifest.engine_files:
        return (
            f"{folder}: the engine was built before bei recorded the hashes of its files, so they are not checked; "
            "rebuild it to have them checked at load"
        )
    _check_manifest_digest(folder)
    for name in (manifest.graph_file, TOKENIZER_FILE):
        if name not in manifest.engine_files:
            raise EngineError(f"{folder}: {name} has no hash in {MANIFEST_FILE}; {REBUILD}")
    for name, recorded in manifest.engine_files.items():
        path = engine_path(folder, name)
        if not path.is_file():
            raise EngineError(f"{folder}: {name} is missing; {REBUILD}")
        if sha256_file(path) != recorded:
            raise EngineError(
                f"{folder}: {name} is not the file that was built (its sha256 differs: corrupt, truncated or replaced); {REBUILD}"
            )
    return None


def _check_manifest_digest(folder: Path) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    recorded = data.get(DIGEST_FIELD)
    if recorded is None:
        raise EngineError(f"{folder}: {MANIFEST_FILE} has file hashes but no {DIGEST_FIELD}; {REBUILD}")
    if manifest_digest(data) != recorded:
        raise EngineError(f"{folder}: {MANIFEST_FILE} was edited after the build (its {DIGEST_FIELD} differs); {REBUILD}")
