"""config.yaml: pydantic models of the Truss-style config that `bei build` reads.

`load_config` / `parse_config` turn a file or a mapping into a `BeiConfig`; every problem comes
out as one `ConfigError` whose message names each field path, the bad value and the allowed ones.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bei.config_errors import Problems, format_error, raise_problems, unknown_field_message, unknown_keys
from bei.errors import ConfigError
from bei.hardware import compute_capability, hardware_problems

__all__ = [
    "TRUSS_TOP_LEVEL_KEYS",
    "BaseModelKind",
    "BeiConfig",
    "BuildConfig",
    "CheckpointRepository",
    "CheckpointSource",
    "QuantizationConfig",
    "QuantizationType",
    "Resources",
    "Route",
    "RuntimeConfig",
    "TrtLlmConfig",
    "compute_capability",
    "load_config",
    "parse_config",
]


class CheckpointSource(enum.StrEnum):
    """Where the checkpoint comes from."""

    HF = "HF"
    LOCAL = "LOCAL"
    REMOTE_URL = "REMOTE_URL"
    S3 = "S3"
    GCS = "GCS"
    AZURE = "AZURE"


class QuantizationType(enum.StrEnum):
    NO_QUANT = "no_quant"
    FP8 = "fp8"
    FP4 = "fp4"
    FP4_MLP_ONLY = "fp4_mlp_only"
    INT8 = "int8"  # bei's own: the ONNX Runtime CPU engine only


class BaseModelKind(enum.StrEnum):
    """`encoder`: causal decoders used as embedders; `encoder_bert`: BERT-like bidirectional models."""

    ENCODER = "encoder"
    ENCODER_BERT = "encoder_bert"


class Route(enum.StrEnum):
    EMBEDDINGS = "/v1/embeddings"
    RERANK = "/rerank"
    PREDICT = "/predict"
    PREDICT_TOKENS = "/predict_tokens"
    EMBED_SPARSE = "/embed_sparse"
    EMBED_ALL = "/embed_all"


# Top-level keys of a Truss config.yaml; bei reads some and ignores the others.
TRUSS_TOP_LEVEL_KEYS: tuple[str, ...] = (
    "model_name", "description", "model_metadata", "python_version", "requirements",
    "requirements_file", "environment_variables", "secrets", "system_packages", "build_commands",
    "base_image", "docker_server", "model_cache", "external_package_dirs", "model_class_filename",
    "model_class_name", "model_module_dir", "data_dir", "bundled_packages_dir", "live_reload",
    "apply_library_patches", "runtime", "build", "spec_version", "resources", "trt_llm",
    "model_framework", "model_type", "input_type", "examples_filename", "training_checkpoints",
    "weights",
)  # fmt: skip

MAX_NAME_LENGTH = 100  # engine folder names (filesystems take 255 bytes; HF repo names take 96 characters)

# Quantization types each base model supports.
_ALLOWED_QUANT: dict[BaseModelKind, tuple[QuantizationType, ...]] = {
    BaseModelKind.ENCODER: tuple(QuantizationType),
    BaseModelKind.ENCODER_BERT: (QuantizationType.NO_QUANT, QuantizationType.INT8),
}


def _null_means_default(field: str) -> Any:
    """A before-validator that reads `field: null` as the field's default (an empty mapping)."""

    def validate(cls: type, value: Any) -> Any:
        return {} if value is None else value

    return field_validator(field, mode="before")(validate)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointRepository(_Strict):
    source: CheckpointSource
    repo: str = Field(min_length=1)
    revision: str | None = None
    runtime_secret_name: str | None = None
    # bei's own, REMOTE_URL only: the tarball's sha256 (64 hex digits, `sha256:` prefix optional) that
    # the download must match, and caps on the download and on what it extracts to
    sha256: str | None = None
    max_download_gb: float = Field(default=50.0, gt=0)
    max_extracted_gb: float | None = Field(default=None, gt=0)  # None: 4x the tarball, at least 0.25 GB

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digest = value.strip().lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("must be a sha256 of 64 hex digits (optionally prefixed `sha256:`)")
        return digest


