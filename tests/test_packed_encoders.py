"""bei's packed encoder modules (bei/modeling/packed/encoders.py) against transformers, fp32 on the CPU.

For every encoder (model_type, task) that bei/testing/tiny_models.py makes, BERT embedders with other
pooling / Dense / prompt exclusion, and checkpoints whose config.json says something the defaults do
not (a ModernBERT window shorter than the inputs, mean classifier pooling, the legacy rope fields,
other activations): the packed module's output on a padded batch equals the transformers reference
(`bei.build.reference_outputs`, the EngineModule the ONNX export is made from), and every row of the
packed batch equals that row run alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bei.backend import Batch
from bei.buildsteps.samples import reference_outputs
from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.detect import read_model_spec
from bei.modeling.module import EngineModule, auto_class, build_module, input_names
from bei.modeling.packed.encoders import ENCODERS
from bei.modeling.packed.model import (
    PackedEngineModule,
    build_packed_module,
    make_body,
    read_config,
)
from bei.modeling.packed.weights import read_hf_state
from bei.modeling.spec import ModelSpec
from bei.testing.tiny_models import ENCODERS as ENCODER_TYPES
from bei.testing.tiny_models import SUPPORTED, TEXTS, edit_config
from bei.text.tokenizer import Encoded, TokenizerRuntime

MAX_ABS_DIFF = 1e-4
MIN_COSINE = 0.99999
PAIRS = [(TEXTS[i], TEXTS[(i * 5 + 3) % len(TEXTS)]) for i in range(len(TEXTS))]
PROMPTS = {"query": "query: ", "passage": "Represent this passage for retrieval: "}


@dataclass(frozen=True)
class Case:
    """A tiny checkpoint of `model_type` for `task` (`kwargs` to make_checkpoint), config.json edited by `config`."""

    name: str
    model_type: str
    task: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # config.json edits
    random_biases: bool = False  # re-draw the weights from the edited config, with random biases

    def __str__(self) -> str:
        return self.name


# ModernBERT as older checkpoints write it (answerdotai/ModernBERT-base): no layer_types / rope_parameters
LEGACY_MODERNBERT = {
    "layer_types": None,
    "rope_parameters": None,
    "global_attn_every_n_layers": 2,
    "global_rope_theta": 80_000.0,
    "local_rope_theta": 5_000.0,
}

CASES = [
    Case(f"{mt}-{task}", mt, task, {"pooling": "mean"} if task == "embed" else {}) for mt in ENCODER_TYPES for task in SUPPORTED[mt]
] + [
    Case("bert-embed-cls", "bert", "embed", {"pooling": "cls"}),
    Case("bert-embed-max", "bert", "embed", {"pooling": "max"}),
    Case("bert-embed-weightedmean", "bert", "embed", {"pooling": "weightedmean"}),
    Case("bert-embed-dense", "bert", "embed", {"pooling": "mean", "dense": [(24, "tanh"), (16, "identity")], "normalize": True}),
    Case("bert-embed-prompt-excluded", "bert", "embed", {"pooling": "mean", "include_prompt": False, "prompts": PROMPTS}),
    Case("bert-ner-gelu-new", "bert", "ner", config={"hidden_act": "gelu_new"}),
    Case("distilbert-classify-relu", "distilbert", "classify", config={"activation": "relu"}),
    # a local window (8 tokens each side) shorter than most inputs
    Case("modernbert-embed-window", "modernbert", "embed", {"pooling": "mean"}, config={"local_attention": 16}),
    Case(
        "modernbert-classify-mean-legacy",
        "modernbert",
        "classify",
        config={"classifier_pooling": "mean", "local_attention": 12, **LEGACY_MODERNBERT},
    ),
    Case(
        "modernbert-ner-biases",
        "modernbert",
        "ner",
        config={"attention_bias": True, "mlp_bias": True, "norm_bias": True, "classifier_bias": True},
        random_biases=True,
    ),
    # DeBERTa-v2 as older checkpoints write it: own position projections, no buckets, absolute positions too, "p2c|c2p"
    Case(
        "deberta-v2-classify-unshared",
        "deberta-v2",
        "classify",
        config={
            "share_att_key": False,
            "position_buckets": -1,
            "max_relative_positions": 24,
            "position_biased_input": True,
            "pos_att_type": "p2c|c2p",
            "norm_rel_ebd": "none",
        },
        random_biases=True,
    ),  # fmt: skip
    Case("deberta-v2-ner-c2p", "deberta-v2", "ner", config={"pos_att_type": ["c2p"], "position_buckets": 8}, random_biases=True),
    Case(
        "deberta-v2-embed-absolute",
        "deberta-v2",
        "embed",
        {"pooling": "mean"},
        config={"relative_attention": False, "position_biased_input": True},
        random_biases=True,
    ),  # fmt: skip
    # DeBERTa-v2's convolution after the first layer (deberta-v2-xlarge: kernel 3, gelu), and a grouped
    # 5-wide one: rows of different lengths in one packed batch, none sees another's tokens
    Case("deberta-v2-classify-conv", "deberta-v2", "classify", config={"conv_kernel_size": 3, "conv_act": "gelu"}, random_biases=True),
    Case(
        "deberta-v2-embed-conv-groups",
        "deberta-v2",
        "embed",
        {"pooling": "mean"},
        config={"conv_kernel_size": 5, "conv_groups": 4, "conv_act": "tanh"},
        random_biases=True,
    ),  # fmt: skip
    Case("deberta-v2-ner-conv", "deberta-v2", "ner", config={"conv_kernel_size": 3}, random_biases=True),
    # EuroBERT's other classifier poolings (public configs spell the key clf_pooling)
    Case("eurobert-classify-bos", "eurobert", "classify", config={"clf_pooling": "bos"}),
    Case("eurobert-rerank-mean", "eurobert", "rerank", config={"clf_pooling": "mean"}),
    # ELECTRA whose embeddings are as wide as the layers: no embeddings_project
    Case("electra-rerank-no-projection", "electra", "rerank", config={"embedding_size": 32}, random_biases=True),
    Case(
        "modernbert-sparse-biases",
        "modernbert",
        "sparse",
        config={"attention_bias": True, "mlp_bias": True, "norm_bias": True, "classifier_bias": True},
        random_biases=True,
    ),
]


@dataclass
class Loaded:
    spec: ModelSpec
    reference: EngineModule
    packed: PackedEngineModule
    encoded: list[Encoded]
    batch: Batch
    pad_id: int


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _redraw_weights(folder: Path, task: Task) -> None:
    """Random weights for the checkpoint's (edited) config, biases included (transformers' init zeroes them)."""
    import transformers

    torch.manual_seed(1)
    model = auto_class(task).from_config(transformers.AutoConfig.from_pretrained(str(folder)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
    model.save_pretrained(str(folder))


def encode_items(spec: ModelSpec, tokenizer: TokenizerRuntime) -> list[Encoded]:
    """TEXTS (PAIRS for rerank / classify), a prompt on every other row where prompts are excluded from pooling."""
    items: list[str | tuple[str, str]] = list(PAIRS if spec.task in (Task.RERANK, Task.CLASSIFY) else TEXTS)
    excluded = spec.pooling is not None and not spec.pooling.include_prompt
    return [
        tokenizer.encode(item, truncate=True, prompt=PROMPTS["query"] if excluded and i % 2 == 0 else None) for i, item in enumerate(items)
    ]


@pytest.fixture(scope="module")
def load(tiny_checkpoint_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case], Loaded]:
    cache: dict[str, Loaded] = {}

    def get(case: Case) -> Loaded:
        if case.name not in cache:
            folder = tiny_checkpoint_factory(case.model_type, case.task, **case.kwargs)
            if case.config:  # the factory's folders are shared: edit a copy
                folder = Path(shutil.copytree(folder, tmp_path_factory.mktemp(case.name) / "checkpoint"))
                edit_config(folder, case.config)
                if case.random_biases:
                    _redraw_weights(folder, Task(case.task))
            spec = read_model_spec(folder)
            tokenizer = TokenizerRuntime(folder / "tokenizer.json", spec.max_seq_len)
            encoded = encode_items(spec, tokenizer)
            batch = Batch.pad(encoded, tokenizer.pad_id, spec.padding_side)
            cache[case.name] = Loaded(spec, build_module(spec), build_packed_module(spec), encoded, batch, tokenizer.pad_id)
        return cache[case.name]

    return get


def run_packed(loaded: Loaded, batch: Batch) -> np.ndarray:
    feeds = {k: torch.from_numpy(v) for k, v in batch.feeds(input_names(loaded.spec)).items()}
    with torch.no_grad():
        return loaded.packed.forward_padded(**feeds, left_padded=batch.left_padded).float().numpy()


def rows(loaded: Loaded, batch: Batch, output: np.ndarray) -> list[np.ndarray]:
    """Per row, its output (per-token outputs: its real tokens only), flattened."""
    if loaded.spec.task is Task.NER:
        return [batch.row_tokens(output, i).reshape(-1) for i in range(output.shape[0])]
    return [output[i].reshape(-1) for i in range(output.shape[0])]


def assert_close(got: list[np.ndarray], want: list[np.ndarray], max_abs: float, what: str) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        assert g.shape == w.shape, f"{what}: row {i} shape {g.shape} != {w.shape}"
        diff = float(np.abs(g - w).max())
        cosine = float(g @ w / max(np.linalg.norm(g) * np.linalg.norm(w), 1e-30))
        assert diff <= max_abs, f"{what}: row {i} max abs diff {diff:.2e} > {max_abs:.0e}"
        if w.size > 1:
            assert cosine >= MIN_COSINE, f"{what}: row {i} cosine {cosine:.7f} < {MIN_COSINE}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_packed_matches_transformers(case: Case, load: Callable[[Case], Loaded]) -> None:
    loaded = load(case)
    want = reference_outputs(loaded.reference, loaded.batch)
    got = run_packed(loaded, loaded.batch)
    assert got.shape == want.shape
    assert_close(rows(loaded, loaded.batch, got), rows(loaded, loaded.batch, want), MAX_ABS_DIFF, case.name)
    if case.task in ("rerank", "classify"):  # the head sees each row: logits differ from row to row
        assert want.std(axis=0).min() > 1e-3


@pytest.mark.parametrize("case", CASES, ids=str)
def test_packed_batch_equals_rows_alone(case: Case, load: Callable[[Case], Loaded]) -> None:
    loaded = load(case)
    together = rows(loaded, loaded.batch, run_packed(loaded, loaded.batch))
    alone = []
    for enc in loaded.encoded:
        single = Batch.pad([enc], loaded.pad_id, loaded.spec.padding_side)
        alone += rows(loaded, single, run_packed(loaded, single))
    assert_close(together, alone, 1e-5, f"{case.name} batch vs alone")


# checkpoint keys of heads the task does not use, as other transformers classes save them next to the
# base model (BertForPreTraining: the pooler and the MLM head; RoBERTa classifiers: a stale pooler)
OTHER_HEADS: dict[str, dict[str, tuple[int, ...]]] = {
    "bert-embed": {"classifier.weight": (2, 32), "cls.predictions.bias": (5,), "bert.pooler.dense.weight": (32, 32)},
    "bert-sparse": {"bert.pooler.dense.weight": (32, 32), "bert.pooler.dense.bias": (32,), "cls.seq_relationship.weight": (2, 32)},
    "bert-ner": {"bert.pooler.dense.weight": (32, 32), "cls.predictions.transform.dense.weight": (32, 32)},
    "roberta-classify": {"roberta.pooler.dense.weight": (32, 32), "lm_head.dense.weight": (32, 32)},
    "distilbert-sparse": {"pre_classifier.weight": (32, 32), "classifier.weight": (2, 32)},
    "modernbert-rerank": {"decoder.bias": (700,)},
}
PREFIX = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert.", "modernbert": "model."}


def _spellings(state: dict[str, torch.Tensor], case: Case) -> dict[str, dict[str, torch.Tensor]]:
    """The same weights as other transformers classes / versions save them."""
    prefix = PREFIX[case.model_type]
    bare = {k.removeprefix(prefix): v for k, v in state.items()}
    return {
        "no prefix (AutoModel)": bare,
        f"{prefix} prefix on every key": {f"{prefix}{k}": v for k, v in bare.items()},
        "LayerNorm gamma / beta (the oldest BERT files)": {
            k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()
        },
        "other heads' weights too": {**state, **{k: torch.zeros(shape) for k, shape in OTHER_HEADS[case.name].items()}},
    }


@pytest.mark.parametrize("name", list(OTHER_HEADS))
def test_checkpoint_key_spellings_load(name: str, load: Callable[[Case], Loaded]) -> None:
    case = next(c for c in CASES if c.name == name)
    loaded = load(case)
    state = read_hf_state(loaded.spec.path)
    body = make_body(loaded.spec, read_config(loaded.spec.path))
    canonical = body.convert_hf_state(state)  # type: ignore[operator]
    assert set(canonical) == set(body.state_dict())
    for spelling, spelled in _spellings(state, case).items():
        converted = body.convert_hf_state(spelled)  # type: ignore[operator]
        assert set(converted) == set(canonical), spelling
        for key, value in canonical.items():
            assert torch.equal(converted[key], value), f"{spelling}: {key}"
    body.load_state_dict(canonical, strict=True)


def test_sparse_decoder_is_tied_to_embeddings(load: Callable[[Case], Loaded]) -> None:
    for model_type in ("bert", "roberta", "distilbert", "modernbert"):
        body = load(Case(f"{model_type}-sparse", model_type, "sparse")).packed.body
        assert body.head.out.weight is body.embed.tokens.weight, model_type  # type: ignore[union-attr]


def test_unsupported_config_values_raise_model_error(load: Callable[[Case], Loaded]) -> None:
    bert = read_config(load(CASES[0]).spec.path)
    modernbert = read_config(load(Case("modernbert-classify", "modernbert", "classify")).spec.path)
    bad = [
        ("bert", {**bert, "hidden_act": "no_such_act"}, Task.EMBED, "hidden_act"),
        ("bert", {**bert, "position_embedding_type": "relative_key"}, Task.EMBED, "position_embedding_type"),
        (
            "distilbert",
            {
                "dim": 32,
                "n_heads": 4,
                "hidden_dim": 64,
                "n_layers": 1,
                "vocab_size": 10,
                "max_position_embeddings": 8,
                "activation": "gelu_10",
            },
            Task.EMBED,
            "activation",
        ),
        ("modernbert", {**modernbert, "classifier_pooling": "max"}, Task.CLASSIFY, "classifier_pooling"),
        ("modernbert", {**modernbert, "hidden_activation": "xielu"}, Task.EMBED, "hidden_activation"),
        (
            "modernbert",
            {**modernbert, "rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}},
            Task.EMBED,
            "rope_type",
        ),
    ]
    for model_type, config, task, field_name in bad:
        with pytest.raises(ModelError, match=field_name):
            ENCODERS[model_type](config, task, 2)
