"""manifest.json: what an engine directory holds, where it came from, and what it was built for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from bei.engine.profiles import Profile
from bei.errors import EngineError
from bei.kinds import DENSE_TASKS, GRAPH_OUTPUTS, Precision, Task

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
DIGEST_FIELD = "manifest_sha256"


def inside_path(name: str) -> str:
    """`name` if it is a relative path that stays inside the engine folder (no `..`, not absolute)."""
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or PurePosixPath(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise ValueError(f"{name!r} is not a relative path inside the engine folder")
    return name


def manifest_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest's JSON data without its own digest field: canonical JSON (sorted keys)."""
    body = {k: v for k, v in data.items() if k != DIGEST_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class SourceInfo(BaseModel):
    source: str
    repo: str
    revision: str | None = None
    file_hashes: dict[str, str] = Field(default_factory=dict)


class PoolingInfo(BaseModel):
    modes: list[str]
    include_prompt: bool = True


class TargetInfo(BaseModel):
    """The target an engine was built by (a name in `bei.targets.registry`), the runtime versions it
    was built with, and the hardware it needs: GPU engines name the GPU; `device` and `dtype` say
    where and in what activation dtype the engine runs."""

    model_config = ConfigDict(extra="forbid")
    name: str  # "onnxruntime-cpu", "tensorrt", "torch", ...
    versions: dict[str, str] = Field(default_factory=dict)
    gpu: str | None = None
    compute_capability: str | None = None
    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str | None = None  # activation dtype of targets that choose one at build ("float32", "bfloat16", ...)
    cpu_features: list[str] = Field(default_factory=list)  # CPU ISA features the engine needs (e.g. avx512_bf16)


class DenseLayerInfo(BaseModel):
    """A sentence-transformers Dense layer; its weights are in the engine's weights file."""

    model_config = ConfigDict(extra="forbid")
    in_features: int
    out_features: int
    bias: bool
    activation: str


class CandidateInfo(BaseModel):
    """One engine `cpu_precision: auto` built and timed on the build host."""

    model_config = ConfigDict(extra="forbid")
    target: str
    precision: str
    chosen: bool = False
    texts_per_s: float | None = None  # on the model's own shapes (held-out texts, batches of 32)
    min_cosine: float | None = None  # its verification against the fp32 reference
    error: str | None = None  # why it was dropped (its accuracy gate, ...)


class VerificationInfo(BaseModel):
    reference: str
    samples: int
    max_abs_diff: float
    min_cosine: float


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    bei_version: str
    name: str
    source: SourceInfo
    task: Task
    architecture: str
    model_type: str
    base_model: str
    pooling: PoolingInfo | None = None
    normalize: bool = False
    embedding_dim: int | None = None
    colbert_dim: int | None = None  # embed_m3 (bge-m3): its ColBERT vectors' width (bei/modeling/m3.py)
    labels: list[str] = Field(default_factory=list)
    max_input_tokens: int
    max_num_tokens: int
    max_batch_size: int
    padding_side: str = "right"
    prompts: dict[str, str] = Field(default_factory=dict)
    default_prompt_name: str | None = None
    chat_template: str | None = None  # inputs rendered through it (causal rerankers / classifiers), as ST does
    default_route: str | None = None
    precision: Precision
    target: TargetInfo
    graph_file: str
    graph_inputs: list[str]
    graph_output: str
    build_time: str
    build_seconds: float
    verification: VerificationInfo
    config: dict[str, Any]
    config_fingerprint: str
    profiles: list[Profile] = Field(default_factory=list)  # TensorRT optimization profiles
    # sentence-transformers Dense layers: the torch target rebuilds its module from them
    dense_layers: list[DenseLayerInfo] = Field(default_factory=list)
    quantization: dict[str, Any] | None = None  # quantized engines: type, calibration, accuracy figures
    selection: list[CandidateInfo] = Field(default_factory=list)  # cpu_precision auto: every candidate's figures
    # sha256 of every file of the engine folder but manifest.json (relative posix path -> hex), checked
    # at load; empty in engines built before bei recorded them (they load, with a warning)
    engine_files: dict[str, str] = Field(default_factory=dict)
    manifest_sha256: str | None = None  # of this manifest's other fields (`manifest_digest`), set by `write`

    @field_validator("graph_file")
    @classmethod
    def _graph_inside(cls, value: str) -> str:
        return inside_path(value)

    @field_validator("engine_files")
    @classmethod
    def _files_inside(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            inside_path(name)
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"engine_files[{name!r}]: {digest!r} is not a sha256 hex digest")
        return value

    @model_validator(mode="after")
    def _output_fits_task(self) -> Manifest:
        if self.graph_output != GRAPH_OUTPUTS[self.task]:
            raise ValueError(
                f"task {self.task.value!r} does not fit the engine's graph output {self.graph_output!r} "
                f"(a {self.task.value} engine computes {GRAPH_OUTPUTS[self.task]!r}); was manifest.json edited?"
            )
        if self.task in DENSE_TASKS and not self.embedding_dim:
            raise ValueError(f"an {self.task.value} engine needs embedding_dim")
        if (self.task is Task.EMBED_M3) != bool(self.colbert_dim):
            raise ValueError("colbert_dim is set for embed_m3 engines (bge-m3), and only for them")
        return self

    def write(self, folder: Path) -> None:
        """manifest.json, with the digest of its other fields (`manifest_sha256`)."""
        data = self.model_dump(mode="json", exclude={DIGEST_FIELD})
        data[DIGEST_FIELD] = manifest_digest(data)
        (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_manifest(folder: Path) -> Manifest:
    """Read and validate `folder/manifest.json`; an engine without one is not an engine."""
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise EngineError(f"engine directory not found: {folder}")
    if not path.exists():
        raise EngineError(f"{folder} is not a complete engine: {MANIFEST_FILE} is missing (build it with `bei build`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EngineError(f"{path} is not valid JSON: {err}") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path}: engine format {data.get('format_version')!r} is not {FORMAT_VERSION}; rebuild it with this bei")
    try:
        return Manifest.model_validate(data)
    except PydanticValidationError as err:
        raise EngineError(f"{path} is invalid: {err}") from None