class QuantizationConfig(_Strict):
    calib_size: int = Field(default=1024, gt=0)
    calib_dataset: str | None = None
    calib_max_seq_length: int = Field(default=1536, gt=0)
    # bei's own: the build fails when the quantized engine's cosine to the unquantized model is lower
    min_accuracy: float = Field(default=0.99, gt=0, le=1)
    # bei's own, torch target FP8: activation scales per row at run time, or one per layer calibrated
    activation_scales: Literal["dynamic", "static"] = "dynamic"


class BuildConfig(_Strict):
    base_model: BaseModelKind = BaseModelKind.ENCODER_BERT
    checkpoint_repository: CheckpointRepository
    quantization_type: QuantizationType = QuantizationType.NO_QUANT
    quantization_config: QuantizationConfig = Field(default_factory=QuantizationConfig)
    max_num_tokens: int = Field(default=16384, gt=64, le=1048576)
    max_batch_size: int = Field(default=256, ge=1, le=2048)
    max_seq_len: int | None = Field(default=None, gt=0)
    num_builder_gpus: int | None = Field(default=None, gt=0)
    # bei's own, engines that run on the CPU: `bf16` runs every transformer GEMM in bf16 (fp32
    # accumulation, the rest fp32) on CPUs with AVX512-BF16 / AMX-BF16 units, through the torch target;
    # `auto` (the default; with --target auto, on a machine without a GPU) builds every engine the
    # host supports (fp32; bf16 where the CPU has the units; int8 when quantization_type is int8),
    # times each on the model's own shapes and keeps the fastest that passed its accuracy gate;
    # `fp32` pins the fp32 engine
    cpu_precision: Literal["fp32", "bf16", "auto"] = "auto"
    # bei's own, `cpu_precision: auto` only: `int8` adds the int8 CPU engines to the candidates (ONNX
    # Runtime's int8; the torch target's W8A8 with bf16 GEMMs for the layers int8 would make
    # inaccurate, where the CPU has bf16 units), each kept only if it keeps
    # quantization_config.min_accuracy; a build with an explicit --target, or for a GPU, ignores it
    cpu_quantization: Literal["none", "int8"] = "none"
    # bei's own, checkpoints with task LoRA adapters (jina-embeddings-v3: retrieval.query,
    # retrieval.passage, separation, classification, text-matching): the task whose adapter is merged
    # into the engine's weights, its instruction the default prompt; required for them, refused for others
    adapter: str | None = Field(default=None, min_length=1)

    _null_is_default = _null_means_default("quantization_config")


class RuntimeConfig(_Strict):
    webserver_default_route: Route | None = None


class TrtLlmConfig(_Strict):
    inference_stack: Literal["v1"] = "v1"
    build: BuildConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    _null_is_default = _null_means_default("runtime")


class Resources(BaseModel):
    """Truss `resources:`; bei reads `accelerator`, other keys pass through."""

    model_config = ConfigDict(extra="allow")

    accelerator: str | None = None
    use_gpu: bool | None = None
    cpu: str | int | float | None = None
    memory: str | None = None
    node_count: int | None = None


class BeiConfig(BaseModel):
    """The whole config.yaml; top-level keys other than Truss's known ones are errors."""

    model_config = ConfigDict(extra="allow")

    model_name: str | None = None
    resources: Resources = Field(default_factory=Resources)
    trt_llm: TrtLlmConfig

    _null_is_default = _null_means_default("resources")

    @model_validator(mode="after")
    def _check_rules(self) -> BeiConfig:
        unknown = unknown_keys(self.model_extra or {}, TRUSS_TOP_LEVEL_KEYS)
        problems = [unknown_field_message("", key, TRUSS_TOP_LEVEL_KEYS) for key in unknown]
        problems += _cross_field_problems(self)
        if problems:
            raise Problems(problems)
        return self

    @property
    def name(self) -> str:
        """A filesystem-safe, lowercase model name: `model_name`, else the repo's last path part."""
        return _safe_name(self.model_name or _repo_basename(self.trt_llm.build.checkpoint_repository.repo))

    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of the config: equal configs give equal fingerprints."""
        data = self.model_dump(mode="json")
        # the download's caps do not change the engine, an unset pin or cpu_quantization neither:
        # engines built before these fields existed keep their fingerprint
        repo = data["trt_llm"]["build"]["checkpoint_repository"]
        for key in ("max_download_gb", "max_extracted_gb", *(("sha256",) if repo["sha256"] is None else ())):
            repo.pop(key)
        if data["trt_llm"]["build"]["cpu_quantization"] == "none":
            data["trt_llm"]["build"].pop("cpu_quantization")
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _cross_field_problems(cfg: BeiConfig) -> list[str]:
    build = cfg.trt_llm.build
    quant, path = build.quantization_type, "trt_llm.build.quantization_type"
    problems = []
    allowed = _ALLOWED_QUANT[build.base_model]
    if quant not in allowed:
        problems.append(
            f"{path}: {quant.value!r} is not supported for base_model {build.base_model.value} "
            f"(allowed: {', '.join(q.value for q in allowed)})"
        )
    name = cfg.name
    if len(name) > MAX_NAME_LENGTH:
        field = "model_name" if cfg.model_name else "trt_llm.build.checkpoint_repository.repo"
        problems.append(
            f"{field}: the engine name {name[:24]!r}... is {len(name)} characters; at most {MAX_NAME_LENGTH} "
            "(it names the engine's folder and the served model)"
        )
    repo = build.checkpoint_repository
    if repo.sha256 is not None and repo.source != CheckpointSource.REMOTE_URL:
        problems.append(
            f"trt_llm.build.checkpoint_repository.sha256: pins a REMOTE_URL tarball; source {repo.source.value} has none to pin"
        )
    accelerator = cfg.resources.accelerator
    if accelerator:
        problems += hardware_problems(
            build.base_model.value, quant.value, compute_capability(accelerator), f"resources.accelerator {accelerator!r}"
        )
    return problems


def _repo_basename(repo: str) -> str:
    text = repo.strip()
    if "://" in text:
        text = text.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
    elif re.match(r"^[A-Za-z][\w+.-]*:(?![\\/])", text):  # "package:foo", not "C:\\dir"
        text = text.split(":", 1)[1]
    text = text.rstrip("/\\")
    text = re.split(r"[/\\]", text)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if text.lower().endswith(suffix):
            text = text[: -len(suffix)]
            break
    return text


def _safe_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower())
    name = re.sub(r"-{2,}", "-", name).strip(".-_")
    return name or "model"


def parse_config(data: Any, source: str = "<config>") -> BeiConfig:
    """Validate a mapping (a parsed config.yaml) into a BeiConfig; any problem raises one ConfigError."""
    if not isinstance(data, dict):
        kind = "an empty document" if data is None else type(data).__name__
        raise_problems(source, [f"expected a mapping at the top level, got {kind}"])
    unknown = unknown_keys(data, TRUSS_TOP_LEVEL_KEYS)
    problems = [unknown_field_message("", key, TRUSS_TOP_LEVEL_KEYS) for key in unknown]
    try:
        config = BeiConfig.model_validate({k: v for k, v in data.items() if k not in unknown})
    except ValidationError as exc:
        problems += [format_error(err, BeiConfig) for err in exc.errors(include_url=False)]
    except Problems as exc:
        problems += exc.problems
    if problems:
        raise_problems(source, problems)
    return config


def load_config(path: str | Path) -> BeiConfig:
    """Read and validate a config.yaml; a missing file, bad YAML or an invalid config raise ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read file: {exc}") from None
    return parse_config(load_yaml(text, source), source)


MAX_YAML_NODES = 100_000  # values of a config after its aliases are expanded: a config has a few hundred


def load_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, refusing aliases that expand to more than MAX_YAML_NODES values (an alias
    bomb, "billion laughs", would otherwise hang whatever reads the result), recursive aliases and
    documents nested too deep: a ConfigError naming the top-level key."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, source: str) -> None:
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:  # values under `node` with every alias expanded, memoized per node
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{source}: a YAML alias refers to a value that contains it (recursive aliases are not allowed)")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        sizes[key] = total
        return total

    if size(root) <= MAX_YAML_NODES:
        return
    where = "the document"
    if isinstance(root, yaml.MappingNode) and root.value:
        key, _ = max(root.value, key=lambda kv: size(kv[1]))
        where = str(key.value) if isinstance(key, yaml.ScalarNode) else where
    raise ConfigError(
        f"{source}: {where}: YAML aliases expand to more than {MAX_YAML_NODES} values (an alias bomb?); "
        "write the values out or use fewer anchors and aliases"
    )
